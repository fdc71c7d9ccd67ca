"""Secure aggregation maths: SecAgg (Bonawitz et al. 2017), SecAgg+ semantics (Bell et al. 2020).

Pure functions and frozen values over numpy, with no network or Flower code: fixed-point
encoding, X25519 key agreement, a ChaCha20 mask generator, Shamir sharing, masking at a
site and unmasking at the server. `run_round` plays a whole round in-process.

Arithmetic is in Z_m for a power-of-two modulus m <= 2**62 held in uint64: numpy's uint64
arithmetic wraps mod 2**64 and m divides 2**64, so `& (m - 1)` is exact reduction mod m.

Unmasking rule: for each site the server learns its self-mask seed (its masked update
arrived) or its mask key (it dropped), never both, since both together unmask its input.
Honest holders refuse such a request (`UnmaskRequest`), and so does `unmask_sum`. A server
that lies about who dropped could still ask disjoint sets of holders for each kind; that
needs two disjoint sets of `threshold` holders, impossible when 2 * threshold > n, so a
lower threshold warns (`WeakThresholdWarning`). Mask keys are fresh each round: a dropped
site's key is revealed, and with it every pairwise seed it ever derived.
"""

from __future__ import annotations

import functools
import secrets
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from medfed.privacy.errors import SecAggAbort, SecAggError, UnsafeUnmaskError

Vector = npt.NDArray[np.uint64]
"""Elements of Z_m, one per model parameter."""

SEED_BYTES = 32
FIELD_PRIME = 2**521 - 1
"""Shamir field: a Mersenne prime above 2**512, so any secret of up to 64 bytes is one element."""
MAX_SECRET_BYTES = 64
MAX_MASK_LENGTH = 2**32
"""ChaCha20's 32-bit block counter covers 2**32 blocks of 64 bytes: 2**35 uint64 words."""
PAIRWISE_INFO = b"medfed/secagg/v1/pairwise\x00"
MASK_NONCE_TAG = b"mask"


class WeakThresholdWarning(UserWarning):
    """2 * threshold <= n: a server lying about dropouts can unmask one site's input."""


# ---------------------------------------------------------------- fixed point and Z_m


def check_modulus(modulus: int) -> None:
    """Raise unless `modulus` is a power of two in [2**16, 2**62]."""
    if not (2**16 <= modulus <= 2**62) or modulus & (modulus - 1):
        raise SecAggError(f"modulus must be a power of two in [2**16, 2**62], got {modulus}")


def max_level(*, max_sites: int, modulus: int) -> int:
    """The largest encoded magnitude: `max_sites` of them sum to less than m / 2 (headroom rule)."""
    check_modulus(modulus)
    if max_sites < 1:
        raise SecAggError(f"max_sites must be at least 1, got {max_sites}")
    level = (modulus // 2 - 1) // max_sites
    if level < 1:
        raise SecAggError(f"modulus {modulus} leaves no room for {max_sites} sites")
    return level


def fixed_point_scale(*, clip: float, max_sites: int, modulus: int) -> float:
    """Encoded units per unit of value: `max_level / clip`. Rounding costs at most 0.5 / scale."""
    if not (np.isfinite(clip) and clip > 0):
        raise SecAggError(f"clip must be positive and finite, got {clip}")
    return max_level(max_sites=max_sites, modulus=modulus) / clip


def encode(
    values: npt.NDArray[np.floating[Any]], *, clip: float, max_sites: int, modulus: int
) -> Vector:
    """Clip to [-clip, clip], round to the fixed-point grid and store mod m (two's complement).

    Headroom rule: each encoding's magnitude is at most `max_level(max_sites, modulus)`, so the
    sum of up to `max_sites` encodings lies in (-m/2, m/2) and never wraps ambiguously.
    """
    level = max_level(max_sites=max_sites, modulus=modulus)
    scale = fixed_point_scale(clip=clip, max_sites=max_sites, modulus=modulus)
    as_float = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(as_float)):
        raise SecAggError("cannot encode NaN or infinite values")
    levels = np.rint(np.clip(as_float, -clip, clip) * scale).astype(np.int64)
    np.clip(levels, -level, level, out=levels)
    return levels.view(np.uint64) & np.uint64(modulus - 1)


def decode_sum(
    encoded_sum: Vector, *, clip: float, max_sites: int, modulus: int, n_summands: int
) -> npt.NDArray[np.float64]:
    """Read a sum of `n_summands` encodings as float64; error at most n_summands * 0.5 / scale."""
    if not 1 <= n_summands <= max_sites:
        raise SecAggError(f"n_summands must be in [1, {max_sites}], got {n_summands}")
    level = max_level(max_sites=max_sites, modulus=modulus)
    scale = fixed_point_scale(clip=clip, max_sites=max_sites, modulus=modulus)
    residues = (np.asarray(encoded_sum, dtype=np.uint64) & np.uint64(modulus - 1)).view(np.int64)
    signed = np.where(residues >= modulus // 2, residues - modulus, residues)
    if signed.size and int(np.max(np.abs(signed))) > n_summands * level:
        raise SecAggError(f"value out of range for a sum of {n_summands} encodings")
    return signed.astype(np.float64) / scale


def sum_mod(vectors: Iterable[Vector], *, modulus: int) -> Vector:
    """The sum of equally shaped vectors mod m."""
    check_modulus(modulus)
    total: Vector | None = None
    for vector in vectors:
        if total is None:
            total = np.array(vector, dtype=np.uint64)
        elif vector.shape != total.shape:
            raise SecAggError(f"shape {vector.shape} differs from {total.shape}")
        else:
            np.add(total, vector, out=total)
    if total is None:
        raise SecAggError("cannot sum no vectors")
    return total & np.uint64(modulus - 1)


# ---------------------------------------------------------------- keys and masks


def public_key_bytes(private_key: X25519PrivateKey) -> bytes:
    """The raw 32-byte X25519 public key."""
    return private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def private_key_bytes(private_key: X25519PrivateKey) -> bytes:
    """The raw 32-byte X25519 private key (only ever Shamir-shared, never sent whole)."""
    return private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def shared_seed(
    my_private: X25519PrivateKey, their_public: X25519PublicKey, *, run_id: str
) -> bytes:
    """A 32-byte pairwise seed, the same from both ends: X25519, then HKDF-SHA256 over the run."""
    try:
        secret = my_private.exchange(their_public)
    except ValueError as exc:  # small-order public key: all-zero shared secret
        raise SecAggError(f"X25519 key agreement failed: {exc}") from exc
    info = PAIRWISE_INFO + run_id.encode()
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(secret)


def mask(seed: bytes, round_number: int, length: int, *, modulus: int) -> Vector:
    """`length` pseudo-random elements of Z_m from ChaCha20 keyed by `seed`, round in the nonce.

    Uniform mod m because m is a power of two dividing 2**64.
    """
    check_modulus(modulus)
    if len(seed) != SEED_BYTES:
        raise SecAggError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    if not 0 <= round_number < 2**64:
        raise SecAggError(f"round_number must be in [0, 2**64), got {round_number}")
    if not 0 <= length <= MAX_MASK_LENGTH:
        raise SecAggError(f"length must be in [0, {MAX_MASK_LENGTH}], got {length}")
    nonce = bytes(4) + MASK_NONCE_TAG + round_number.to_bytes(8, "little")
    stream = (
        Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor().update(bytes(8 * length))
    )
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64) & np.uint64(modulus - 1)


def mask_update(
    encoded: Vector,
    *,
    site_id: str,
    self_mask_seed: bytes,
    pairwise_seeds: Mapping[str, bytes],
    round_number: int,
    modulus: int,
) -> Vector:
    """y_i = x_i + PRG(b_i) + sum_{j>i} PRG(s_ij) - sum_{j<i} PRG(s_ij) mod m (str order of ids)."""
    size = encoded.size
    masked = np.array(encoded, dtype=np.uint64).reshape(-1)
    np.add(masked, mask(self_mask_seed, round_number, size, modulus=modulus), out=masked)
    for other, seed in pairwise_seeds.items():
        if other == site_id:
            raise SecAggError(f"site {site_id!r} cannot hold a pairwise seed with itself")
        pairwise = mask(seed, round_number, size, modulus=modulus)
        (np.add if other > site_id else np.subtract)(masked, pairwise, out=masked)
    return (masked & np.uint64(modulus - 1)).reshape(encoded.shape)


# ---------------------------------------------------------------- Shamir sharing


@dataclass(frozen=True)
class Share:
    """A point (x, y) of a Shamir polynomial over FIELD_PRIME hiding `secret_length` bytes."""

    x: int
    y: int
    threshold: int
    secret_length: int


def share(secret: bytes, *, threshold: int, n: int) -> list[Share]:
    """Split `secret` into `n` shares, any `threshold` of which rebuild it (x = 1..n)."""
    if not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise SecAggError(f"secret must be 1 to {MAX_SECRET_BYTES} bytes, got {len(secret)}")
    if not 2 <= threshold <= n:
        raise SecAggError(f"need 2 <= threshold <= n, got threshold={threshold}, n={n}")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(FIELD_PRIME) for _ in range(threshold - 1)]
    return [Share(x, _evaluate(coefficients, x), threshold, len(secret)) for x in range(1, n + 1)]


def reconstruct(shares: Iterable[Share]) -> bytes:
    """Rebuild the secret; SecAggAbort below threshold, SecAggError for inconsistent shares."""
    by_x: dict[int, Share] = {}
    for item in shares:
        if item.y != by_x.setdefault(item.x, item).y:
            raise SecAggError(f"two different shares at x={item.x}")
    points = sorted(by_x.values(), key=lambda item: item.x)
    if not points:
        raise SecAggAbort("no shares to reconstruct from")
    threshold, length = points[0].threshold, points[0].secret_length
    if any((p.threshold, p.secret_length) != (threshold, length) for p in points):
        raise SecAggError("shares come from different sharings")
    if any(not 0 < p.x < FIELD_PRIME for p in points):
        raise SecAggError("share x outside the field")
    if len(points) < threshold:
        raise SecAggAbort(f"{len(points)} shares, {threshold} needed")
    basis = [(p.x, p.y) for p in points[:threshold]]
    # Every share past the threshold must lie on the basis' polynomial. The basis x's are
    # the same for each site's secret in a round, so the weights are computed once.
    if any(_interpolate(basis, p.x) != p.y for p in points[threshold:]):
        raise SecAggError("shares disagree: at least one is corrupt")
    secret = _interpolate(basis, 0)
    if secret >= 1 << (8 * length):
        raise SecAggError("shares do not encode a secret of the stated length")
    return secret.to_bytes(length, "big")


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    value = 0
    for coefficient in reversed(coefficients):
        value = (value * x + coefficient) % FIELD_PRIME
    return value


def _interpolate(points: Sequence[tuple[int, int]], at: int) -> int:
    """The value at `at` of the polynomial through `points` (Lagrange, mod FIELD_PRIME)."""
    weights = _lagrange_weights(tuple(x for x, _ in points), at)
    return sum(y * weight for (_, y), weight in zip(points, weights, strict=True)) % FIELD_PRIME


# One entry per point a round checks (each share's x past the basis, and 0): len(xs) numbers.
@functools.lru_cache(maxsize=512)
def _lagrange_weights(xs: tuple[int, ...], at: int) -> tuple[int, ...]:
    """w_i = prod_{j != i} (at - x_j) / (x_i - x_j) mod FIELD_PRIME, so that the value at `at`
    of the polynomial through the points (x_i, y_i) is sum_i w_i * y_i.

    O(len(xs)) given the cached `_inverse_denominators`; the products leaving out one
    factor come from prefix and suffix products, so `at` may be one of the `xs`.
    """
    if not xs:
        return ()
    differences = [(at - x) % FIELD_PRIME for x in xs]
    before, after = [1], [1]  # before[i]: the product of differences[:i]; after: from the end
    for left, right in zip(differences[:-1], reversed(differences[1:]), strict=True):
        before.append(before[-1] * left % FIELD_PRIME)
        after.append(after[-1] * right % FIELD_PRIME)
    inverses = _inverse_denominators(xs)
    return tuple(
        inverse * left * right % FIELD_PRIME
        for inverse, left, right in zip(inverses, before, reversed(after), strict=True)
    )


@functools.lru_cache(maxsize=16)
def _inverse_denominators(xs: tuple[int, ...]) -> tuple[int, ...]:
    """1 / prod_{j != i} (x_i - x_j) mod FIELD_PRIME for each x_i (ValueError for a repeated x)."""
    inverses = []
    for i, x_i in enumerate(xs):
        denominator = 1
        for j, x_j in enumerate(xs):
            if i != j:
                denominator = denominator * (x_i - x_j) % FIELD_PRIME
        inverses.append(pow(denominator, -1, FIELD_PRIME))
    return tuple(inverses)


# ---------------------------------------------------------------- protocol values


@dataclass(frozen=True)
class RoundKeys:
    """One site's secrets for one round; fresh every round, never reused."""

    site_id: str
    mask_key: X25519PrivateKey
    self_mask_seed: bytes

    @classmethod
    def generate(cls, site_id: str) -> RoundKeys:
        return cls(site_id, X25519PrivateKey.generate(), secrets.token_bytes(SEED_BYTES))

    @property
    def public_key(self) -> bytes:
        return public_key_bytes(self.mask_key)


@dataclass(frozen=True)
class HeldShares:
    """What `holder` keeps of `owner`'s round secrets: one share of each."""

    owner: str
    holder: str
    self_mask_seed: Share
    mask_key: Share | None = None
    """None where the owner sends its masked update in the message that deals the shares
    (`privacy.secagg_protocol`): a site that drops then dealt nothing, and each survivor
    reveals its own pairwise seed with it instead."""


@dataclass(frozen=True)
class UnmaskRequest:
    """The server's claim of who survived (masked update arrived) and who dropped."""

    survivors: frozenset[str]
    dropped: frozenset[str]

    def __post_init__(self) -> None:
        if both := self.survivors & self.dropped:
            raise UnsafeUnmaskError(f"sites both survived and dropped: {sorted(both)}")


@dataclass(frozen=True)
class Reveal:
    """One holder's answer: self-mask-seed shares of survivors; for dropped sites, mask-key
    shares, or the holder's own pairwise seed with each (`pairwise_seeds`)."""

    holder: str
    self_mask_seed_shares: Mapping[str, Share]
    mask_key_shares: Mapping[str, Share]
    pairwise_seeds: Mapping[str, bytes] = field(default_factory=dict)
    """The holder's seed with each dropped site that dealt no mask-key shares."""


def check_threshold(threshold: int, n_sites: int) -> None:
    """Raise unless 2 <= threshold <= n_sites; warn when 2 * threshold <= n_sites."""
    if not 2 <= threshold <= n_sites:
        raise SecAggError(f"need 2 <= threshold <= {n_sites} sites, got {threshold}")
    if 2 * threshold <= n_sites:
        warnings.warn(
            f"threshold {threshold} of {n_sites} sites: a server that lies about dropouts "
            "can unmask a site's input; use threshold > n / 2",
            WeakThresholdWarning,
            stacklevel=2,
        )


def pairwise_seeds(
    keys: RoundKeys, public_keys: Mapping[str, bytes], *, run_id: str
) -> dict[str, bytes]:
    """This site's seed with every other site that published a key this round."""
    return {
        other: shared_seed(keys.mask_key, X25519PublicKey.from_public_bytes(raw), run_id=run_id)
        for other, raw in public_keys.items()
        if other != keys.site_id
    }


def deal_shares(keys: RoundKeys, *, sites: Sequence[str], threshold: int) -> dict[str, HeldShares]:
    """Shamir-share a site's self-mask seed and mask key: one share of each per site, itself too."""
    holders = sorted(set(sites))
    if keys.site_id not in holders:
        raise SecAggError(f"site {keys.site_id!r} is not among the sites")
    check_threshold(threshold, len(holders))
    seed_shares = share(keys.self_mask_seed, threshold=threshold, n=len(holders))
    key_shares = share(private_key_bytes(keys.mask_key), threshold=threshold, n=len(holders))
    return {
        holder: HeldShares(keys.site_id, holder, seed_share, key_share)
        for holder, seed_share, key_share in zip(holders, seed_shares, key_shares, strict=True)
    }


def reveal_shares(
    holder: str, held: Mapping[str, HeldShares], *, request: UnmaskRequest, threshold: int
) -> Reveal:
    """An honest holder's answer; it reveals nothing when fewer than `threshold` sites survived."""
    if len(request.survivors) < threshold:
        raise SecAggAbort(f"{len(request.survivors)} survivors, {threshold} needed")
    unknown = (request.survivors | request.dropped) - held.keys()
    if unknown:
        raise SecAggError(f"holder {holder!r} holds no shares of {sorted(unknown)}")
    keys = {site: held[site].mask_key for site in request.dropped}
    return Reveal(
        holder,
        {site: held[site].self_mask_seed for site in request.survivors},
        {site: key for site, key in keys.items() if key is not None},
    )


# ---------------------------------------------------------------- server side


def unmask_sum(
    masked: Mapping[str, Vector],
    *,
    public_keys: Mapping[str, bytes],
    reveals: Sequence[Reveal],
    threshold: int,
    run_id: str,
    round_number: int,
    modulus: int,
) -> Vector:
    """The exact sum mod m of the survivors' encoded inputs, from their masked updates.

    Survivors are the keys of `masked`; dropped sites are those in `public_keys` without one.
    Checks every refusal and share count before reconstructing anything.
    """
    survivors, sites = set(masked), set(public_keys)
    if not survivors <= sites:
        raise SecAggError(f"masked updates from unknown sites: {sorted(survivors - sites)}")
    dropped = sites - survivors
    seed_shares = _collate(reveals, lambda reveal: reveal.self_mask_seed_shares)
    key_shares = _collate(reveals, lambda reveal: reveal.mask_key_shares)
    seeds_with = {reveal.holder: reveal.pairwise_seeds for reveal in reveals}
    paired = {site for seeds in seeds_with.values() for site in seeds}
    _refuse_unsafe(seed_shares.keys(), key_shares.keys() | paired, survivors=survivors,
                   dropped=dropped)  # fmt: skip
    if len(survivors) < threshold:
        raise SecAggAbort(f"{len(survivors)} survivors, {threshold} needed")
    for site in sorted(survivors):
        if len(seed_shares.get(site, {})) < threshold:
            raise SecAggAbort(f"fewer than {threshold} shares for site {site!r}")
    for site in sorted(dropped):
        if len(key_shares.get(site, {})) >= threshold:
            continue
        if missing := [s for s in sorted(survivors) if site not in seeds_with.get(s, {})]:
            raise SecAggAbort(
                f"fewer than {threshold} mask-key shares for dropped site {site!r}, and"
                f" {', '.join(map(repr, missing))} revealed no pairwise seed with it"
            )

    total = sum_mod((masked[site] for site in sorted(survivors)), modulus=modulus)
    flat = total.reshape(-1)
    for site in sorted(survivors):
        self_seed = reconstruct(seed_shares[site].values())
        np.subtract(flat, mask(self_seed, round_number, flat.size, modulus=modulus), out=flat)
    for site in sorted(dropped):
        key = None
        if len(key_shares.get(site, {})) >= threshold:
            key = X25519PrivateKey.from_private_bytes(reconstruct(key_shares[site].values()))
            if public_key_bytes(key) != public_keys[site]:
                raise SecAggError(f"reconstructed key of {site!r} does not match its public key")
        for survivor in sorted(survivors):
            if key is None:
                seed = seeds_with[survivor][site]  # the survivor's own seed with the site
            else:
                their_public = X25519PublicKey.from_public_bytes(public_keys[survivor])
                seed = shared_seed(key, their_public, run_id=run_id)
            pairwise = mask(seed, round_number, flat.size, modulus=modulus)
            # The survivor added PRG(s) if site > survivor and subtracted it otherwise.
            (np.subtract if site > survivor else np.add)(flat, pairwise, out=flat)
    return total & np.uint64(modulus - 1)


def _collate(
    reveals: Sequence[Reveal], pick: Callable[[Reveal], Mapping[str, Share]]
) -> dict[str, dict[int, Share]]:
    collated: dict[str, dict[int, Share]] = {}
    for reveal in reveals:
        for owner, item in pick(reveal).items():
            collated.setdefault(owner, {})[item.x] = item
    return collated


def _refuse_unsafe(
    seed_owners: Set[str], key_owners: Set[str], *, survivors: Set[str], dropped: Set[str]
) -> None:
    if both := seed_owners & key_owners:
        raise UnsafeUnmaskError(
            f"both self-mask seed and mask key (or pairwise seeds) asked of {sorted(both)}"
        )
    if survivor_keys := key_owners & survivors:
        raise UnsafeUnmaskError(
            f"mask keys or pairwise seeds asked of surviving sites {sorted(survivor_keys)}"
        )
    if dropped_seeds := seed_owners & dropped:
        raise UnsafeUnmaskError(f"self-mask seeds asked of dropped sites {sorted(dropped_seeds)}")


# ---------------------------------------------------------------- simulation


def run_round(
    inputs: Mapping[str, npt.NDArray[np.floating[Any]]],
    *,
    drop_after_masking: Set[str],
    threshold: int,
    clip: float,
    modulus: int,
    run_id: str,
    round_number: int,
) -> npt.NDArray[np.float64] | SecAggAbort:
    """Play one round in-process and return the decoded sum of the survivors' clipped inputs.

    Sites in `drop_after_masking` dealt their shares (so others masked against them) but their
    masked update never arrived and they answer nothing. `max_sites` is `len(inputs)`. An abort
    is returned, not raised, so a benchmark can count aborts.
    """
    sites = sorted(inputs)
    if not drop_after_masking <= set(sites):
        raise SecAggError(f"unknown sites dropped: {sorted(drop_after_masking - set(sites))}")
    keys = {site: RoundKeys.generate(site) for site in sites}
    public_keys = {site: keys[site].public_key for site in sites}
    dealt = {site: deal_shares(keys[site], sites=sites, threshold=threshold) for site in sites}
    masked = {
        site: mask_update(
            encode(inputs[site], clip=clip, max_sites=len(sites), modulus=modulus),
            site_id=site,
            self_mask_seed=keys[site].self_mask_seed,
            pairwise_seeds=pairwise_seeds(keys[site], public_keys, run_id=run_id),
            round_number=round_number,
            modulus=modulus,
        )
        for site in sites
        if site not in drop_after_masking
    }
    request = UnmaskRequest(frozenset(masked), frozenset(drop_after_masking))
    try:
        reveals = [
            reveal_shares(
                holder,
                {owner: dealt[owner][holder] for owner in sites},
                request=request,
                threshold=threshold,
            )
            for holder in sorted(request.survivors)
        ]
        encoded_sum = unmask_sum(
            masked,
            public_keys=public_keys,
            reveals=reveals,
            threshold=threshold,
            run_id=run_id,
            round_number=round_number,
            modulus=modulus,
        )
    except SecAggAbort as abort:
        return abort
    return decode_sum(
        encoded_sum, clip=clip, max_sites=len(sites), modulus=modulus, n_summands=len(masked)
    )
