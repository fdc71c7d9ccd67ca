"""Newton-Raphson over summed per-site terms, shared by Cox and the GLMs.

Each site returns the log-likelihood, gradient and Hessian of its own data at the
coordinator's current coefficients (`NewtonTerms`); summed over sites they are those of
the pooled (or site-stratified) model. Without DP noise `newton_fit` is the classical
maximum-likelihood fit. With noise every evaluation is a release, so the fit runs a fixed
number of steps, never compares log-likelihoods, and widens its covariance for the noise.

The noisy rule (`noisy_step`, `noisy_covariance`; a coordinator that takes one step per
exchange calls them directly). Each noisy -H is symmetrised and its eigenvalues raised
to at least ``2 sqrt(hessian_noise_var * p)``, about the noise's spectral norm, so that
it is invertible and a step never divides by noise. The final covariance is

    A^-1 + s_g (1 + s_H tr(A^-2)) A^-2

with A the last clamped -H and s_g, s_H the per-coordinate noise variances of the summed
gradient and packed Hessian: the model's covariance ``A^-1``, plus the last step's
gradient noise ``A^-1 (s_g I) A^-1``, plus the Hessian noise E acting on the previous
iterate's error d (``A^-1 E d``, whose covariance is ``s_H E||d||^2 A^-2`` with
``E||d||^2 = s_g tr(A^-2)``). First-order: it under-covers once the noise is of the size
of A's smallest eigenvalues (the clamp then shrinks the inverse).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from scipy import stats

from medfed.analysis.errors import AnalysisError
from medfed.analysis.linalg import (
    clamp_eigenvalues,
    noise_eigenvalue_floor,
    symmetric_from_upper,
    upper_of,
)

MAX_HALVINGS = 30
"""A noise-free step is halved at most this many times while the log-likelihood falls."""


@dataclass(frozen=True, eq=False)
class NewtonTerms:
    """Log-likelihood, gradient (p) and Hessian (p x p) of some data at one beta."""

    loglik: float
    gradient: np.ndarray
    hessian: np.ndarray

    def __add__(self, other: NewtonTerms) -> NewtonTerms:
        return NewtonTerms(
            self.loglik + other.loglik, self.gradient + other.gradient, self.hessian + other.hessian
        )


@dataclass(frozen=True, eq=False)
class Fit:
    """Coefficients with Wald inference; `covariance` includes the DP noise where there was."""

    beta: np.ndarray
    covariance: np.ndarray
    std_error: np.ndarray
    z: np.ndarray
    p_value: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    loglik: float
    iterations: int
    converged: bool
    level: float


def sum_terms(terms: Iterable[NewtonTerms]) -> NewtonTerms:
    """The sum of sites' terms (the pooled, or site-stratified, model's terms)."""
    items = list(terms)
    if not items:
        raise AnalysisError("no terms to sum")
    total = items[0]
    for item in items[1:]:
        total = total + item
    return total


def terms_vector(terms: NewtonTerms) -> np.ndarray:
    """The release vector of a DP Newton step: ``[gradient (p), upper(Hessian)]``, the
    Hessian packed by `upper_of` (p(p+1)/2 entries). The log-likelihood is not released."""
    return np.concatenate([terms.gradient, upper_of(terms.hessian)])


def terms_from_vector(vector: np.ndarray, p: int) -> NewtonTerms:
    """The inverse of `terms_vector`, with a NaN log-likelihood (noise added to the packed
    Hessian keeps it symmetric)."""
    if vector.shape != (p + p * (p + 1) // 2,):
        raise AnalysisError(f"a terms vector for p={p} has {p + p * (p + 1) // 2} entries")
    return NewtonTerms(float("nan"), vector[:p].copy(), symmetric_from_upper(vector[p:], p))


def project_l1(beta: np.ndarray, radius: float) -> np.ndarray:
    """The Euclidean projection of `beta` onto the ball ``||b||_1 <= radius``.

    The sort-based algorithm of Duchi, Shalev-Shwartz, Singer and Chandra (ICML 2008):
    soft-threshold every coordinate by the one theta that lands on the sphere.
    """
    if not radius > 0:
        raise AnalysisError(f"the L1 radius must be positive, got {radius}")
    magnitude = np.abs(beta)
    if magnitude.sum() <= radius:
        return beta.copy()
    ordered = np.sort(magnitude)[::-1]
    excess = np.cumsum(ordered) - radius
    ranks = np.arange(1, ordered.size + 1)
    rho = int(np.nonzero(ordered - excess / ranks > 0)[0][-1])
    theta = excess[rho] / (rho + 1)
    result: np.ndarray = np.sign(beta) * np.maximum(magnitude - theta, 0.0)
    return result


def fit_summary(
    beta: np.ndarray,
    covariance: np.ndarray,
    *,
    level: float = 0.95,
    loglik: float = float("nan"),
    iterations: int = 0,
    converged: bool = True,
    dof: float | None = None,
) -> Fit:
    """Wald standard errors, z (or t, when `dof` is given), two-sided p-values and CIs.

    Parameters
    ----------
    beta, covariance
        Estimates and their covariance.
    level
        Confidence level of the intervals.
    dof
        Residual degrees of freedom for Student-t intervals (OLS); None for normal ones.
    """
    if not 0 < level < 1:
        raise AnalysisError(f"level must be in (0, 1), got {level}")
    std_error = np.sqrt(np.maximum(np.diag(covariance), 0.0))
    ref = stats.norm if dof is None else stats.t(df=dof)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = beta / std_error
    p_value = 2 * ref.sf(np.abs(z))
    half = ref.ppf(0.5 + level / 2) * std_error
    return Fit(
        beta=beta, covariance=covariance, std_error=std_error, z=z, p_value=p_value,
        ci_low=beta - half, ci_high=beta + half, loglik=loglik, iterations=iterations,
        converged=converged, level=level,
    )  # fmt: skip


def _capped(step: np.ndarray, bound: float) -> np.ndarray:
    norm = float(np.linalg.norm(step))
    return step if norm <= bound else step * (bound / norm)


def _solve(information: np.ndarray, gradient: np.ndarray) -> np.ndarray:
    try:
        step: np.ndarray = np.linalg.solve(information, gradient)
    except np.linalg.LinAlgError as exc:
        raise AnalysisError("the information matrix is singular: fewer events than terms?") from exc
    return step


def _checked(terms: NewtonTerms, p: int) -> NewtonTerms:
    if terms.gradient.shape != (p,) or terms.hessian.shape != (p, p):
        raise AnalysisError(f"terms must have a gradient of {p} and a {p}x{p} Hessian")
    return terms


def _exact_fit(
    terms_at: Callable[[np.ndarray], NewtonTerms],
    beta: np.ndarray,
    project: Callable[[np.ndarray], np.ndarray],
    *,
    max_iterations: int,
    tolerance: float,
    step_bound: float,
) -> tuple[np.ndarray, NewtonTerms, int, bool]:
    """Newton with step halving; stops once the log-likelihood moves less than `tolerance`."""
    p = beta.size
    terms = _checked(terms_at(beta), p)
    for iteration in range(1, max_iterations + 1):
        step = _capped(_solve(-terms.hessian, terms.gradient), step_bound)
        for _ in range(MAX_HALVINGS + 1):
            candidate = project(beta + step)
            new = _checked(terms_at(candidate), p)
            if new.loglik >= terms.loglik:
                break
            step = step / 2
        change = new.loglik - terms.loglik
        beta, terms = candidate, new
        if abs(change) < tolerance:
            return beta, terms, iteration, True
    return beta, terms, max_iterations, False


@dataclass(frozen=True, eq=False)
class NoisyStep:
    """One noisy Newton step: the new beta, the clamped information (-H) it used, and
    whether `step_bound` cut the step short."""

    beta: np.ndarray
    information: np.ndarray
    capped: bool


def noisy_step(
    terms: NewtonTerms,
    beta: np.ndarray,
    *,
    hessian_noise_var: float,
    step_bound: float,
    beta_l1_bound: float | None = None,
) -> NoisyStep:
    """A Newton step from noisy terms at `beta`: -H clamped (module docstring), the step
    capped at `step_bound` in norm, and the result projected onto the L1 ball if given."""
    information = -terms.hessian
    scale = float(np.abs(np.diag(information)).mean())
    floor = max(noise_eigenvalue_floor(hessian_noise_var, beta.size), 1e-10 * scale, 1e-12)
    information = clamp_eigenvalues(information, floor)
    step = _solve(information, terms.gradient)
    capped = bool(np.linalg.norm(step) > step_bound)
    moved = beta + _capped(step, step_bound)
    if beta_l1_bound is not None:
        moved = project_l1(moved, beta_l1_bound)
    return NoisyStep(moved, information, capped)


def noisy_covariance(
    information: np.ndarray, *, gradient_noise_var: float, hessian_noise_var: float
) -> np.ndarray:
    """``A^-1 + s_g (1 + s_H tr(A^-2)) A^-2``: the model's covariance widened for the
    noise (derivation: module docstring)."""
    inverse = _solve(information, np.eye(information.shape[0]))
    squared = inverse @ inverse
    inflation = gradient_noise_var * (1.0 + hessian_noise_var * float(np.trace(squared)))
    result: np.ndarray = inverse + inflation * squared
    return result


def newton_fit(
    terms_at: Callable[[np.ndarray], NewtonTerms],
    p: int,
    *,
    max_iterations: int,
    tolerance: float = 1e-10,
    step_bound: float = 10.0,
    gradient_noise_var: float = 0.0,
    hessian_noise_var: float = 0.0,
    beta_l1_bound: float | None = None,
    level: float = 0.95,
    initial: np.ndarray | None = None,
) -> Fit:
    """Maximise a summed log-likelihood by Newton-Raphson from the terms at each beta.

    Without noise (both variances 0): a step that lowers the log-likelihood is halved (at
    most `MAX_HALVINGS` times); the fit stops once the log-likelihood changes by less than
    `tolerance`; the covariance is ``inv(-H)`` at the final beta. With noise (the caller
    adds it to what `terms_at` returns): exactly `max_iterations` calls of `terms_at`
    (that many releases), one `noisy_step` each, the log-likelihood never read, and the
    covariance `noisy_covariance` of the last release's clamped -H (one step before the
    final beta); `converged` then says whether the last step was not cut by `step_bound`.

    Parameters
    ----------
    terms_at
        Summed terms at a beta (noisy, in the DP case).
    p
        Number of coefficients.
    max_iterations
        Most (noise-free) or exact (noisy) number of Newton steps.
    tolerance
        Noise-free stopping rule on the change of the log-likelihood.
    step_bound
        Largest Euclidean norm of one step.
    gradient_noise_var, hessian_noise_var
        Per-coordinate variance of the noise on the summed gradient and packed Hessian.
    beta_l1_bound
        If given, every iterate is projected onto ``||beta||_1 <= beta_l1_bound`` (the
        Cox sensitivities hold only there).
    level
        Confidence level of the intervals.
    initial
        Starting beta (default zeros; projected like every iterate).
    """
    if max_iterations < 1 or step_bound <= 0:
        raise AnalysisError("max_iterations must be >= 1 and step_bound > 0")
    if gradient_noise_var < 0 or hessian_noise_var < 0:
        raise AnalysisError("noise variances must be >= 0")
    bound = beta_l1_bound

    def project(beta: np.ndarray) -> np.ndarray:
        return beta if bound is None else project_l1(beta, bound)

    beta = project(np.zeros(p) if initial is None else np.asarray(initial, dtype=np.float64))
    if gradient_noise_var == 0 and hessian_noise_var == 0:
        beta, terms, iterations, converged = _exact_fit(
            terms_at, beta, project,
            max_iterations=max_iterations, tolerance=tolerance, step_bound=step_bound,
        )  # fmt: skip
        return fit_summary(
            beta, _solve(-terms.hessian, np.eye(p)), level=level, loglik=terms.loglik,
            iterations=iterations, converged=converged,
        )  # fmt: skip
    for _ in range(max_iterations):
        step = noisy_step(
            _checked(terms_at(beta), p), beta, hessian_noise_var=hessian_noise_var,
            step_bound=step_bound, beta_l1_bound=bound,
        )  # fmt: skip
        beta = step.beta
    covariance = noisy_covariance(
        step.information, gradient_noise_var=gradient_noise_var,
        hessian_noise_var=hessian_noise_var,
    )  # fmt: skip
    return fit_summary(
        beta, covariance, level=level, iterations=max_iterations, converged=not step.capped
    )
