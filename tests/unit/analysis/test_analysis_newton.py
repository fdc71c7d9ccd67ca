"""Newton-Raphson over summed terms, the L1 projection and the release packing."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import optimize

from medfed.analysis.errors import AnalysisError
from medfed.analysis.linalg import clamp_eigenvalues, symmetric_from_upper, upper_of
from medfed.analysis.newton import (
    NewtonTerms,
    newton_fit,
    project_l1,
    terms_from_vector,
    terms_vector,
)

finite = st.floats(-50, 50, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, st.integers(1, 8), elements=finite), st.floats(0.01, 20))
def test_project_l1_is_the_euclidean_projection(beta: np.ndarray, radius: float) -> None:
    projected = project_l1(beta, radius)
    if np.abs(beta).sum() <= radius:
        assert np.array_equal(projected, beta)
        return
    # Reference: the soft-threshold whose L1 norm is the radius, found by root search.
    theta = optimize.brentq(
        lambda t: np.maximum(np.abs(beta) - t, 0).sum() - radius, 0, np.abs(beta).max()
    )
    expected = np.sign(beta) * np.maximum(np.abs(beta) - theta, 0)
    np.testing.assert_allclose(projected, expected, atol=1e-9 * max(1.0, radius))
    assert np.abs(projected).sum() == pytest.approx(radius, rel=1e-9)


def test_packing_round_trips() -> None:
    matrix = np.array([[2.0, 1.0, 0.5], [1.0, 3.0, -1.0], [0.5, -1.0, 4.0]])
    assert np.array_equal(symmetric_from_upper(upper_of(matrix), 3), matrix)
    terms = NewtonTerms(-1.0, np.array([1.0, 2.0, 3.0]), -matrix)
    back = terms_from_vector(terms_vector(terms), 3)
    assert np.array_equal(back.gradient, terms.gradient)
    assert np.array_equal(back.hessian, terms.hessian)
    assert np.isnan(back.loglik)
    assert np.all(np.linalg.eigvalsh(clamp_eigenvalues(-matrix, 0.5)) >= 0.5 - 1e-12)


def _quadratic(center: np.ndarray, information: np.ndarray) -> Callable[[np.ndarray], NewtonTerms]:
    def terms_at(beta: np.ndarray) -> NewtonTerms:
        delta = beta - center
        return NewtonTerms(
            float(-delta @ information @ delta / 2), -information @ delta, -information
        )

    return terms_at


def test_a_quadratic_is_solved_exactly_with_its_covariance() -> None:
    center, information = np.array([1.0, -2.0]), np.array([[4.0, 1.0], [1.0, 2.0]])
    fit = newton_fit(_quadratic(center, information), 2, max_iterations=10)
    assert fit.converged and fit.iterations == 2
    np.testing.assert_allclose(fit.beta, center)
    np.testing.assert_allclose(fit.covariance, np.linalg.inv(information))
    np.testing.assert_allclose(fit.z, center / fit.std_error)


def test_steps_are_capped_and_projected() -> None:
    center, information = np.array([3.0, 4.0]), np.eye(2)
    capped = newton_fit(_quadratic(center, information), 2, max_iterations=20, step_bound=1.0)
    assert capped.iterations >= 5
    np.testing.assert_allclose(capped.beta, center, atol=1e-8)
    inside = newton_fit(_quadratic(center, information), 2, max_iterations=20, beta_l1_bound=1.0)
    assert np.abs(inside.beta).sum() == pytest.approx(1.0)


def test_a_step_that_lowers_the_likelihood_is_halved() -> None:
    def terms_at(beta: np.ndarray) -> NewtonTerms:
        root = np.sqrt(1 + beta @ beta)
        return NewtonTerms(float(-root), -beta / root, -np.eye(1) / root**3)

    fit = newton_fit(terms_at, 1, max_iterations=50, initial=np.array([2.0]), step_bound=100)
    assert fit.converged
    assert abs(fit.beta[0]) < 1e-4


def test_noisy_fit_calls_exactly_max_iterations_times_and_widens() -> None:
    center, information = np.array([1.0, -2.0]), np.array([[4.0, 1.0], [1.0, 2.0]])
    exact = _quadratic(center, information)
    calls = []

    def noisy(beta: np.ndarray) -> NewtonTerms:
        calls.append(beta)
        terms = exact(beta)
        return NewtonTerms(float("nan"), terms.gradient + 0.01, terms.hessian)

    fit = newton_fit(noisy, 2, max_iterations=4, gradient_noise_var=1e-4, hessian_noise_var=1e-4)
    assert len(calls) == 4 and fit.iterations == 4 and fit.converged
    assert np.all(fit.std_error > np.sqrt(np.diag(np.linalg.inv(information))))
    np.testing.assert_allclose(fit.beta, center + np.linalg.solve(information, [0.01, 0.01]))


def test_a_singular_information_is_reported() -> None:
    def flat(beta: np.ndarray) -> NewtonTerms:
        return NewtonTerms(0.0, np.zeros(2), np.zeros((2, 2)))

    with pytest.raises(AnalysisError):
        newton_fit(flat, 2, max_iterations=3)
    with pytest.raises(AnalysisError):
        newton_fit(flat, 2, max_iterations=0)
