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
    drop_before_share: frozenset[str] = frozenset(),
    drop_after_mask: frozenset[str] = frozenset(),
) -> np.ndarray:
    keys, certs, ca_pem = consortium
    coordinator = SigningKey.generate()
    signed = _announce(coordinator)
    check = identity_check(ca_pem)
    rounds = {site: SiteRound(signed, site, keys[site], certs[site]) for site in SITES}
    # Everything crosses as JSON, as on the wire.
    adverts = [Advertisement.from_json(rounds[s].advertisement.to_json()) for s in SITES]
    sealed: dict[str, list[SealedShare]] = {}
    for site in SITES:
        if site in drop_before_share:
            continue
        rounds[site].check_peers(adverts, check)
        sealed[site] = [
            SealedShare.from_json(s.to_json()) for s in rounds[site].deal(updates[site])
        ]
    shared = sorted(sealed)
    masked = {}
    for site in shared:
        mine = [s for owner in shared for s in sealed[owner] if s.holder == site]
        vector = rounds[site].mask(shared, mine)
        if site not in drop_after_mask:
            masked[site] = vector
    survivors = sorted(masked)
    dropped = sorted(set(shared) - set(masked))
    reveals = [
        reveal_from_json(reveal_to_json(rounds[site].reveal(survivors, dropped)))
        for site in survivors
    ]
    by_site = {a.site_id: a for a in adverts if a.site_id in shared}
    return unmask_weighted_sum(signed.announcement, by_site, masked, reveals)


def _dealt(
    consortium: tuple[dict[str, SigningKey], dict[str, str], bytes], update: np.ndarray
) -> tuple[dict[str, SiteRound], dict[str, list[SealedShare]]]:
    """Every site keyed for one announced round, peers checked, `update` dealt."""
    keys, certs, ca_pem = consortium
    signed = _announce(SigningKey.generate())
    rounds = {s: SiteRound(signed, s, keys[s], certs[s]) for s in SITES}
    adverts = [rounds[s].advertisement for s in SITES]
    sealed = {}
    for site in SITES:
        rounds[site].check_peers(adverts, identity_check(ca_pem))
        sealed[site] = rounds[site].deal(update)
    return rounds, sealed


def _updates(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {site: rng.uniform(-3.0, 3.0, size=1000) for site in SITES}


@pytest.mark.parametrize(
    ("before", "after"),
    [(set(), set()), ({"b"}, set()), (set(), {"c"}), ({"a"}, {"e"}), (set(), {"b", "d"})],
)
def test_sum_equals_plain_sum_with_dropouts(
    consortium: tuple[dict[str, SigningKey], dict[str, str], bytes],
    before: set[str],
    after: set[str],
) -> None:
    updates = _updates(len(before) * 10 + len(after))
    total = _play(
        consortium, updates, drop_before_share=frozenset(before), drop_after_mask=frozenset(after)
    )
    expected = sum(updates[s] for s in SITES if s not in before | after)
    # Fixed point: 2**31 / 5 levels over [-4, 4]; each summand off by at most half a level.
    step = 4.0 / ((2**31 - 1) // 5)
    assert np.max(np.abs(total - expected)) <= len(SITES) * step


def test_more_dropouts_than_the_threshold_allows_abort(
    consortium: tuple[dict[str, SigningKey], dict[str, str], bytes],
) -> None:
    with pytest.raises(SecAggAbort):
        _play(consortium, _updates(1), drop_after_mask=frozenset({"a", "b", "c"}))


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
    rounds, sealed = _dealt(consortium, np.zeros(10))
    mine = [s for owner in SITES for s in sealed[owner] if s.holder == "a"]
    flipped = mine[0].ciphertext[:-2] + ("00" if mine[0].ciphertext[-2:] != "00" else "01")
    mine[0] = SealedShare(mine[0].owner, mine[0].holder, mine[0].nonce, flipped)
    with pytest.raises(SecAggError, match="tampered"):
        rounds["a"].mask(list(SITES), mine)


def test_a_holder_reveals_once_and_never_both_kinds(
    consortium: tuple[dict[str, SigningKey], dict[str, str], bytes],
) -> None:
    rounds, sealed = _dealt(consortium, np.zeros(10))
    for site in SITES:
        rounds[site].mask(list(SITES), [s for o in SITES for s in sealed[o] if s.holder == site])
    rounds["a"].reveal(["a", "b", "c", "d"], ["e"])
    with pytest.raises(SecAggError, match="unmasked already"):
        rounds["a"].reveal(["a", "b", "c", "e"], ["d"])
    with pytest.raises(UnsafeUnmaskError):
        rounds["b"].reveal(["a", "b", "c", "d", "e"], ["e"])


def test_the_masked_update_looks_uniform(
    consortium: tuple[dict[str, SigningKey], dict[str, str], bytes],
) -> None:
    """A constant update, masked: its residues fill [0, 2**32) evenly (chi-square)."""
    rounds, sealed = _dealt(consortium, np.full(40_000, 1.5))
    vector = rounds["a"].mask(list(SITES), [s for o in SITES for s in sealed[o] if s.holder == "a"])
    from scipy import stats

    counts = np.bincount((vector >> np.uint32(28)).astype(np.int64), minlength=16)
    assert stats.chisquare(counts).pvalue > 1e-4


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
