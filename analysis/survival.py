"""Kaplan-Meier curves and the log-rank test from binned, noisy event and censoring counts.

A public grid ``edges`` (increasing, ``edges[0] = 0``) defines K bins ``[e_k, e_k+1)``;
the last bin also takes every time at or beyond ``edges[-1]``. Each patient adds 1 to
exactly one count, its group's events or censorings in its bin, so a site's counts have
L2 sensitivity `COUNT_SENSITIVITY` (1). At-risk in bin k is everyone whose bin is k or
later: on a grid with one distinct time per bin this is the classical estimator; on a
coarser grid, a grouped-time one (deaths and censorings in a bin count as at risk at
its start).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from medfed.analysis.errors import AnalysisError

MONTE_CARLO_DRAWS = 400
"""Redraws of the noise used to measure its effect on a Kaplan-Meier curve."""

RELIABLE_AT_RISK_SDS = 2.0
"""A bin's noisy at-risk count below this many standard deviations of its noise says
nothing reliable about survival there: its band becomes [0, the last reliable upper]."""


@dataclass(frozen=True, eq=False)
class KmCurve:
    """One group's Kaplan-Meier curve: ``survival[k]`` is S through the end of bin k,
    shown from the bin's start ``times[k]``; the band is pointwise at `level`.
    `reliable` is False where the noisy at-risk count is within `RELIABLE_AT_RISK_SDS`
    noise standard deviations of 0 (always True without noise)."""

    times: np.ndarray
    survival: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    at_risk: np.ndarray
    events: np.ndarray
    reliable: np.ndarray
    level: float


@dataclass(frozen=True)
class LogRank:
    """The log-rank chi-square statistic, its degrees of freedom and p-value."""

    statistic: float
    dof: int
    p_value: float


def _edges(edges: np.ndarray | Sequence[float]) -> np.ndarray:
    grid = np.asarray(edges, dtype=np.float64)
    if grid.ndim != 1 or grid.size < 2 or grid[0] != 0 or np.any(np.diff(grid) <= 0):
        raise AnalysisError("edges must be increasing, start at 0 and hold at least 2 points")
    return grid


def survival_rows(
    time: np.ndarray | Sequence[float],
    event: np.ndarray | Sequence[bool],
    group: np.ndarray | Sequence[object] | None = None,
    *,
    edges: np.ndarray | Sequence[float],
    groups: Sequence[object] | None = None,
) -> np.ndarray:
    """One-hot rows over ``[events (G x K), censored (G x K)]``, each block group-major.

    Parameters
    ----------
    time, event
        Follow-up time (>= 0) and whether it ended in the event.
    group, groups
        Each patient's group label and the public list of labels (both None: one group).
    edges
        The public grid (K + 1 points).

    Returns
    -------
    np.ndarray
        Shape (patients, 2 G K); sensitivity 1 (`split_survival_sums` undoes the layout).
    """
    grid = _edges(edges)
    times = np.asarray(time, dtype=np.float64)
    died = np.asarray(event, dtype=bool)
    if times.ndim != 1 or died.shape != times.shape:
        raise AnalysisError("time and event must be 1-d arrays of the same length")
    if not np.all(np.isfinite(times)) or np.any(times < 0):
        raise AnalysisError("times must be finite and >= 0")
    labels: Sequence[object] = [None] if groups is None else groups
    index = np.zeros(times.size, dtype=np.int64)
    if groups is not None:
        member = np.asarray(group, dtype=object)
        if member.shape != times.shape:
            raise AnalysisError("group must give one label per patient")
        found = np.zeros(times.size, dtype=bool)
        for position, label in enumerate(labels):
            matches = member == label
            index[matches], found[matches] = position, True
        if not np.all(found):
            raise AnalysisError("every patient's group must be one of the public groups")
    n_bins = grid.size - 1
    bins = np.clip(np.searchsorted(grid, times, side="right") - 1, 0, n_bins - 1)
    column = (~died).astype(np.int64) * len(labels) * n_bins + index * n_bins + bins
    rows = np.zeros((times.size, 2 * len(labels) * n_bins))
    rows[np.arange(times.size), column] = 1.0
    return rows


def split_survival_sums(
    sums: np.ndarray, *, n_groups: int, n_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """The (events, censored) count matrices, each (G, K), of summed `survival_rows`."""
    vector = np.asarray(sums, dtype=np.float64)
    if vector.shape != (2 * n_groups * n_bins,):
        raise AnalysisError(f"expected {2 * n_groups * n_bins} sums, got {vector.shape}")
    halves = vector.reshape(2, n_groups, n_bins)
    return halves[0].copy(), halves[1].copy()


def _at_risk(events: np.ndarray, censored: np.ndarray) -> np.ndarray:
    """Everyone whose bin is this one or later (last axis), from the noisy counts as they
    are (clamping each count first would bias it upwards), but never below the deaths."""
    total = np.cumsum((events + censored)[..., ::-1], axis=-1)[..., ::-1]
    result: np.ndarray = np.maximum(total, np.maximum(events, 0.0))
    return result


def _kaplan_meier(events: np.ndarray, censored: np.ndarray) -> np.ndarray:
    """S per bin (last axis), deaths clamped at 0 and hazards at 1: non-increasing, in
    [0, 1]."""
    deaths = np.maximum(events, 0.0)
    at_risk = _at_risk(events, censored)
    hazard = np.divide(deaths, at_risk, out=np.zeros_like(deaths), where=at_risk > 0)
    result: np.ndarray = np.cumprod(1.0 - np.minimum(hazard, 1.0), axis=-1)
    return result


def _greenwood_sum(deaths: np.ndarray, at_risk: np.ndarray) -> np.ndarray:
    """Greenwood's running sum of d / (n (n - d)), skipping bins where everyone died."""
    denominator = at_risk * (at_risk - deaths)
    terms = np.divide(deaths, denominator, out=np.zeros_like(deaths), where=denominator > 0)
    result: np.ndarray = np.cumsum(terms)
    return result


def _noise_variance(
    events: np.ndarray, censored: np.ndarray, noise_var: float, rng: np.random.Generator
) -> np.ndarray:
    """Variance of S per bin when fresh noise of `noise_var` is added to the noisy counts
    again (a parametric bootstrap of the mechanism, `MONTE_CARLO_DRAWS` draws)."""
    if noise_var == 0:
        return np.zeros(events.shape)
    redraw = rng.normal(0.0, math.sqrt(noise_var), size=(MONTE_CARLO_DRAWS, 2, events.size))
    curves = _kaplan_meier(events + redraw[:, 0], censored + redraw[:, 1])
    result: np.ndarray = curves.var(axis=0, ddof=1)
    return result


def _band(
    survival: np.ndarray, greenwood: np.ndarray, noise_var_s: np.ndarray, z: float
) -> tuple[np.ndarray, np.ndarray]:
    """Log-log (exponential Greenwood) band, its variance widened by the noise's variance
    of S through the delta method d log(-log S) = dS / (S log S); where S is 0 or 1 and
    only the noise spreads it, a plain normal band clipped to [0, 1]."""
    interior = (survival > 0) & (survival < 1)
    safe_s = np.where(interior, survival, 0.5)
    log_s = np.log(safe_s)
    spread = z * np.sqrt(greenwood / log_s**2 + noise_var_s / (safe_s * log_s) ** 2)
    with np.errstate(over="ignore"):  # a huge spread: S ** inf is 0, the band's floor
        lower = np.where(interior, safe_s ** np.exp(spread), survival)
        upper = np.where(interior, safe_s ** np.exp(-spread), survival)
    edge = ~interior & (noise_var_s > 0)
    normal = z * np.sqrt(noise_var_s)
    lower = np.where(edge, np.clip(survival - normal, 0.0, 1.0), lower)
    upper = np.where(edge, np.clip(survival + normal, 0.0, 1.0), upper)
    return lower, upper


def _unreliable_band(
    lower: np.ndarray, upper: np.ndarray, reliable: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """[0, the upper bound at the last reliable bin] where a bin is unreliable: S cannot
    have risen since then, and the noise hides where it fell to."""
    last = np.maximum.accumulate(np.where(reliable, np.arange(reliable.size), -1))
    carried = np.where(last >= 0, upper[np.maximum(last, 0)], 1.0)
    return np.where(reliable, lower, 0.0), np.where(reliable, upper, carried)


def _count_matrices(events: np.ndarray, censored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    deaths, lost = np.asarray(events, dtype=np.float64), np.asarray(censored, dtype=np.float64)
    if deaths.ndim != 2 or deaths.shape != lost.shape:
        raise AnalysisError("events and censored must be (groups, bins) matrices of one shape")
    return deaths, lost


def km_from_counts(
    events: np.ndarray,
    censored: np.ndarray,
    *,
    edges: np.ndarray | Sequence[float],
    noise_var: float,
    level: float = 0.95,
    seed: int = 0,
) -> list[KmCurve]:
    """Kaplan-Meier curves, one per group, with pointwise bands that include the noise.

    At-risk counts are sums of the noisy counts (unbiased; floored at the deaths), deaths
    are clamped at 0 and hazards d / n at 1, so every curve is non-increasing in [0, 1].
    The band's variance is Greenwood's plus that of S under fresh noise of `noise_var`
    (Monte Carlo with a generator seeded by `seed`, so the answer is reproducible); with
    no noise it is lifelines' exponential-Greenwood band. Where the at-risk count is
    within `RELIABLE_AT_RISK_SDS` noise standard deviations of 0 (the tail, under noise)
    the band is widened to [0, the last reliable upper bound].

    Parameters
    ----------
    events, censored
        Summed (noisy) counts, shape (groups, bins).
    edges
        The grid the sites binned on (bins + 1 points).
    noise_var
        Per-count variance of the summed noise (n_sites * noise_std**2).
    level
        Pointwise confidence level.
    seed
        Seed of the Monte Carlo redraws.
    """
    grid = _edges(edges)
    deaths, lost = _count_matrices(events, censored)
    if deaths.shape[1] != grid.size - 1 or not 0 < level < 1 or not noise_var >= 0:
        raise AnalysisError("counts must have one column per bin; level in (0, 1); noise >= 0")
    z = float(stats.norm.ppf(0.5 + level / 2))
    rng = np.random.default_rng(seed)
    curves = []
    counts_behind = 2.0 * np.arange(deaths.shape[1], 0, -1)
    for group_events, group_censored in zip(deaths, lost, strict=True):
        clamped = np.maximum(group_events, 0.0)
        at_risk = _at_risk(group_events, group_censored)
        survival = _kaplan_meier(group_events, group_censored)
        noise_var_s = _noise_variance(group_events, group_censored, noise_var, rng)
        lower, upper = _band(survival, _greenwood_sum(clamped, at_risk), noise_var_s, z)
        reliable = at_risk >= RELIABLE_AT_RISK_SDS * np.sqrt(noise_var * counts_behind)
        lower, upper = _unreliable_band(lower, upper, reliable)
        curves.append(
            KmCurve(grid[:-1].copy(), survival, lower, upper, at_risk, clamped, reliable, level)
        )
    return curves


def logrank_from_counts(
    events: np.ndarray, censored: np.ndarray, *, noise_var: float = 0.0
) -> LogRank:
    """The G-group log-rank test: ``U' V^-1 U`` over the first G - 1 groups, with U the
    observed minus expected events and V the hypergeometric covariance summed over bins,
    referred to chi-square with G - 1 degrees of freedom.

    At-risk counts are sums of the noisy counts (floored at the deaths) and deaths are
    clamped at 0. With `noise_var` (per count) the covariance of U gains the noise's own:
    U_g moves by sum_k (e_gk - s_gk sum_h e_hk) for noise e on the deaths, whose
    covariance is ``noise_var * sum_k (delta_gh - s_gk - s_hk + G' s_gk s_hk)`` (G' the
    number of groups, s the at-risk shares); the noise on the at-risk counts is left out
    (second order). Without noise the test is lifelines' exactly.
    """
    noisy_deaths, lost = _count_matrices(events, censored)
    n_groups = noisy_deaths.shape[0]
    if n_groups < 2:
        raise AnalysisError("the log-rank test compares at least 2 groups")
    at_risk, deaths = _at_risk(noisy_deaths, lost), np.maximum(noisy_deaths, 0.0)
    total_at_risk, total_deaths = at_risk.sum(axis=0), deaths.sum(axis=0)
    share = np.divide(at_risk, total_at_risk, out=np.zeros_like(at_risk), where=total_at_risk > 0)
    observed_minus_expected = (deaths - total_deaths * share).sum(axis=1)
    several = total_at_risk > 1
    factor = np.divide(
        total_deaths * (total_at_risk - total_deaths),
        total_at_risk - 1,
        out=np.zeros_like(total_deaths),
        where=several,
    )
    weighted = share * factor
    covariance = np.diag(weighted.sum(axis=1)) - (weighted @ share.T)
    if noise_var > 0:
        row_sums = share.sum(axis=1)
        covariance = covariance + noise_var * (
            share.shape[1] * np.eye(n_groups)
            - row_sums[:, None]
            - row_sums[None, :]
            + n_groups * (share @ share.T)
        )
    head = observed_minus_expected[:-1]
    try:
        statistic = float(head @ np.linalg.solve(covariance[:-1, :-1], head))
    except np.linalg.LinAlgError as exc:
        raise AnalysisError(
            "the log-rank covariance is singular: a group with no one at risk?"
        ) from exc
    dof = n_groups - 1
    return LogRank(statistic, dof, float(stats.chi2.sf(statistic, dof)))
