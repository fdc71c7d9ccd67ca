"""Counts, histograms, means, quantiles and 2x2 tables from noisy per-patient one-hots.

Each `*_rows` function gives one row per patient whose L2 norm is at most the stated
sensitivity, so adding or removing a patient moves the site's column sums by at most
that much; the coordinator receives the sum over sites plus Gaussian noise of variance
`noise_var` per coordinate, and the `*_from_*` functions turn it into an `Estimate`
whose interval accounts for both the sampling error and that noise. With
``noise_var = 0`` they return the pooled classical answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from medfed.analysis.errors import AnalysisError

COUNT_SENSITIVITY = 1.0
"""A count, a histogram or a 2x2 table: a patient adds 1 to exactly one cell."""

MEAN_SENSITIVITY = math.sqrt(3.0)
"""A mean's row [1, u, u^2] with u in [0, 1]."""


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its standard error and confidence interval.

    `n` is the (noisy) number of patients it rests on. For an odds ratio, `std_error` is
    that of log(OR) and the interval is exp(log(OR) +- z std_error).
    """

    value: float
    std_error: float
    ci_low: float
    ci_high: float
    n: float
    level: float


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise AnalysisError(f"level must be in (0, 1), got {level}")


def _check_range(low: float, high: float) -> None:
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise AnalysisError(f"bounds must be finite with low < high, got [{low}, {high}]")


def _check_noise(noise_var: float) -> None:
    if not (math.isfinite(noise_var) and noise_var >= 0):
        raise AnalysisError(f"noise_var must be finite and >= 0, got {noise_var}")


def _values(values: np.ndarray | list[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or not np.all(np.isfinite(array)):
        raise AnalysisError("values must be a finite 1-d array")
    return array


def histogram_rows(
    values: np.ndarray | list[float], *, low: float, high: float, bins: int
) -> np.ndarray:
    """One-hot rows over `bins` equal bins of [low, high] (values clipped into it; the last
    bin is closed). Sensitivity `COUNT_SENSITIVITY`.

    Returns
    -------
    np.ndarray
        Shape (patients, bins).
    """
    _check_range(low, high)
    if bins < 1:
        raise AnalysisError(f"bins must be >= 1, got {bins}")
    array = np.clip(_values(values), low, high)
    index = np.minimum(((array - low) / (high - low) * bins).astype(np.int64), bins - 1)
    rows = np.zeros((array.size, bins))
    rows[np.arange(array.size), index] = 1.0
    return rows


def mean_rows(values: np.ndarray | list[float], *, low: float, high: float) -> np.ndarray:
    """Rows ``[1, u, u^2]`` with ``u = (clip(v) - low) / (high - low)`` in [0, 1].
    Sensitivity `MEAN_SENSITIVITY` (sqrt 3)."""
    _check_range(low, high)
    unit = (np.clip(_values(values), low, high) - low) / (high - low)
    return np.column_stack([np.ones_like(unit), unit, unit**2])


def mean_from_sums(
    sums: np.ndarray, *, low: float, high: float, noise_var: float, level: float = 0.95
) -> Estimate:
    """The mean, on the original scale, from summed (noisy) `mean_rows`.

    The variance of the mean is the sampling one, ``s^2 / n`` (s the sample standard
    deviation), plus the noise's by the delta method, ``noise_var (1 + m^2) / n^2`` on the
    unit scale (m = s1 / n moves by ds1 / n - m ds0 / n). The interval is Student-t with
    n - 1 degrees of freedom, the classical one when there is no noise.
    """
    _check_range(low, high)
    _check_noise(noise_var)
    _check_level(level)
    s0, s1, s2 = (float(v) for v in np.asarray(sums, dtype=np.float64).reshape(3))
    if s0 <= 1:
        raise AnalysisError(f"too few patients for a mean: noisy count {s0:.1f}")
    mean = min(max(s1 / s0, 0.0), 1.0)
    sample_var = max((s2 - s0 * mean**2) / (s0 - 1), 0.0)
    var = sample_var / s0 + noise_var * (1 + mean**2) / s0**2
    width = high - low
    value, std_error = low + width * mean, width * math.sqrt(var)
    half = float(stats.t.ppf(0.5 + level / 2, df=s0 - 1)) * std_error
    return Estimate(value, std_error, value - half, value + half, s0, level)


def quantiles_from_histogram(
    counts: np.ndarray, *, low: float, high: float, probs: np.ndarray | list[float]
) -> np.ndarray:
    """Quantiles of grouped data: linear interpolation inside the bin where the cumulative
    count crosses ``prob * total`` (negative noisy counts are set to 0 first).

    Returns
    -------
    np.ndarray
        One quantile per entry of `probs`, on the original scale.
    """
    _check_range(low, high)
    levels = np.asarray(probs, dtype=np.float64)
    if np.any((levels < 0) | (levels > 1)):
        raise AnalysisError("probs must lie in [0, 1]")
    clamped = np.maximum(np.asarray(counts, dtype=np.float64), 0.0)
    total = clamped.sum()
    if clamped.ndim != 1 or total <= 0:
        raise AnalysisError("quantiles need a 1-d histogram with a positive total")
    edges = np.linspace(low, high, clamped.size + 1)
    cumulative = np.concatenate([[0.0], np.cumsum(clamped)])
    target = levels * total
    # The first bin whose cumulative count reaches the target (for 0: the first non-empty).
    index = np.where(
        target > 0,
        np.searchsorted(cumulative[1:], target, side="left"),
        np.searchsorted(cumulative[1:], 0.0, side="right"),
    )
    index = np.minimum(index, clamped.size - 1)
    inside = np.where(clamped[index] > 0, (target - cumulative[index]) / clamped[index], 0.0)
    result: np.ndarray = edges[index] + np.clip(inside, 0.0, 1.0) * (edges[1] - edges[0])
    return result


def two_by_two_rows(
    exposed: np.ndarray | list[bool], outcome: np.ndarray | list[bool]
) -> np.ndarray:
    """One-hot rows over the cells ``[a, b, c, d]`` = (exposed & outcome, exposed & not,
    unexposed & outcome, unexposed & not), so OR = ad / bc. Sensitivity 1."""
    exposure, result = np.asarray(exposed, dtype=bool), np.asarray(outcome, dtype=bool)
    if exposure.ndim != 1 or exposure.shape != result.shape:
        raise AnalysisError("exposed and outcome must be 1-d arrays of the same length")
    index = 2 * (~exposure).astype(np.int64) + (~result).astype(np.int64)
    rows = np.zeros((exposure.size, 4))
    rows[np.arange(exposure.size), index] = 1.0
    return rows


def odds_ratio(cells: np.ndarray, *, noise_var: float, level: float = 0.95) -> Estimate:
    """The sample odds ratio ad / bc with Woolf's interval, widened for the noise.

    Noisy cells are clamped at 0; if any cell is then 0, 0.5 is added to every cell
    (Haldane). Each log-cell's variance is ``(n + noise_var) / n^2`` (Poisson sampling plus
    the noise, by the delta method), so with no noise this is Woolf's
    ``sqrt(1/a + 1/b + 1/c + 1/d)``.
    """
    _check_noise(noise_var)
    _check_level(level)
    z = float(stats.norm.ppf(0.5 + level / 2))
    table = np.maximum(np.asarray(cells, dtype=np.float64).reshape(4), 0.0)
    if np.any(table <= 0):
        table = table + 0.5
    a, b, c, d = table
    log_or = math.log(a * d / (b * c))
    std_error = math.sqrt(float(np.sum((table + noise_var) / table**2)))
    return Estimate(
        math.exp(log_or), std_error, math.exp(log_or - z * std_error),
        math.exp(log_or + z * std_error), float(table.sum()), level,
    )  # fmt: skip
