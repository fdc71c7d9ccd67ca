"""Logistic and linear regression over sites, with an intercept that this module adds.

Callers pass covariates scaled to [-1, 1] (p columns) and, for linear regression, an
outcome scaled to [-1, 1]; every function here prepends the intercept column of ones,
so coefficient vectors have p + 1 entries, the intercept first, on the scaled axes.

Logistic regression is fitted by `medfed.analysis.newton.newton_fit` on the summed
`logistic_site_terms`. Linear regression needs one release: the sufficient statistics
X'X, X'y and y'y, from which `linear_fit_from_sums` solves ordinary least squares.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from medfed.analysis.errors import AnalysisError
from medfed.analysis.linalg import (
    clamp_eigenvalues,
    noise_eigenvalue_floor,
    scaled_covariates,
    symmetric_from_upper,
    upper_of,
)
from medfed.analysis.newton import Fit, NewtonTerms, fit_summary


def with_intercept(x: np.ndarray) -> np.ndarray:
    """Scaled covariates (patients, p) with a leading column of ones: (patients, p + 1)."""
    covariates = scaled_covariates(x)
    return np.column_stack([np.ones(covariates.shape[0]), covariates])


def _outcome(y: np.ndarray | list[float], n: int, *, low: float, high: float) -> np.ndarray:
    values = np.asarray(y, dtype=np.float64)
    if values.shape != (n,) or not np.all(np.isfinite(values)):
        raise AnalysisError(f"the outcome must be a finite vector of {n} values")
    if np.any((values < low) | (values > high)):
        raise AnalysisError(f"the outcome must lie in [{low:g}, {high:g}]")
    return values


def logistic_site_terms(x: np.ndarray, y: np.ndarray, beta: np.ndarray) -> NewtonTerms:
    """Log-likelihood, gradient and Hessian of one site's logistic regression at `beta`.

    ``loglik = sum y eta - log(1 + e^eta)``, ``gradient = X'(y - pi)``,
    ``Hessian = -X' diag(pi (1 - pi)) X`` with ``eta = X beta``, X with the intercept.

    Parameters
    ----------
    x
        Covariates scaled to [-1, 1], shape (patients, p).
    y
        Outcomes, 0 or 1.
    beta
        Coefficients (p + 1), intercept first.
    """
    design = with_intercept(x)
    outcome = _outcome(y, design.shape[0], low=0.0, high=1.0)
    coefficients = np.asarray(beta, dtype=np.float64)
    if coefficients.shape != (design.shape[1],):
        raise AnalysisError(f"beta must have {design.shape[1]} entries (intercept first)")
    eta = design @ coefficients
    prob = special.expit(eta)
    loglik = float(np.sum(outcome * eta - np.logaddexp(0.0, eta)))
    gradient = design.T @ (outcome - prob)
    hessian = -(design.T * (prob * (1 - prob))) @ design
    return NewtonTerms(loglik, gradient, hessian)


def logistic_gradient_sensitivity(p: int) -> float:
    """One patient's gradient ``(y - pi) x~`` has norm <= ``sqrt(p + 1)`` (|y - pi| <= 1,
    ``||x~||^2 <= 1 + p`` with the intercept)."""
    return math.sqrt(p + 1)


def logistic_hessian_sensitivity(p: int) -> float:
    """One patient's Hessian ``pi (1 - pi) x~ x~'`` has Frobenius norm
    ``pi (1 - pi) ||x~||^2 <= (p + 1) / 4``."""
    return (p + 1) / 4


def linear_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-patient rows ``[upper(x~ x~'), x~ y, y^2]`` (x~ with the intercept, `upper_of`
    packing): summed, X'X (whose first entry is the count), X'y and y'y.

    `y` must be scaled to [-1, 1] by public bounds; sensitivity `linear_sensitivity`.
    """
    design = with_intercept(x)
    outcome = _outcome(y, design.shape[0], low=-1.0, high=1.0)
    outer = upper_of(design[:, :, None] * design[:, None, :])
    return np.column_stack([outer, design * outcome[:, None], outcome**2])


def linear_sums(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One site's release for linear regression: the column sums of `linear_rows`."""
    result: np.ndarray = linear_rows(x, y).sum(axis=0)
    return result


def linear_sensitivity(p: int) -> float:
    """L2 norm bound of a `linear_rows` row: every entry of ``upper(x~ x~')`` is at most 1
    in size ((p + 1)(p + 2)/2 of them), ``||x~ y||^2 <= p + 1`` and ``y^4 <= 1``, so
    ``sqrt((p + 1)(p + 2)/2 + p + 2)``."""
    return math.sqrt((p + 1) * (p + 2) / 2 + p + 2)


def linear_fit_from_sums(sums: np.ndarray, p: int, *, noise_var: float, level: float = 0.95) -> Fit:
    """Ordinary least squares from summed (noisy) `linear_rows`.

    ``beta = (X'X)^-1 X'y``, ``sigma^2 = RSS / (n - p - 1)`` with
    ``RSS = y'y - 2 beta'X'y + beta'X'X beta`` (floored at 0) and n = X'X[0, 0]; the
    covariance is ``sigma^2 (X'X)^-1`` with Student-t intervals, the classical ones
    without noise. With noise, X'X's eigenvalues are raised to at least
    ``2 sqrt(noise_var (p + 1))`` (about the noise's spectral norm) so it stays positive
    definite, and the covariance adds the noise's by the delta method: with
    ``d beta = A^-1 (d b - d A beta)`` and independent noise on the packed entries,
    ``noise_var A^-1 [(1 + ||beta||^2) I + beta beta' - diag(beta^2)] A^-1``.
    """
    dim, q = p + 1, (p + 1) * (p + 2) // 2
    vector = np.asarray(sums, dtype=np.float64)
    if vector.shape != (q + dim + 1,):
        raise AnalysisError(f"expected {q + dim + 1} linear sums for p={p}, got {vector.shape}")
    if not (math.isfinite(noise_var) and noise_var >= 0):
        raise AnalysisError(f"noise_var must be finite and >= 0, got {noise_var}")
    gram = symmetric_from_upper(vector[:q], dim)
    cross, yy, n = vector[q : q + dim], float(vector[-1]), float(gram[0, 0])
    if n <= dim:
        raise AnalysisError(f"too few patients for {dim} coefficients: count {n:.1f}")
    if noise_var > 0:
        gram = clamp_eigenvalues(gram, noise_eigenvalue_floor(noise_var, dim))
    try:
        inverse = np.linalg.inv(gram)
    except np.linalg.LinAlgError as exc:
        raise AnalysisError("X'X is singular: a constant or duplicated covariate?") from exc
    beta = inverse @ cross
    rss = max(yy - 2 * beta @ cross + beta @ gram @ beta, 0.0)
    covariance = rss / (n - dim) * inverse
    if noise_var > 0:
        middle = (1 + beta @ beta) * np.eye(dim) + np.outer(beta, beta) - np.diag(beta**2)
        covariance = covariance + noise_var * inverse @ middle @ inverse
    return fit_summary(beta, covariance, level=level, dof=n - dim)
