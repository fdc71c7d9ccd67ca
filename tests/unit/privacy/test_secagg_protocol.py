"""The secure-aggregation messages, played between in-process sites and a coordinator:
the recovered sum is checked against the plain sum of the weighted updates."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from medfed.privacy.errors import SecAggAbort, SecAggError, UnsafeUnmaskError
from medfed.privacy.identity import identity_check, issue_identity_certificate
from medfed.privacy.pki import create_ca
from medfed.privacy.secagg_protocol import (
    Advertisement,
    Announcement,
    SealedShare,
    SignedAnnouncement,
    SiteRound,
    reveal_from_json,
    reveal_to_json,
    unmask_weighted_sum,
    weighted_delta,
)
from medfed.privacy.signing import SigningKey

SITES = ("a", "b", "c", "d", "e")


@pytest.fixture(scope="module")
def consortium() -> tuple[dict[str, SigningKey], dict[str, str], bytes]:
    ca_key, ca_cert = create_ca("test CA", valid_days=2)
    keys = {site: SigningKey.generate() for site in SITES}
    certs = {
        site: issue_identity_certificate(ca_key, ca_cert, site, key.public, valid_days=1).decode()
        for site, key in keys.items()
    }
    from cryptography.hazmat.primitives import serialization

    return keys, certs, ca_cert.public_bytes(serialization.Encoding.PEM)


def _announce(coordinator: SigningKey, **overrides: object) -> SignedAnnouncement:
    fields: dict[str, object] = {
        "run_id": "run-1",
        "study_sha256": "1" * 64,
        "round": 3,
        "model_sha256": "2" * 64,
        "sites": SITES,
        "threshold": 3,
        "clip": 4.0,
        "weight_cap": 100,
    }
    fields.update(overrides)
    return SignedAnnouncement.sign(Announcement(**fields), coordinator)  # type: ignore[arg-type]


def _play(
    consortium: tuple[dict[str, SigningKey], dict[str, str], bytes],
    updates: dict[str, np.ndarray],
    *,
    drop_at_train: frozenset[str] = frozenset(),
    drop_at_reveal: frozenset[str] = frozenset(),
) -> np.ndarray:
    """One round: every site keyed; sites in `drop_at_train` never answer the train step
    (nothing of theirs arrives), survivors in `drop_at_reveal` never answer the reveal."""
    keys, certs, ca_pem = consortium
    coordinator = SigningKey.generate()
    signed = _announce(coordinator)
    check = identity_check(ca_pem)
    rounds = {site: SiteRound(signed, site, keys[site], certs[site]) for site in SITES}
    # Everything crosses as JSON, as on the wire.
    adverts = [Advertisement.from_json(rounds[s].advertisement.to_json()) for s in SITES]
    sealed: dict[str, list[SealedShare]] = {}
    masked: dict[str, np.ndarray] = {}
    for site in SITES:
        rounds[site].check_peers(adverts, check)
        shares, vector = rounds[site].deal_and_mask(updates[site])
        if site not in drop_at_train:
            sealed[site] = [SealedShare.from_json(s.to_json()) for s in shares]
            masked[site] = vector
    survivors = sorted(masked)
    dropped = sorted(set(SITES) - set(masked))
    reveals = []
    for site in survivors:
        if site in drop_at_reveal:
            continue
        mine = [
            s for owner in survivors if owner != site for s in sealed[owner] if s.holder == site
        ]
        reveal = rounds[site].reveal(survivors, dropped, mine)
        reveals.append(reveal_from_json(reveal_to_json(reveal)))
    by_site = {a.site_id: a for a in adverts}
    return unmask_weighted_sum(signed.announcement, by_site, masked, reveals)


def _dealt(
    consortium: tuple[dict[str, SigningKey], dict[str, str], bytes], update: np.ndarray
) -> tuple[dict[str, SiteRound], dict[str, list[SealedShare]], dict[str, np.ndarray]]:
    """Every site keyed for one announced round, peers checked, `update` dealt and masked."""
    keys, certs, ca_pem = consortium
    signed = _announce(SigningKey.generate())
    rounds = {s: SiteRound(signed, s, keys[s], certs[s]) for s in SITES}
    adverts = [rounds[s].advertisement for s in SITES]
    sealed, masked = {}, {}
    for site in SITES:
        rounds[site].check_peers(adverts, identity_check(ca_pem))
        sealed[site], masked[site] = rounds[site].deal_and_mask(update)
    return rounds, sealed, masked


def _held_by(
    site: str, sealed: dict[str, list[SealedShare]], owners: list[str]
) -> list[SealedShare]:
    return [s for o in owners if o != site for s in sealed[o] if s.holder == site]


def _updates(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {site: rng.uniform(-3.0, 3.0, size=1000) for site in SITES}


@pytest.mark.parametrize(
    ("at_train", "at_reveal"),
    [(set(), set()), ({"b"}, set()), (set(), {"c"}), ({"a", "e"}, set()), (set(), {"b", "d"})],
)
def test_sum_equals_plain_sum_with_dropouts(
    consortium: tuple[dict[str, SigningKey], dict[str, str], bytes],
    at_train: set[str],
    at_reveal: set[str],
) -> None:
    updates = _updates(len(at_train) * 10 + len(at_reveal))
    total = _play(
        consortium, updates, drop_at_train=frozenset(at_train), drop_at_reveal=frozenset(at_reveal)
    )
    expected = sum(updates[s] for s in SITES if s not in at_train)
    # Fixed point: 2**31 / 5 levels over [-4, 4]; each summand off by at most half a level.
    step = 4.0 / ((2**31 - 1) // 5)
    assert np.max(np.abs(total - expected)) <= len(SITES) * step


def test_more_dropouts_than_the_threshold_allows_abort(
    consortium: tuple[dict[str, SigningKey], dict[str, str], bytes],
) -> None:
    with pytest.raises(SecAggAbort):
        _play(consortium, _updates(1), drop_at_train=frozenset({"a", "b", "c"}))
    with pytest.raises(SecAggAbort):
        _play(consortium, _updates(1), drop_at_reveal=frozenset({"a", "b", "c"}))


def test_a_survivor_silent_at_reveal_after_a_dropout_aborts_and_says_why(
    consortium: tuple[dict[str, SigningKey], dict[str, str], bytes],
) -> None:
    """Only the survivors hold their pairwise seeds with a site that dealt nothing: one
    of them silent at the reveal leaves a mask in the sum, so nothing is unmasked."""
    with pytest.raises(SecAggAbort, match="'d' revealed no pairwise seed with it"):
        _play(
            consortium, _updates(2), drop_at_train=frozenset({"e"}),
            drop_at_reveal=frozenset({"d"}),
        )  # fmt: skip


def test_a_site_shown_another_announcement_refuses(
    consortium: tuple[dict[str, SigningKey], dict[str, str], bytes],
) -> None:
    keys, certs, ca_pem = consortium
    coordinator = SigningKey.generate()
    honest = _announce(coordinator)
    other = _announce(coordinator, model_sha256="3" * 64)
    rounds = {s: SiteRound(other if s == "e" else honest, s, keys[s], certs[s]) for s in SITES}
    adverts = [rounds[s].advertisement for s in SITES]
    with pytest.raises(SecAggError, match="different announcement"):
        rounds["a"].check_peers(adverts, identity_check(ca_pem))
    with pytest.raises(SecAggError, match="different announcement"):
        rounds["e"].check_peers(adverts, identity_check(ca_pem))


def test_forged_advertisement_and_foreign_certificate_are_refused(
    consortium: tuple[dict[str, SigningKey], dict[str, str], bytes],
) -> None:
    keys, certs, ca_pem = consortium
    signed = _announce(SigningKey.generate())
    rounds = {s: SiteRound(signed, s, keys[s], certs[s]) for s in SITES}
    adverts = [rounds[s].advertisement for s in SITES]
    # The coordinator swaps in its own key for site b, keeping b's certificate.
    impostor = SiteRound(signed, "b", SigningKey.generate(), certs["b"]).advertisement
    with pytest.raises(SecAggError, match="bad signature"):
        rounds["a"].check_peers(
            [impostor if a.site_id == "b" else a for a in adverts], identity_check(ca_pem)
        )
    # A certificate from another CA.
    other_key, other_ca = create_ca("other CA", valid_days=2)
    rogue = issue_identity_certificate(other_key, other_ca, "b", keys["b"].public, valid_days=1)
    with pytest.raises(SecAggError, match="not issued by the consortium CA"):
        identity_check(ca_pem)("b", rogue.decode())
    # b's certificate presented as c's.
    with pytest.raises(SecAggError, match="names another site"):
        identity_check(ca_pem)("c", certs["b"])
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3)
    with pytest.raises(SecAggError, match="expired"):
        identity_check(ca_pem, now=later)("b", certs["b"])


def test_a_tampered_share_does_not_open(
    consortium: tuple[dict[str, SigningKey], dict[str, str], bytes],
) -> None:
    rounds, sealed, _ = _dealt(consortium, np.zeros(10))
    mine = _held_by("a", sealed, list(SITES))
    flipped = mine[0].ciphertext[:-2] + ("00" if mine[0].ciphertext[-2:] != "00" else "01")
    mine[0] = SealedShare(mine[0].owner, mine[0].holder, mine[0].nonce, flipped)
    with pytest.raises(SecAggError, match="tampered"):
        rounds["a"].reveal(list(SITES), [], mine)


def test_a_holder_reveals_once_and_never_both_kinds(
    consortium: tuple[dict[str, SigningKey], dict[str, str], bytes],
) -> None:
    rounds, sealed, _ = _dealt(consortium, np.zeros(10))
    survivors = ["a", "b", "c", "d"]
    first = rounds["a"].reveal(survivors, ["e"], _held_by("a", sealed, survivors))
    assert set(first.self_mask_seed_shares) == set(survivors)
    assert set(first.pairwise_seeds) == {"e"}
    # The same request again gets the same answer; another one gets nothing.
    assert rounds["a"].reveal(survivors, ["e"], _held_by("a", sealed, survivors)) == first
    with pytest.raises(SecAggError, match="unmasked already"):
        rounds["a"].reveal(["a", "b", "c", "e"], ["d"], _held_by("a", sealed, ["b", "c", "e"]))
    with pytest.raises(UnsafeUnmaskError):
        rounds["b"].reveal(list(SITES), ["e"], _held_by("b", sealed, list(SITES)))
    # Told "e dropped" but handed e's share of its self-mask seed: refused, nothing revealed.
    with pytest.raises(SecAggError, match="each other survivor"):
        rounds["c"].reveal(survivors, ["e"], _held_by("c", sealed, list(SITES)))


def test_the_masked_update_looks_uniform(
    consortium: tuple[dict[str, SigningKey], dict[str, str], bytes],
) -> None:
    """A constant update, masked: its residues fill [0, 2**32) evenly (chi-square)."""
    _, _, masked = _dealt(consortium, np.full(40_000, 1.5))
    from scipy import stats

    counts = np.bincount((masked["a"] >> np.uint32(28)).astype(np.int64), minlength=16)
    assert stats.chisquare(counts).pvalue > 1e-4


def test_a_site_masks_once_per_round(
    consortium: tuple[dict[str, SigningKey], dict[str, str], bytes],
) -> None:
    """A second update under the same masks would give their difference away; the same
    update again (an instruction delivered twice) gets the very same answer."""
    rounds, sealed, masked = _dealt(consortium, np.zeros(10))
    again_sealed, again_masked = rounds["a"].deal_and_mask(np.zeros(10))
    assert again_sealed == sealed["a"]
    np.testing.assert_array_equal(again_masked, masked["a"])
    with pytest.raises(SecAggError, match="masked already"):
        rounds["a"].deal_and_mask(np.ones(10))


def test_weighted_delta_weighs_by_patients() -> None:
    received = {"w": np.ones((2, 2), np.float32), "b": np.zeros(3, np.float32)}
    trained = {"w": np.full((2, 2), 3.0, np.float32), "b": np.ones(3, np.float32)}
    out = weighted_delta(trained, received, patients=25, weight_cap=100)
    np.testing.assert_allclose(out, [0.25, 0.25, 0.25, 0.5, 0.5, 0.5, 0.5])


def test_an_announcement_dealt_ahead_names_no_model_and_survives_the_wire() -> None:
    signed = _announce(SigningKey.generate(), model_sha256="")
    again = SignedAnnouncement.from_text(signed.to_text())
    assert again.announcement == signed.announcement
    assert again.announcement.model_sha256 == ""
    with pytest.raises(SecAggError, match="model_sha256"):
        raw = signed.announcement.to_json()
        Announcement.from_json({**raw, "model_sha256": "2" * 63})


def test_model_statements_are_checked_against_each_site_s_certified_key(
    consortium: tuple[dict[str, SigningKey], dict[str, str], bytes],
) -> None:
    """In a round announced ahead, a site masks only when every other site that shared
    signed (with its CA-certified key) that it trained from the same model."""
    keys, certs, ca_pem = consortium
    signed = _announce(SigningKey.generate(), model_sha256="")
    check = identity_check(ca_pem)
    rounds = {site: SiteRound(signed, site, keys[site], certs[site]) for site in SITES}
    adverts = [rounds[s].advertisement for s in SITES]
    for state in rounds.values():
        state.check_peers(adverts, check)
    model = "3" * 64
    statements = {site: rounds[site].state_model(model, keys[site]) for site in SITES}
    rounds["a"].check_models(statements, SITES)  # all trained from one model
    # "e" was sent another model: its honest statement names it, and "a" refuses.
    other = dict(statements, e=SiteRound(signed, "e", keys["e"], certs["e"]).state_model(
        "4" * 64, keys["e"]
    ))  # fmt: skip
    with pytest.raises(SecAggError, match="'e' did not state that it trained from the model"):
        rounds["a"].check_models(other, SITES)
    # A statement signed by another key (the coordinator's), or none, is refused too.
    forged = dict(statements, b=rounds["b"].state_model(model, SigningKey.generate()))
    with pytest.raises(SecAggError, match="'b' did not state"):
        rounds["a"].check_models(forged, SITES)
    with pytest.raises(SecAggError, match="'c' did not state"):
        rounds["a"].check_models({s: v for s, v in statements.items() if s != "c"}, SITES)


def test_a_named_model_must_be_the_one_received() -> None:
    keys = SigningKey.generate()
    signed = _announce(SigningKey.generate())
    state = SiteRound(signed, "a", keys, "certificate")
    assert state.state_model("2" * 64, keys) == ""
    with pytest.raises(SecAggError, match="not the one announced"):
        state.state_model("5" * 64, keys)
