"""Cox proportional hazards, Efron's ties (lifelines' default), stratified by site.

Each site computes the Efron partial log-likelihood of its own patients, as its own
stratum, with its gradient and Hessian (`cox_site_terms`); summed over sites these are
the terms of the site-stratified Cox model, which `medfed.analysis.newton.newton_fit`
maximises. The same per-time risk-set sums (`RiskSums`) also feed the unstratified,
grid-based form in `medfed.analysis.cox_grid`.

Efron's likelihood, for a time with d tied events and l = 0..d-1:
``phi_l = S0 - (l/d) D0``, ``loglik += sum_events x'b - sum_l log phi_l``,
``gradient += sum_events x - sum_l (S1 - (l/d) D1) / phi_l``,
``hessian -= sum_l [(S2 - (l/d) D2) / phi_l - Z_l Z_l' / phi_l^2]``, where S0, S1, S2 sum
w, w x, w x x' (w = exp(x'b)) over the risk set and D0, D1, D2 over the tied events.

Sensitivity of a site's terms (`cox_gradient_sensitivity`, `cox_hessian_sensitivity`).
Setting: add or remove one patient a; covariates in [-1, 1]^p, so two points differ by
at most the box's diameter ``2 sqrt(p)`` and a weighted covariance has trace <= p;
``||beta||_1 <= B`` (`newton_fit` projects every iterate there), so every weight
``w = exp(x'b)`` lies in [e^-B, e^B] and ``kappa = e^(2B)`` bounds a ratio of weights.

Efron's terms are a sum over "slots" (one per event), each a weighted mean (gradient:
x_i minus it) or weighted covariance (Hessian: minus it) of the risk set. Removing a:

1. a's own slot, if a had the event: ``||x_a - mean|| <= 2 sqrt(p)``; the covariance
   it removes has ``||C||_F <= tr C <= p``.
2. Every other slot whose risk set held a: its weights lose a's. Ranking the other
   events' slots from the last, the j-th has an effective risk set of >= j others
   (itself and every later event, tied ones counted at Efron's (1 - l/d) share), so a's
   share of its weight, the total-variation distance TV between its weightings before
   and after, is ``<= e^B / (j e^-B + e^B) = kappa / (j + kappa)``.
3. If a is one of d tied events, the other tied events' Efron shares change from l/d
   to l/(d-1): slot l's TV grows by at most ``l / ((d-1)(d-l)) <= 1 / (d - l)``, in all
   at most ``H_(d-1) - 1 <= H_N - 1`` (harmonic numbers).

A weighted mean moves by <= 2 sqrt(p) TV. A weighted covariance ``E[x x'] - m m'``
moves by <= ``sqrt(2) p TV`` (difference of two PSD second moments of norm <= p) plus
``4 p TV`` (``||m m' - n n'|| <= ||m - n|| (||m|| + ||n||)`` with ``||m - n|| <= 2 sqrt(p)
TV``), so by ``(4 + sqrt 2) p TV``. Summing over at most N = `max_patients` events, with
``K_N = sum_(j=1..N) kappa / (j + kappa) = kappa (psi(N + kappa + 1) - psi(kappa + 1))``:

    gradient:  2 sqrt(p) (1 + K_N + H_N - 1)
    Hessian:   p (1 + (4 + sqrt 2) (K_N + H_N - 1))      (Frobenius norm)

Without ties (Breslow and Efron agree) the H_N - 1 terms can be dropped; they are kept
so that the bounds hold for any data. They grow like ``kappa log N``: loose, but safe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special

from medfed.analysis.errors import AnalysisError
from medfed.analysis.linalg import scaled_covariates
from medfed.analysis.newton import NewtonTerms

_COVARIANCE_FACTOR = 4.0 + math.sqrt(2.0)
"""How far a weighted covariance on [-1, 1]^p moves, per unit of p and of TV distance."""


@dataclass(frozen=True, eq=False)
class RiskSums:
    """Per-time sums on a grid of K times (p covariates): the number of events `deaths`
    (K) and their covariates' sum `event_x` (K, p); over the risk set (time >= t) `s0`
    (K), `s1` (K, p), `s2` (K, p, p); over the events at t `d0`, `d1`, `d2`."""

    deaths: np.ndarray
    event_x: np.ndarray
    s0: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    d0: np.ndarray
    d1: np.ndarray
    d2: np.ndarray


def survival_arrays(
    time: np.ndarray | list[float], event: np.ndarray | list[bool]
) -> tuple[np.ndarray, np.ndarray]:
    """`time` as finite floats and `event` as booleans, checked to be 1-d and aligned."""
    times, events = np.asarray(time, dtype=np.float64), np.asarray(event, dtype=bool)
    if times.ndim != 1 or events.shape != times.shape or not np.all(np.isfinite(times)):
        raise AnalysisError("time and event must be finite 1-d arrays of the same length")
    return times, events


def _per_time(values: np.ndarray, index: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, *values.shape[1:]))
    np.add.at(out, index, values)
    return out


def risk_sums(
    x: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    beta: np.ndarray,
    *,
    grid: np.ndarray,
    shift: float = 0.0,
) -> RiskSums:
    """The `RiskSums` of these patients on `grid` (sorted), each time mapped to the grid
    point at or below it (patients below ``grid[0]`` are at risk nowhere); weights are
    ``exp(x'b - shift)``. With a grid holding every event time, this is exact."""
    index = np.searchsorted(grid, time, side="right") - 1
    keep, size = index >= 0, grid.size
    weight = np.exp(x @ beta - shift)
    blocks = (weight, weight[:, None] * x, weight[:, None, None] * x[:, :, None] * x[:, None, :])
    at_risk = [np.cumsum(_per_time(b[keep], index[keep], size)[::-1], axis=0)[::-1] for b in blocks]
    died = keep & event
    tied = [_per_time(b[died], index[died], size) for b in blocks]
    return RiskSums(
        deaths=_per_time(np.ones(int(died.sum())), index[died], size),
        event_x=_per_time(x[died], index[died], size),
        s0=at_risk[0], s1=at_risk[1], s2=at_risk[2], d0=tied[0], d1=tied[1], d2=tied[2],
    )  # fmt: skip


def efron_terms(sums: RiskSums, beta: np.ndarray, *, shift: float = 0.0) -> NewtonTerms:
    """Efron's partial log-likelihood, gradient and Hessian from `RiskSums`.

    Noisy death counts are rounded to whole numbers >= 0 (Efron's slots need them), and
    a slot whose noisy phi is not positive is dropped; without noise nothing changes.
    `shift` undoes the weights' shift in the log-likelihood.
    """
    deaths = np.rint(np.maximum(sums.deaths, 0.0)).astype(np.int64)
    slot_time = np.repeat(np.arange(deaths.size), deaths)
    first = np.repeat(np.cumsum(deaths) - deaths, deaths)
    fraction = (np.arange(slot_time.size) - first) / np.maximum(deaths[slot_time], 1)
    phi = sums.s0[slot_time] - fraction * sums.d0[slot_time]
    valid = phi > 0
    slot_time, fraction, phi = slot_time[valid], fraction[valid], phi[valid]
    z = sums.s1[slot_time] - fraction[:, None] * sums.d1[slot_time]
    m = sums.s2[slot_time] - fraction[:, None, None] * sums.d2[slot_time]
    event_x = sums.event_x.sum(axis=0)
    loglik = float(event_x @ beta - np.log(phi).sum() - shift * phi.size)
    gradient = event_x - (z / phi[:, None]).sum(axis=0)
    mean = z / phi[:, None]
    hessian = -(m / phi[:, None, None]).sum(axis=0) + mean.T @ mean
    return NewtonTerms(loglik, gradient, hessian)


def cox_site_terms(
    x: np.ndarray, time: np.ndarray, event: np.ndarray, beta: np.ndarray
) -> NewtonTerms:
    """Efron terms of one site's patients as their own stratum, at `beta`.

    Parameters
    ----------
    x
        Covariates scaled to [-1, 1], shape (patients, p).
    time, event
        Follow-up times and whether each ended in the event.
    beta
        Coefficients (p) on the scaled axis.

    Returns
    -------
    NewtonTerms
        Summed over sites: the site-stratified Cox model's terms.
    """
    times, events = survival_arrays(time, event)
    covariates = scaled_covariates(x, times.size)
    coefficients = np.asarray(beta, dtype=np.float64)
    p = covariates.shape[1]
    if coefficients.shape != (p,):
        raise AnalysisError(f"beta must have {p} entries, got shape {coefficients.shape}")
    if not events.any():
        return NewtonTerms(0.0, np.zeros(p), np.zeros((p, p)))
    shift = float((covariates @ coefficients).max())
    grid = np.unique(times[events])
    sums = risk_sums(covariates, times, events, coefficients, grid=grid, shift=shift)
    return efron_terms(sums, coefficients, shift=shift)


def _check(p: int, beta_l1_bound: float, max_patients: int) -> None:
    if p < 1 or max_patients < 1 or not (math.isfinite(beta_l1_bound) and beta_l1_bound >= 0):
        raise AnalysisError("need p >= 1, max_patients >= 1 and a finite beta_l1_bound >= 0")


def risk_set_share_sum(*, beta_l1_bound: float, max_patients: int) -> float:
    """``K_N = sum_(j=1..N) kappa / (j + kappa)`` with ``kappa = exp(2 B)``: the summed
    bound on one patient's share of the risk sets of N events."""
    kappa = math.exp(2 * beta_l1_bound)
    return float(kappa * (special.digamma(max_patients + kappa + 1) - special.digamma(kappa + 1)))


def _ties_term(max_patients: int) -> float:
    """``H_N - 1``, the bound on Efron's reweighting of a's tied events."""
    return float(special.digamma(max_patients + 1) + np.euler_gamma - 1)


def cox_gradient_sensitivity(p: int, *, beta_l1_bound: float, max_patients: int) -> float:
    """L2 bound on one patient's effect on a site's Cox gradient (derivation: module
    docstring): ``2 sqrt(p) (1 + K_N + H_N - 1)``.

    Parameters
    ----------
    p
        Number of covariates (each scaled to [-1, 1]).
    beta_l1_bound
        B, with every released beta in ``||beta||_1 <= B``.
    max_patients
        N, a public bound on the patients (hence events) at the site.
    """
    _check(p, beta_l1_bound, max_patients)
    shares = risk_set_share_sum(beta_l1_bound=beta_l1_bound, max_patients=max_patients)
    return 2 * math.sqrt(p) * (1 + shares + _ties_term(max_patients))


def cox_hessian_sensitivity(p: int, *, beta_l1_bound: float, max_patients: int) -> float:
    """Frobenius bound on one patient's effect on a site's Cox Hessian (derivation:
    module docstring): ``p (1 + (4 + sqrt 2) (K_N + H_N - 1))``. It bounds the L2 norm
    of the released upper triangle too. Arguments as `cox_gradient_sensitivity`."""
    _check(p, beta_l1_bound, max_patients)
    shares = risk_set_share_sum(beta_l1_bound=beta_l1_bound, max_patients=max_patients)
    return p * (1 + _COVARIANCE_FACTOR * (shares + _ties_term(max_patients)))
