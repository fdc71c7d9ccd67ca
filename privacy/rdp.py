"""Renyi DP of the Poisson-subsampled Gaussian mechanism, vectorised over the orders.

The same series as Opacus's `opacus.accountants.analysis.rdp` (Mironov, Talwar & Zhang
2019, section 3.3), term for term and in the same order, but computed for all of
Opacus's default orders at once with numpy instead of one Python loop per order: a
site's epsilon and noise calibration evaluate it many times a round, and Opacus's
per-order loops took about 90% of a site's warm round. Results equal Opacus's up to
floating-point rounding (numpy's and libm's `exp`/`log` may differ in the last bit);
`tests/unit/privacy/test_privacy_rdp.py` checks that on a grid.

Pure maths: numpy and scipy only, no torch, no accountant state.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numpy.typing import NDArray
from scipy import special

from medfed.privacy.errors import AccountingError

ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
"""Opacus's `RDPAccountant.DEFAULT_ALPHAS`, the orders epsilon is optimised over."""

_ORDERS = np.array(ORDERS, dtype=np.float64)
_IS_INT = np.array([float(a).is_integer() for a in ORDERS])
_MAX_TERMS = 100_000
"""A series that has not converged after this many terms is refused, never looped on."""

Vector = NDArray[np.float64]


def _log_add(logx: Vector, logy: Vector) -> Vector:
    """log(exp(x) + exp(y)) elementwise, as Opacus's `_log_add` computes it."""
    low, high = np.minimum(logx, logy), np.maximum(logx, logy)
    with np.errstate(invalid="ignore"):
        summed = np.log1p(np.exp(low - high)) + high
    return np.where(low == -np.inf, high, summed)


def _log_sub(logx: Vector, logy: Vector) -> Vector:
    """log(exp(x) - exp(y)) elementwise, as Opacus's `_log_sub` computes it (which raises
    where the difference would be negative, and keeps x where exp overflows)."""
    if np.any(logx < logy):
        raise AccountingError("RDP series: the result of subtraction must be non-negative")
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        diff = np.log(np.expm1(logx - logy)) + logy
    diff = np.where(np.isinf(diff) & (diff > 0), logx, diff)
    diff = np.where(logx == logy, -np.inf, diff)
    return np.where(logy == -np.inf, logx, diff)


def _log_a_int(q: float, sigma: float, alphas: Vector) -> Vector:
    """log(A_alpha) for integer orders: a finite binomial sum, all orders at once."""
    log_a = np.full(alphas.shape, -np.inf)
    for i in range(int(alphas.max()) + 1):
        live = alphas >= i
        with np.errstate(divide="ignore"):
            log_coef = np.log(special.binom(alphas, i)) + i * math.log(q)
        log_coef = log_coef + (alphas - i) * math.log(1 - q)
        term = log_coef + (i * i - i) / (2 * (sigma**2))
        log_a = np.where(live, _log_add(log_a, np.where(live, term, -np.inf)), log_a)
    return log_a


def _log_erfc(x: Vector) -> Vector:
    return math.log(2) + special.log_ndtr(-x * 2**0.5)  # type: ignore[no-any-return]


def _frac_terms(
    q: float, sigma: float, alphas: Vector, i: NDArray[np.float64]
) -> tuple[Vector, Vector, NDArray[np.bool_]]:
    """Terms i of Opacus's series for fractional orders (rows: orders, columns: i), as
    (log s0, log s1, whether the binomial coefficient is positive)."""
    a, i = alphas[:, None], i[None, :]
    coef = special.binom(a, i)
    log_coef = np.log(np.abs(coef))
    j = a - i
    log_t0 = log_coef + i * math.log(q) + j * math.log(1 - q)
    log_t1 = log_coef + j * math.log(q) + i * math.log(1 - q)
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
    log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
    log_s0 = log_t0 + (i * i - i) / (2 * (sigma**2)) + log_e0
    log_s1 = log_t1 + (j * j - j) / (2 * (sigma**2)) + log_e1
    return log_s0, log_s1, coef > 0


def _signed_log_sum(log_terms: Vector, positive: NDArray[np.bool_]) -> Vector:
    """log(sum of +exp(t) where positive, -exp(t) elsewhere) per row: the positive and
    negative parts summed apart (each a log-sum-exp), then subtracted once."""
    plus = special.logsumexp(np.where(positive, log_terms, -np.inf), axis=1)
    minus = special.logsumexp(np.where(positive, -np.inf, log_terms), axis=1)
    return _log_sub(np.asarray(plus), np.asarray(minus))


def _log_a_frac(q: float, sigma: float, alphas: Vector) -> Vector:
    """log(A_alpha) for fractional orders: Opacus's series, each order's terms up to and
    including its first term below e^-30 (where Opacus stops), computed in blocks of
    terms for all orders at once."""
    block = 256
    s0_blocks: list[Vector] = []
    s1_blocks: list[Vector] = []
    sign_blocks: list[NDArray[np.bool_]] = []
    stop = np.full(alphas.shape, -1)
    for first in range(0, _MAX_TERMS, block):
        # Later blocks only for the orders still converging: a few need many terms.
        pending = np.flatnonzero(stop < 0)
        log_s0 = np.full((alphas.size, block), -np.inf)
        log_s1 = np.full((alphas.size, block), -np.inf)
        positive = np.ones((alphas.size, block), dtype=bool)
        log_s0[pending], log_s1[pending], positive[pending] = _frac_terms(
            q, sigma, alphas[pending], np.arange(first, first + block, dtype=np.float64)
        )
        s0_blocks.append(log_s0)
        s1_blocks.append(log_s1)
        sign_blocks.append(positive)
        small = np.maximum(log_s0[pending], log_s1[pending]) < -30
        found = small.any(axis=1)
        stop[pending[found]] = first + np.argmax(small[found], axis=1)
        if (stop >= 0).all():
            break
    else:
        raise AccountingError(f"the RDP series did not converge at q={q:g}, sigma={sigma:g}")
    kept = np.arange(len(s0_blocks) * block)[None, :] <= stop[:, None]
    positive = np.concatenate(sign_blocks, axis=1)
    log_s0 = np.where(kept, np.concatenate(s0_blocks, axis=1), -np.inf)
    log_s1 = np.where(kept, np.concatenate(s1_blocks, axis=1), -np.inf)
    return _log_add(_signed_log_sum(log_s0, positive), _signed_log_sum(log_s1, positive))


@functools.lru_cache(maxsize=4096)
def rdp_per_step(sample_rate: float, noise_multiplier: float) -> Vector:
    """RDP of one step at each of `ORDERS` (read-only): what Opacus's
    `compute_rdp(q=sample_rate, noise_multiplier=..., steps=1, orders=ORDERS)` returns.

    Memoised: a pure function of two numbers, asked again for every past event whenever
    a site's epsilon or noise is computed.
    """
    if not (0 < sample_rate <= 1 and noise_multiplier > 0):
        raise AccountingError(
            f"no RDP for sample rate {sample_rate:g} and noise {noise_multiplier:g}"
        )
    if sample_rate == 1.0:
        rdp = _ORDERS / (2 * noise_multiplier**2)
    else:
        log_a = np.empty(_ORDERS.shape)
        log_a[_IS_INT] = _log_a_int(sample_rate, noise_multiplier, _ORDERS[_IS_INT])
        log_a[~_IS_INT] = _log_a_frac(sample_rate, noise_multiplier, _ORDERS[~_IS_INT])
        rdp = log_a / (_ORDERS - 1)
    rdp.setflags(write=False)
    return rdp
