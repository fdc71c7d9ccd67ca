"""Logistic and linear regression over sites, against scikit-learn, numpy and the
classical formulas, and the coverage of the DP-noisy logistic fit's intervals."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression

from medfed.analysis.errors import AnalysisError
from medfed.analysis.glm import (
    linear_fit_from_sums,
    linear_rows,
    linear_sensitivity,
    linear_sums,
    logistic_gradient_sensitivity,
    logistic_hessian_sensitivity,
    logistic_site_terms,
    with_intercept,
)
from medfed.analysis.mechanism import gaussian_noise
from medfed.analysis.newton import (
    Fit,
    NewtonTerms,
    newton_fit,
    sum_terms,
    terms_from_vector,
    terms_vector,
)

FEATURES = [1, 4, 8]
"""Mean texture, smoothness and symmetry: a well-conditioned three-covariate model."""
LOW, HIGH = np.array([5.0, 0.05, 0.1]), np.array([40.0, 0.17, 0.31])
"""Public bounds of those features."""


@pytest.fixture(scope="module")
def cancer() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Scaled covariates, the outcome (1 = benign) and three sites' row indices."""
    data = load_breast_cancer()
    x = (data.data[:, FEATURES] - (LOW + HIGH) / 2) / ((HIGH - LOW) / 2)
    return x, data.target.astype(np.float64), np.array_split(np.arange(x.shape[0]), 3)


def _logistic_fit(x: np.ndarray, y: np.ndarray, sites: list[np.ndarray]) -> Fit:
    def terms_at(beta: np.ndarray) -> NewtonTerms:
        return sum_terms(logistic_site_terms(x[s], y[s], beta) for s in sites)

    return newton_fit(terms_at, x.shape[1] + 1, max_iterations=50)


def test_logistic_equals_scikit_learn(
    cancer: tuple[np.ndarray, np.ndarray, list[np.ndarray]],
) -> None:
    x, y, sites = cancer
    fit = _logistic_fit(x, y, sites)
    reference = LogisticRegression(C=np.inf, solver="newton-cholesky", tol=1e-12, max_iter=1000)
    reference.fit(x, y)
    expected = np.concatenate([reference.intercept_, reference.coef_[0]])
    assert fit.converged
    np.testing.assert_allclose(fit.beta, expected, rtol=1e-5, atol=1e-7)


def test_logistic_errors_are_the_inverse_fisher_information(
    cancer: tuple[np.ndarray, np.ndarray, list[np.ndarray]],
) -> None:
    x, y, sites = cancer
    fit = _logistic_fit(x, y, sites)
    beta = fit.beta
    design = np.column_stack([np.ones(x.shape[0]), x])
    prob = 1 / (1 + np.exp(-design @ beta))
    information = design.T @ (design * (prob * (1 - prob))[:, None])
    expected = np.sqrt(np.diag(np.linalg.inv(information)))
    np.testing.assert_allclose(fit.std_error, expected, rtol=1e-10)
    z = stats.norm.ppf(0.975)
    np.testing.assert_allclose(fit.ci_high, beta + z * expected, rtol=1e-9)


def test_logistic_per_patient_terms_respect_the_sensitivities() -> None:
    rng = np.random.default_rng(0)
    p = 4
    x = rng.choice([-1.0, 1.0], size=(200, p))
    y = rng.integers(0, 2, 200).astype(np.float64)
    beta = rng.normal(0, 3, p + 1)
    for i in range(x.shape[0]):
        one = logistic_site_terms(x[i : i + 1], y[i : i + 1], beta)
        assert np.linalg.norm(one.gradient) <= logistic_gradient_sensitivity(p) + 1e-12
        assert np.linalg.norm(one.hessian) <= logistic_hessian_sensitivity(p) + 1e-12


def test_unscaled_covariates_are_refused() -> None:
    with pytest.raises(AnalysisError):
        with_intercept(np.array([[0.5], [1.5]]))


def test_linear_equals_least_squares_and_the_classical_errors(
    cancer: tuple[np.ndarray, np.ndarray, list[np.ndarray]],
) -> None:
    x, _, sites = cancer
    outcome = load_breast_cancer().data[:, 0]  # mean radius, scaled by bounds [5, 30]
    y = (outcome - 17.5) / 12.5
    sums = sum(linear_sums(x[s], y[s]) for s in sites)
    fit = linear_fit_from_sums(np.asarray(sums), 3, noise_var=0.0)
    design = with_intercept(x)
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    np.testing.assert_allclose(fit.beta, beta, rtol=1e-9, atol=1e-12)
    residual = y - design @ beta
    dof = design.shape[0] - design.shape[1]
    covariance = residual @ residual / dof * np.linalg.inv(design.T @ design)
    np.testing.assert_allclose(fit.std_error, np.sqrt(np.diag(covariance)), rtol=1e-8)
    half = stats.t.ppf(0.975, dof) * fit.std_error
    np.testing.assert_allclose(fit.ci_low, beta - half, rtol=1e-8, atol=1e-12)


def test_linear_rows_respect_their_sensitivity() -> None:
    rng = np.random.default_rng(1)
    x = rng.choice([-1.0, 1.0], size=(50, 3))
    rows = linear_rows(x, rng.choice([-1.0, 1.0], size=50))
    assert np.linalg.norm(rows, axis=1).max() == pytest.approx(linear_sensitivity(3))


def test_noisy_linear_fit_stays_usable_and_widens(
    cancer: tuple[np.ndarray, np.ndarray, list[np.ndarray]],
) -> None:
    x, y, _ = cancer
    sums = linear_rows(x, 2 * y - 1).sum(axis=0)
    exact = linear_fit_from_sums(sums, 3, noise_var=0.0)
    rng = np.random.default_rng(2)
    noisy = linear_fit_from_sums(sums + gaussian_noise(sums.shape, 5.0, rng), 3, noise_var=25.0)
    assert np.all(np.isfinite(noisy.std_error))
    assert np.all(noisy.std_error > exact.std_error)
    assert np.all(np.linalg.eigvalsh(noisy.covariance) > 0)


def test_noisy_logistic_intervals_cover_the_exact_fit(
    cancer: tuple[np.ndarray, np.ndarray, list[np.ndarray]],
) -> None:
    """Three sites, noise multiplier 1 on each release, 10 DP Newton steps: the 95%
    intervals, which include the noise, cover the noise-free estimate in >= 90% of draws."""
    x, y, sites = cancer
    exact = _logistic_fit(x, y, sites).beta
    p, z = 3, 1.0
    gradient_std, hessian_std = (
        z * logistic_gradient_sensitivity(p),
        z * logistic_hessian_sensitivity(p),
    )
    rng = np.random.default_rng(5)

    def noisy_terms(beta: np.ndarray) -> NewtonTerms:
        total = np.zeros(p + 1 + (p + 1) * (p + 2) // 2)
        for s in sites:
            noise = np.concatenate(
                [
                    gaussian_noise(p + 1, gradient_std, rng),
                    gaussian_noise(total.size - p - 1, hessian_std, rng),
                ]
            )
            total += terms_vector(logistic_site_terms(x[s], y[s], beta)) + noise
        return terms_from_vector(total, p + 1)

    covered = []
    for _ in range(100):
        fit = newton_fit(
            noisy_terms, p + 1, max_iterations=10,
            gradient_noise_var=len(sites) * gradient_std**2,
            hessian_noise_var=len(sites) * hessian_std**2,
        )  # fmt: skip
        covered.append((fit.ci_low <= exact) & (exact <= fit.ci_high))
    assert np.all(np.mean(covered, axis=0) >= 0.9)
