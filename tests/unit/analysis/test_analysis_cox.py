"""Cox regression over sites (Efron ties), against lifelines on its lung data, and the
sensitivity bounds against the largest change one patient makes on random data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.datasets import load_lung

from medfed.analysis.cox import cox_gradient_sensitivity, cox_hessian_sensitivity, cox_site_terms
from medfed.analysis.cox_grid import (
    cox_grid_sensitivity,
    cox_grid_sums,
    cox_grid_width,
    cox_terms_from_grid,
)
from medfed.analysis.errors import AnalysisError
from medfed.analysis.newton import Fit, NewtonTerms, newton_fit, sum_terms

BOUNDS = {"age": (30.0, 90.0), "sex": (1.0, 2.0), "ph.ecog": (0.0, 3.0)}
COVARIATES = list(BOUNDS)
TIGHT = {"precision": 1e-12, "r_precision": 1e-15}
"""lifelines stops by default once the log-likelihood changes by < 1e-9 relative, which
leaves its coefficients ~1e-5 from the maximum; run it to convergence instead."""


@pytest.fixture(scope="module")
def lung() -> pd.DataFrame:
    """Complete cases of the covariates, scaled to [-1, 1]; status 1 = died."""
    df = load_lung()[["inst", "time", "status", *COVARIATES]].dropna()
    for column, (low, high) in BOUNDS.items():
        df[column] = (df[column] - (low + high) / 2) / ((high - low) / 2)
    return df


def _sites(df: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [
        (site[COVARIATES].to_numpy(), site["time"].to_numpy(), site["status"].to_numpy() == 1)
        for _, site in df.groupby("inst")
    ]


def _check_against(fit: Fit, reference: CoxPHFitter) -> None:
    assert fit.converged
    np.testing.assert_allclose(fit.beta, reference.params_[COVARIATES].to_numpy(), rtol=1e-6)
    expected = reference.standard_errors_[COVARIATES].to_numpy()
    np.testing.assert_allclose(fit.std_error, expected, rtol=1e-5)
    assert fit.loglik == pytest.approx(reference.log_likelihood_, rel=1e-9)


def test_stratified_by_site_equals_lifelines_strata(lung: pd.DataFrame) -> None:
    sites = _sites(lung)

    def terms_at(beta: np.ndarray) -> NewtonTerms:
        return sum_terms(cox_site_terms(x, t, e, beta) for x, t, e in sites)

    fit = newton_fit(terms_at, 3, max_iterations=50)
    reference = CoxPHFitter().fit(
        lung, "time", "status", strata=["inst"], fit_options=TIGHT
    )  # fmt: skip
    _check_against(fit, reference)


def test_grid_sums_give_the_unstratified_fit_of_lifelines(lung: pd.DataFrame) -> None:
    sites = _sites(lung)
    grid = np.arange(0, lung["time"].max() + 1, dtype=np.float64)

    def terms_at(beta: np.ndarray) -> NewtonTerms:
        total = sum(cox_grid_sums(x, t, e, beta, grid=grid) for x, t, e in sites)
        return cox_terms_from_grid(np.asarray(total), p=3, grid_size=grid.size, beta=beta)

    fit = newton_fit(terms_at, 3, max_iterations=50)
    reference = CoxPHFitter().fit(lung.drop(columns="inst"), "time", "status", fit_options=TIGHT)
    _check_against(fit, reference)


def test_one_site_on_its_event_times_equals_its_stratum_terms(lung: pd.DataFrame) -> None:
    x, t, e = _sites(lung)[0]
    beta = np.array([0.3, -0.5, 0.8])
    grid = np.unique(t[e])
    sums = cox_grid_sums(x, t, e, beta, grid=grid)
    assert sums.size == grid.size * cox_grid_width(3)
    from_grid = cox_terms_from_grid(sums, p=3, grid_size=grid.size, beta=beta)
    direct = cox_site_terms(x, t, e, beta)
    assert from_grid.loglik == pytest.approx(direct.loglik, rel=1e-12)
    np.testing.assert_allclose(from_grid.gradient, direct.gradient, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(from_grid.hessian, direct.hessian, rtol=1e-10, atol=1e-12)


def test_gradient_and_hessian_are_the_derivatives_of_the_loglik(lung: pd.DataFrame) -> None:
    x, t, e = lung[COVARIATES].to_numpy(), lung["time"].to_numpy(), lung["status"] == 1
    beta, step = np.array([0.2, -0.4, 0.7]), 1e-5
    terms = cox_site_terms(x, t, e.to_numpy(), beta)
    for i in range(3):
        shift = np.eye(3)[i] * step
        up = cox_site_terms(x, t, e.to_numpy(), beta + shift)
        down = cox_site_terms(x, t, e.to_numpy(), beta - shift)
        assert (up.loglik - down.loglik) / (2 * step) == pytest.approx(terms.gradient[i], rel=1e-6)
        numeric = (up.gradient - down.gradient) / (2 * step)
        np.testing.assert_allclose(numeric, terms.hessian[i], rtol=1e-6, atol=1e-8)


def test_events_before_the_grid_and_unscaled_covariates_are_refused() -> None:
    x, beta = np.zeros((2, 1)), np.zeros(1)
    with pytest.raises(AnalysisError):
        cox_grid_sums(x, np.array([1.0, 5.0]), np.array([True, True]), beta, grid=[2.0, 5.0])
    with pytest.raises(AnalysisError):
        cox_site_terms(np.array([[2.0], [0.0]]), np.array([1.0, 2.0]), np.ones(2, bool), beta)


def _largest_changes(seed: int, n: int, p: int, radius: float) -> tuple[float, float]:
    """The largest change in a site's gradient (L2) and Hessian (Frobenius) from removing
    any one patient, on random data with many ties and extreme covariates."""
    rng = np.random.default_rng(seed)
    x = rng.choice([-1.0, 1.0], size=(n, p)) * rng.uniform(0.5, 1.0, size=(n, p))
    time = rng.integers(1, 6, n).astype(np.float64)
    event = rng.random(n) < 0.8
    beta = rng.normal(size=p)
    beta *= radius / np.abs(beta).sum()
    full = cox_site_terms(x, time, event, beta)
    gradient_change = hessian_change = 0.0
    for i in range(n):
        keep = np.arange(n) != i
        less = cox_site_terms(x[keep], time[keep], event[keep], beta)
        gradient_change = max(gradient_change, float(np.linalg.norm(full.gradient - less.gradient)))
        hessian_change = max(hessian_change, float(np.linalg.norm(full.hessian - less.hessian)))
    return gradient_change, hessian_change


@pytest.mark.parametrize(
    ("seed", "n", "p", "radius"), [(0, 30, 2, 1.0), (1, 12, 3, 2.0), (2, 6, 1, 3.0)]
)
def test_one_patient_never_moves_the_terms_beyond_the_bounds(
    seed: int, n: int, p: int, radius: float
) -> None:
    gradient_change, hessian_change = _largest_changes(seed, n, p, radius)
    assert gradient_change <= cox_gradient_sensitivity(p, beta_l1_bound=radius, max_patients=n)
    assert hessian_change <= cox_hessian_sensitivity(p, beta_l1_bound=radius, max_patients=n)


def test_small_random_sites_never_exceed_the_bounds() -> None:
    """Small sites (2 to 8 patients), where the bounds are least loose."""
    for seed in range(150):
        rng = np.random.default_rng(1000 + seed)
        n, p, radius = int(rng.integers(2, 9)), int(rng.integers(1, 4)), float(rng.uniform(0, 3))
        gradient_change, hessian_change = _largest_changes(seed, n, p, radius)
        assert gradient_change <= cox_gradient_sensitivity(p, beta_l1_bound=radius, max_patients=n)
        assert hessian_change <= cox_hessian_sensitivity(p, beta_l1_bound=radius, max_patients=n)


def test_grid_sums_respect_their_sensitivity() -> None:
    rng = np.random.default_rng(3)
    x = rng.choice([-1.0, 1.0], size=(20, 2))
    time, event = rng.integers(0, 10, 20).astype(np.float64), rng.random(20) < 0.7
    beta, grid = np.array([0.7, -0.3]), np.arange(10, dtype=np.float64)
    bound = cox_grid_sensitivity(2, grid_size=grid.size, beta_l1_bound=1.0)
    full = cox_grid_sums(x, time, event, beta, grid=grid)
    for i in range(20):
        keep = np.arange(20) != i
        less = cox_grid_sums(x[keep], time[keep], event[keep], beta, grid=grid)
        assert np.linalg.norm(full - less) <= bound


def test_dp_newton_stays_in_the_l1_ball(lung: pd.DataFrame) -> None:
    sites = _sites(lung)
    rng = np.random.default_rng(4)

    def noisy(beta: np.ndarray) -> NewtonTerms:
        terms = sum_terms(cox_site_terms(x, t, e, beta) for x, t, e in sites)
        return NewtonTerms(
            float("nan"), terms.gradient + rng.normal(0, 1.0, 3), terms.hessian
        )  # fmt: skip

    fit = newton_fit(
        noisy, 3, max_iterations=6, gradient_noise_var=1.0, hessian_noise_var=1e-6,
        beta_l1_bound=1.2,
    )  # fmt: skip
    assert np.abs(fit.beta).sum() <= 1.2 + 1e-12
    assert np.all(np.isfinite(fit.std_error))
