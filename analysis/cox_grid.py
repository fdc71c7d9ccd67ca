"""Unstratified Cox (Efron ties) over sites, from per-time risk-set sums on a public grid.

Risk sets span sites, so a site cannot compute its share of the likelihood alone; it
releases instead, at the coordinator's beta, the `medfed.analysis.cox.RiskSums` of its
patients at every point of a public grid of times, and the summed sums give the pooled
Efron terms exactly. Each time is mapped to the grid point at or below it. When the grid
holds every distinct event time (for integer days, every day from 0 to the horizon), the
result is the classical unstratified Cox fit; on a coarser grid, events are grouped into
the grid's intervals (a grouped-time approximation, with ties handled by Efron's rule).

Layout of `cox_grid_sums`: for each grid point k, ``cox_grid_width(p)`` numbers
``[d, sum_events x (p), S0, S1 (p), upper(S2) (p(p+1)/2), D0, D1 (p), upper(D2)]``, the
packed matrices as `medfed.analysis.linalg.upper_of` packs them; grid points one after
another (a row-major (K, width) matrix, flattened).
"""

from __future__ import annotations

import math

import numpy as np

from medfed.analysis.cox import RiskSums, efron_terms, risk_sums, survival_arrays
from medfed.analysis.errors import AnalysisError
from medfed.analysis.linalg import scaled_covariates, symmetric_from_upper, upper_of
from medfed.analysis.newton import NewtonTerms


def cox_grid_width(p: int) -> int:
    """Numbers per grid point in `cox_grid_sums` for p covariates."""
    return 1 + p + 2 * (1 + p + p * (p + 1) // 2)


def _grid(grid: np.ndarray | list[float]) -> np.ndarray:
    points = np.asarray(grid, dtype=np.float64)
    if points.ndim != 1 or points.size < 1 or np.any(np.diff(points) <= 0):
        raise AnalysisError("the grid must be a non-empty increasing 1-d array of times")
    return points


def cox_grid_sums(
    x: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    beta: np.ndarray,
    *,
    grid: np.ndarray | list[float],
) -> np.ndarray:
    """One site's risk-set sums on the public `grid` at `beta` (layout: module docstring).

    Parameters
    ----------
    x
        Covariates scaled to [-1, 1], shape (patients, p).
    time, event
        Follow-up times and whether each ended in the event; every event time must be at
        or after ``grid[0]`` (a censoring before it is simply never at risk).
    beta
        Coefficients (p) on the scaled axis.
    grid
        The public, increasing times (K).

    Returns
    -------
    np.ndarray
        ``K * cox_grid_width(p)`` numbers; sensitivity `cox_grid_sensitivity`.
    """
    points = _grid(grid)
    times, events = survival_arrays(time, event)
    covariates = scaled_covariates(x, times.size)
    coefficients = np.asarray(beta, dtype=np.float64)
    if coefficients.shape != (covariates.shape[1],):
        raise AnalysisError(f"beta must have {covariates.shape[1]} entries")
    if np.any(times[events] < points[0]):
        raise AnalysisError("an event time lies before the grid's first point")
    sums = risk_sums(covariates, times, events, coefficients, grid=points)
    columns = [
        sums.deaths[:, None], sums.event_x, sums.s0[:, None], sums.s1, upper_of(sums.s2),
        sums.d0[:, None], sums.d1, upper_of(sums.d2),
    ]  # fmt: skip
    return np.concatenate(columns, axis=1).ravel()


def cox_terms_from_grid(
    sums: np.ndarray, *, p: int, grid_size: int, beta: np.ndarray
) -> NewtonTerms:
    """The pooled Efron terms at `beta` (the beta the sites used) from summed
    `cox_grid_sums`; noisy sums are handled as `medfed.analysis.cox.efron_terms` says."""
    width, q = cox_grid_width(p), p * (p + 1) // 2
    vector = np.asarray(sums, dtype=np.float64)
    if vector.shape != (grid_size * width,):
        raise AnalysisError(f"expected {grid_size * width} grid sums, got {vector.shape}")
    table = vector.reshape(grid_size, width)
    cuts = np.cumsum([1, p, 1, p, q, 1, p])
    d, ex, s0, s1, s2, d0, d1, d2 = np.split(table, cuts, axis=1)
    risk = RiskSums(
        deaths=d[:, 0], event_x=ex, s0=s0[:, 0], s1=s1, s2=symmetric_from_upper(s2, p),
        d0=d0[:, 0], d1=d1, d2=symmetric_from_upper(d2, p),
    )  # fmt: skip
    return efron_terms(risk, np.asarray(beta, dtype=np.float64))


def cox_grid_sensitivity(p: int, *, grid_size: int, beta_l1_bound: float) -> float:
    """L2 sensitivity of `cox_grid_sums` (add or remove one patient, x in [-1, 1]^p,
    ``||beta||_1 <= beta_l1_bound`` so that ``w = exp(x'b) <= e^B``).

    The patient adds 1 to one d and x (norm <= sqrt p) to one event sum; the block
    ``(w, w x, w upper(x x'))``, of squared norm <= ``w^2 (1 + p + p(p+1)/2)``, to the
    risk-set sums of at most `grid_size` points and to one tied-event sum. Hence
    ``sqrt(1 + p + (K + 1) e^(2B) (1 + p + p(p+1)/2))``.
    """
    block = 1 + p + p * (p + 1) / 2
    return math.sqrt(1 + p + (grid_size + 1) * math.exp(2 * beta_l1_bound) * block)
