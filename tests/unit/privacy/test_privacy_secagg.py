"""Secure aggregation checked against the plain float64 sum, Shamir against any subset, masks
against uniformity, and the PRG and key agreement against pinned vectors."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np
import numpy.typing as npt
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from medfed.privacy.errors import PrivacyError, SecAggAbort, SecAggError, UnsafeUnmaskError
from medfed.privacy.secagg import (
    FIELD_PRIME,
    HeldShares,
    Reveal,
    RoundKeys,
    Share,
    UnmaskRequest,
    WeakThresholdWarning,
    deal_shares,
    decode_sum,
    encode,
    fixed_point_scale,
    mask,
    mask_update,
    pairwise_seeds,
    reconstruct,
    reveal_shares,
    run_round,
    share,
    shared_seed,
    sum_mod,
    unmask_sum,
)

MODULUS = 2**40
MODULI = st.sampled_from([2**32, 2**40, 2**62])
RUN_ID = "run-1"
FAST = settings(max_examples=40, deadline=None)
Floats = npt.NDArray[np.float64]


def seed_of(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def float_arrays(length: int, bound: float) -> st.SearchStrategy[npt.NDArray[np.float32]]:
    bound = float(np.float32(bound))
    elements = st.floats(-bound, bound, width=32, allow_nan=False, allow_infinity=False)
    return hnp.arrays(np.float32, length, elements=elements)


def tolerance(n_summands: int, *, clip: float, max_sites: int, modulus: int) -> float:
    """Rounding to the grid (0.5 / scale each) plus float64 rounding of x * scale."""
    scale = fixed_point_scale(clip=clip, max_sites=max_sites, modulus=modulus)
    return n_summands * (0.5 / scale + 8 * np.finfo(np.float64).eps * clip)


# ---------------------------------------------------------------- fixed point


@FAST
@given(
    values=float_arrays(64, 1e3),
    clip=st.floats(0.01, 100.0),
    max_sites=st.integers(1, 200),
    modulus=MODULI,
)
def test_encode_decode_round_trip_within_half_a_step(
    values: npt.NDArray[np.float32], clip: float, max_sites: int, modulus: int
) -> None:
    encoded = encode(values, clip=clip, max_sites=max_sites, modulus=modulus)
    decoded = decode_sum(encoded, clip=clip, max_sites=max_sites, modulus=modulus, n_summands=1)
    clipped = np.clip(values.astype(np.float64), -clip, clip)
    bound = tolerance(1, clip=clip, max_sites=max_sites, modulus=modulus)
    assert encoded.dtype == np.uint64 and int(encoded.max(initial=0)) < modulus
    assert np.max(np.abs(decoded - clipped)) <= bound


@FAST
@given(data=st.data(), n_sites=st.integers(1, 12), clip=st.floats(0.1, 10.0), modulus=MODULI)
def test_sum_of_encodings_decodes_to_the_plain_sum(
    data: st.DataObject, n_sites: int, clip: float, modulus: int
) -> None:
    inputs = [data.draw(float_arrays(32, 3 * clip)) for _ in range(n_sites)]
    encoded = sum_mod(
        (encode(x, clip=clip, max_sites=n_sites, modulus=modulus) for x in inputs),
        modulus=modulus,
    )
    decoded = decode_sum(encoded, clip=clip, max_sites=n_sites, modulus=modulus, n_summands=n_sites)
    plain = np.sum([np.clip(x.astype(np.float64), -clip, clip) for x in inputs], axis=0)
    bound = tolerance(n_sites, clip=clip, max_sites=n_sites, modulus=modulus)
    assert np.max(np.abs(decoded - plain)) <= bound


@pytest.mark.parametrize("modulus", [2**16, 2**32, 2**62])
def test_clipping_and_full_headroom_never_wrap(modulus: int) -> None:
    max_sites, clip = 7, 2.0
    extremes = np.array([-1e30, -clip, 0.0, clip, 1e30], dtype=np.float64)
    encoded = encode(extremes, clip=clip, max_sites=max_sites, modulus=modulus)
    one = decode_sum(encoded, clip=clip, max_sites=max_sites, modulus=modulus, n_summands=1)
    step = 1 / fixed_point_scale(clip=clip, max_sites=max_sites, modulus=modulus)
    np.testing.assert_allclose(one, [-clip, -clip, 0.0, clip, clip], atol=step)
    total = sum_mod([encoded] * max_sites, modulus=modulus)
    decoded = decode_sum(
        total, clip=clip, max_sites=max_sites, modulus=modulus, n_summands=max_sites
    )
    np.testing.assert_allclose(decoded, max_sites * one, atol=max_sites * step)
    assert decoded[0] < 0 < decoded[-1]


def test_encoding_refuses_bad_settings() -> None:
    with pytest.raises(SecAggError, match="NaN"):
        encode(np.array([np.nan]), clip=1.0, max_sites=2, modulus=MODULUS)
    with pytest.raises(SecAggError, match="power of two"):
        encode(np.zeros(2), clip=1.0, max_sites=2, modulus=10**12)
    with pytest.raises(SecAggError, match="clip"):
        encode(np.zeros(2), clip=0.0, max_sites=2, modulus=MODULUS)
    with pytest.raises(SecAggError, match="n_summands"):
        decode_sum(np.zeros(2, np.uint64), clip=1.0, max_sites=2, modulus=MODULUS, n_summands=3)
    assert issubclass(SecAggAbort, SecAggError) and issubclass(SecAggError, PrivacyError)


# ---------------------------------------------------------------- Shamir


@FAST
@given(
    data=st.data(),
    secret=st.binary(min_size=1, max_size=64),
    threshold=st.integers(2, 7),
    extra=st.integers(0, 4),
)
def test_any_threshold_subset_reconstructs_and_fewer_abort(
    data: st.DataObject, secret: bytes, threshold: int, extra: int
) -> None:
    shares = share(secret, threshold=threshold, n=threshold + extra)
    subset_size = data.draw(st.integers(threshold, len(shares)))
    subset = data.draw(st.permutations(shares))[:subset_size]
    assert reconstruct(subset) == secret
    with pytest.raises(SecAggAbort):
        reconstruct(data.draw(st.permutations(shares))[: threshold - 1])


def test_every_threshold_subset_of_five_reconstructs() -> None:
    secret = seed_of("every subset")
    shares = share(secret, threshold=3, n=5)
    assert all(reconstruct(subset) == secret for subset in combinations(shares, 3))


def test_corrupt_or_mixed_shares_are_refused() -> None:
    shares = share(seed_of("a"), threshold=2, n=4)
    corrupt = [shares[0], shares[1], type(shares[2])(3, shares[2].y + 1, 2, 32)]
    with pytest.raises(SecAggError, match="corrupt"):
        reconstruct(corrupt)
    with pytest.raises(SecAggError, match="different sharings"):
        reconstruct([shares[0], share(seed_of("b"), threshold=3, n=4)[1]])
    with pytest.raises(SecAggError, match="threshold"):
        share(b"x", threshold=1, n=3)


def lagrange_at(points: Sequence[tuple[int, int]], at: int) -> int:
    """The reference: textbook Lagrange interpolation mod FIELD_PRIME, term by term."""
    total = 0
    for i, (x_i, y_i) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (x_j, _) in enumerate(points):
            if i != j:
                numerator = numerator * (at - x_j) % FIELD_PRIME
                denominator = denominator * (x_i - x_j) % FIELD_PRIME
        total += y_i * numerator * pow(denominator, -1, FIELD_PRIME)
    return total % FIELD_PRIME


def reference_reconstruct(shares: Sequence[Share]) -> bytes | str:
    """What `reconstruct` must give, from `lagrange_at`: the secret, or the kind of refusal
    ("abort" below threshold, "corrupt" for a share off the basis' polynomial, "too long"
    for a value past the secret's length). One share per x, from one sharing."""
    points = sorted(shares, key=lambda item: item.x)
    threshold, length = points[0].threshold, points[0].secret_length
    if len(points) < threshold:
        return "abort"
    basis = [(p.x, p.y) for p in points[:threshold]]
    if any(lagrange_at(basis, p.x) != p.y for p in points[threshold:]):
        return "corrupt"
    secret = lagrange_at(basis, 0)
    return "too long" if secret >= 1 << (8 * length) else secret.to_bytes(length, "big")


def outcome(shares: Sequence[Share]) -> bytes | str:
    """`reconstruct`'s secret, or the kind of its refusal as `reference_reconstruct` names it."""
    try:
        return reconstruct(shares)
    except SecAggAbort:
        return "abort"
    except SecAggError as exc:
        kinds = {
            "shares disagree: at least one is corrupt": "corrupt",
            "shares do not encode a secret of the stated length": "too long",
        }
        return kinds[str(exc)]


def corrupted(item: Share, delta: int) -> Share:
    return Share(item.x, (item.y + delta) % FIELD_PRIME, item.threshold, item.secret_length)


@FAST
@given(
    data=st.data(),
    secret=st.binary(min_size=1, max_size=64),
    threshold=st.integers(2, 40),
    extra=st.integers(0, 40),
)
def test_large_sharings_rebuild_exactly_from_any_enough_shares(
    data: st.DataObject, secret: bytes, threshold: int, extra: int
) -> None:
    shares = share(secret, threshold=threshold, n=threshold + extra)
    subset = data.draw(st.permutations(shares))[: data.draw(st.integers(threshold, len(shares)))]
    assert reconstruct(subset) == secret
    with pytest.raises(SecAggAbort, match=f"{threshold - 1} shares, {threshold} needed"):
        reconstruct(subset[: threshold - 1])


@FAST
@given(
    data=st.data(),
    secret=st.binary(min_size=1, max_size=64),
    threshold=st.integers(2, 40),
    extra=st.integers(1, 40),
    delta=st.integers(1, FIELD_PRIME - 1),
)
def test_one_corrupt_share_is_found_in_the_basis_or_past_it(
    data: st.DataObject, secret: bytes, threshold: int, extra: int, delta: int
) -> None:
    """With more than `threshold` shares, any one changed share is refused: past the basis
    it is off the polynomial; in the basis it moves the polynomial off every other share."""
    shares = share(secret, threshold=threshold, n=threshold + extra)
    subset = data.draw(st.permutations(shares))[
        : data.draw(st.integers(threshold + 1, len(shares)))
    ]
    by_x = sorted(subset, key=lambda item: item.x)
    where = data.draw(st.sampled_from(["basis", "surplus"]))
    index = data.draw(
        st.integers(0, threshold - 1) if where == "basis" else st.integers(threshold, len(by_x) - 1)
    )
    by_x[index] = corrupted(by_x[index], delta)
    with pytest.raises(SecAggError, match="shares disagree: at least one is corrupt"):
        reconstruct(data.draw(st.permutations(by_x)))


@FAST
@given(
    data=st.data(),
    secret=st.binary(min_size=1, max_size=64),
    threshold=st.integers(2, 10),
    extra=st.integers(0, 10),
)
def test_reconstruct_agrees_with_textbook_lagrange_on_any_shares(
    data: st.DataObject, secret: bytes, threshold: int, extra: int
) -> None:
    """Same secret or same refusal as the reference, whatever shares are changed or missing."""
    shares = share(secret, threshold=threshold, n=threshold + extra)
    subset = data.draw(st.permutations(shares))[: data.draw(st.integers(1, len(shares)))]
    changed = data.draw(st.sets(st.integers(0, len(subset) - 1), max_size=3))
    deltas = st.integers(1, FIELD_PRIME - 1)
    subset = [corrupted(s, data.draw(deltas)) if k in changed else s for k, s in enumerate(subset)]
    expected = reference_reconstruct(subset)
    assert outcome(subset) == expected
    if not changed and len(subset) >= threshold:
        assert expected == secret


def test_two_hundred_shares_at_threshold_101_rebuild_and_find_a_corrupt_one() -> None:
    secret = seed_of("two hundred")
    shares = share(secret, threshold=101, n=200)
    assert reconstruct(shares) == secret
    assert reconstruct(shares[99:]) == secret  # another basis: x = 100..200
    for index in (0, 100, 150, 199):  # basis (x = 1, 101) and past it
        with pytest.raises(SecAggError, match="corrupt"):
            reconstruct([*shares[:index], corrupted(shares[index], 1), *shares[index + 1 :]])
    with pytest.raises(SecAggAbort, match="100 shares, 101 needed"):
        reconstruct(shares[50:150])


# ---------------------------------------------------------------- masks


def masked_round(
    inputs: Mapping[str, npt.NDArray[np.uint64]], round_number: int
) -> tuple[dict[str, RoundKeys], dict[str, npt.NDArray[np.uint64]]]:
    keys = {site: RoundKeys.generate(site) for site in inputs}
    public = {site: keys[site].public_key for site in inputs}
    masked = {
        site: mask_update(
            encoded,
            site_id=site,
            self_mask_seed=keys[site].self_mask_seed,
            pairwise_seeds=pairwise_seeds(keys[site], public, run_id=RUN_ID),
            round_number=round_number,
            modulus=MODULUS,
        )
        for site, encoded in inputs.items()
    }
    return keys, masked


@settings(max_examples=15, deadline=None)
@given(n_sites=st.integers(2, 6), length=st.integers(1, 50), round_number=st.integers(0, 2**64 - 1))
def test_pairwise_masks_cancel_in_the_sum(n_sites: int, length: int, round_number: int) -> None:
    rng = np.random.default_rng(n_sites * 1000 + length)
    inputs = {
        f"site-{i}": rng.integers(0, MODULUS, length, dtype=np.uint64) for i in range(n_sites)
    }
    keys, masked = masked_round(inputs, round_number)
    self_masks = [
        mask(k.self_mask_seed, round_number, length, modulus=MODULUS) for k in keys.values()
    ]
    unmasked = sum_mod(masked.values(), modulus=MODULUS) - sum_mod(self_masks, modulus=MODULUS)
    expected = sum_mod(inputs.values(), modulus=MODULUS)
    np.testing.assert_array_equal(unmasked & np.uint64(MODULUS - 1), expected)


def random_inputs(n_sites: int, length: int = 257) -> dict[str, npt.NDArray[np.float32]]:
    rng = np.random.default_rng(n_sites)
    return {f"h{i:02d}": rng.normal(0, 0.7, length).astype(np.float32) for i in range(n_sites)}


def plain_sum(inputs: Mapping[str, npt.NDArray[np.float32]], clip: float, skip: set[str]) -> Floats:
    kept = [
        np.clip(x.astype(np.float64), -clip, clip) for site, x in inputs.items() if site not in skip
    ]
    total: Floats = np.sum(kept, axis=0)
    return total


@pytest.mark.parametrize("n_dropped", [0, 1, 2])
def test_round_recovers_the_survivors_plain_sum(n_dropped: int) -> None:
    inputs, clip = random_inputs(5), 1.5
    dropped = set(sorted(inputs)[1 : 1 + n_dropped])
    result = run_round(
        inputs,
        drop_after_masking=dropped,
        threshold=3,
        clip=clip,
        modulus=MODULUS,
        run_id=RUN_ID,
        round_number=4,
    )
    assert isinstance(result, np.ndarray)
    bound = tolerance(5 - n_dropped, clip=clip, max_sites=5, modulus=MODULUS)
    assert np.max(np.abs(result - plain_sum(inputs, clip, dropped))) <= bound


def test_threshold_many_dropouts_recover_but_warn_of_a_weak_threshold() -> None:
    inputs, clip = random_inputs(6), 1.0
    dropped = {"h00", "h03", "h05"}
    with pytest.warns(WeakThresholdWarning):
        result = run_round(
            inputs,
            drop_after_masking=dropped,
            threshold=3,
            clip=clip,
            modulus=2**32,
            run_id=RUN_ID,
            round_number=0,
        )
    assert isinstance(result, np.ndarray)
    bound = tolerance(3, clip=clip, max_sites=6, modulus=2**32)
    assert np.max(np.abs(result - plain_sum(inputs, clip, dropped))) <= bound


@pytest.mark.parametrize("n_dropped", [3, 4, 5])
def test_too_many_dropouts_abort_with_no_result(n_dropped: int) -> None:
    inputs = random_inputs(5)
    result = run_round(
        inputs,
        drop_after_masking=set(sorted(inputs)[:n_dropped]),
        threshold=3,
        clip=1.0,
        modulus=MODULUS,
        run_id=RUN_ID,
        round_number=1,
    )
    assert isinstance(result, SecAggAbort)


Held = dict[str, dict[str, HeldShares]]
"""Shares by holder, then by owner."""


def setup_round(
    n_sites: int, threshold: int
) -> tuple[dict[str, bytes], Held, dict[str, npt.NDArray[np.uint64]]]:
    inputs = {f"s{i}": np.full(8, i, dtype=np.uint64) for i in range(n_sites)}
    keys, masked = masked_round(inputs, 2)
    dealt = {s: deal_shares(keys[s], sites=sorted(keys), threshold=threshold) for s in keys}
    held = {h: {o: dealt[o][h] for o in keys} for h in keys}
    return {s: k.public_key for s, k in keys.items()}, held, masked


def unmask(
    masked: Mapping[str, npt.NDArray[np.uint64]],
    public: Mapping[str, bytes],
    reveals: list[Reveal],
) -> npt.NDArray[np.uint64]:
    return unmask_sum(
        masked,
        public_keys=public,
        reveals=reveals,
        threshold=3,
        run_id=RUN_ID,
        round_number=2,
        modulus=MODULUS,
    )


def test_too_few_shares_abort_before_anything_is_reconstructed() -> None:
    public, held, masked = setup_round(5, 3)
    del masked["s4"]
    request = UnmaskRequest(frozenset(masked), frozenset({"s4"}))
    reveals = [reveal_shares(h, held[h], request=request, threshold=3) for h in ("s0", "s1")]
    with pytest.raises(SecAggAbort, match="fewer than 3 shares"):
        unmask(masked, public, reveals)
    too_few = UnmaskRequest(frozenset({"s0", "s1"}), frozenset({"s2", "s3", "s4"}))
    with pytest.raises(SecAggAbort, match="survivors"):
        reveal_shares("s0", held["s0"], request=too_few, threshold=3)


def test_dropped_site_is_unmasked_from_its_key_alone() -> None:
    public, held, masked = setup_round(4, 3)
    del masked["s2"]
    request = UnmaskRequest(frozenset(masked), frozenset({"s2"}))
    reveals = [reveal_shares(h, held[h], request=request, threshold=3) for h in sorted(masked)]
    expected = np.full(8, 0 + 1 + 3, dtype=np.uint64)
    np.testing.assert_array_equal(unmask(masked, public, reveals), expected)


# ---------------------------------------------------------------- refusal


def test_request_for_both_seed_and_key_of_one_site_is_refused() -> None:
    with pytest.raises(UnsafeUnmaskError, match="both survived and dropped"):
        UnmaskRequest(frozenset({"s0", "s1", "s2"}), frozenset({"s2"}))
    public, held, masked = setup_round(4, 3)
    honest = UnmaskRequest(frozenset(masked), frozenset())
    reveals = [reveal_shares(h, held[h], request=honest, threshold=3) for h in sorted(held)]
    np.testing.assert_array_equal(unmask(masked, public, reveals), np.full(8, 6, np.uint64))
    greedy = Reveal("s0", {}, {"s1": held["s0"]["s1"].mask_key})
    with pytest.raises(UnsafeUnmaskError, match="both self-mask seed and mask key"):
        unmask(masked, public, [*reveals, greedy])


def test_mask_key_of_a_survivor_is_refused() -> None:
    public, held, masked = setup_round(4, 3)
    reveals = [Reveal(h, {}, {"s1": held[h]["s1"].mask_key}) for h in held]
    with pytest.raises(UnsafeUnmaskError, match="surviving"):
        unmask(masked, public, reveals)


# ---------------------------------------------------------------- uniformity

CHI2_15_DOF_LIMIT = 37.7
"""The 0.999 quantile of chi-square with 15 degrees of freedom; the seeds are fixed, so this
is a one-off check of the PRG, not a flaky test."""


def chi_square_16(buckets: npt.NDArray[np.uint64]) -> float:
    counts = np.bincount(buckets.astype(np.int64), minlength=16)
    expected = buckets.size / 16
    return float(np.sum((counts - expected) ** 2 / expected))


@pytest.mark.parametrize("fill", ["zeros", "clip", "alternating"])
def test_a_masked_update_is_uniform_whatever_the_input(fill: str) -> None:
    length, clip = 100_000, 1.0
    values = {
        "zeros": np.zeros(length),
        "clip": np.full(length, clip),
        "alternating": np.resize([clip, -clip], length),
    }[fill]
    encoded = encode(values, clip=clip, max_sites=4, modulus=MODULUS)
    masked = mask_update(
        encoded,
        site_id="b",
        self_mask_seed=seed_of("self"),
        pairwise_seeds={"a": seed_of("ab"), "c": seed_of("bc")},
        round_number=9,
        modulus=MODULUS,
    )
    assert chi_square_16(masked >> np.uint64(36)) < CHI2_15_DOF_LIMIT
    assert chi_square_16(masked & np.uint64(15)) < CHI2_15_DOF_LIMIT
    mean = float(np.mean(masked.astype(np.float64))) / MODULUS
    assert abs(mean - 0.5) < 5 * np.sqrt(1 / 12 / length)


# ---------------------------------------------------------------- pinned vectors

RFC7748_ALICE = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
RFC7748_BOB = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"


def test_mask_prefix_is_pinned() -> None:
    seed = bytes(range(32))
    assert [int(v) for v in mask(seed, 7, 4, modulus=2**62)] == [
        1431191928405995520,
        2573452129111857398,
        2873878687770189504,
        1856678065566051292,
    ]
    assert [int(v) for v in mask(seed, 8, 2, modulus=2**62)] == [
        1917365014569361026,
        3746424778848987802,
    ]
    low = mask(seed, 7, 4, modulus=2**32)
    np.testing.assert_array_equal(low, mask(seed, 7, 4, modulus=2**62) & np.uint64(2**32 - 1))


def test_shared_seed_is_pinned_and_symmetric() -> None:
    alice = X25519PrivateKey.from_private_bytes(bytes.fromhex(RFC7748_ALICE))
    bob = X25519PrivateKey.from_private_bytes(bytes.fromhex(RFC7748_BOB))
    seed = shared_seed(alice, bob.public_key(), run_id="run-1")
    assert seed == shared_seed(bob, alice.public_key(), run_id="run-1")
    assert seed.hex() == "362ea11bab1b1a0a837f47bb5e68dfefb7ffc70344cd4e0dd07b91c23cffd0c3"
    assert shared_seed(alice, bob.public_key(), run_id="run-2") != seed
