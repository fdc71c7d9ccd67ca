"""Kaplan-Meier and log-rank from binned counts, against lifelines on its lung data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines import KaplanMeierFitter
from lifelines.datasets import load_lung
from lifelines.statistics import logrank_test, multivariate_logrank_test

from medfed.analysis.errors import AnalysisError
from medfed.analysis.mechanism import gaussian_noise
from medfed.analysis.survival import (
    km_from_counts,
    logrank_from_counts,
    split_survival_sums,
    survival_rows,
)


@pytest.fixture(scope="module")
def lung() -> pd.DataFrame:
    """lifelines' lung data: integer days, status 1 = died, 0 = censored."""
    return load_lung()


def _counts(
    df: pd.DataFrame, edges: np.ndarray, column: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    groups = None if column is None else sorted(df[column].unique())
    group = None if column is None else df[column].to_numpy()
    rows = survival_rows(
        df["time"].to_numpy(), df["status"].to_numpy() == 1, group, edges=edges, groups=groups
    )
    n_groups = 1 if groups is None else len(groups)
    return split_survival_sums(rows.sum(axis=0), n_groups=n_groups, n_bins=edges.size - 1)


def _daily_edges(df: pd.DataFrame) -> np.ndarray:
    return np.arange(0, df["time"].max() + 2, dtype=np.float64)


def test_rows_are_one_hot_and_beyond_the_last_edge_goes_to_the_last_bin() -> None:
    rows = survival_rows([0.5, 2.0, 9.0], [True, False, True], edges=[0, 1, 2, 3])
    assert rows.shape == (3, 6)
    assert np.array_equal(rows.sum(axis=1), np.ones(3))
    assert rows[0, 0] == 1 and rows[1, 3 + 2] == 1 and rows[2, 2] == 1


def test_unknown_group_and_bad_edges_are_refused() -> None:
    with pytest.raises(AnalysisError):
        survival_rows([1.0], [True], ["c"], edges=[0, 1, 2], groups=["a", "b"])
    with pytest.raises(AnalysisError):
        survival_rows([1.0], [True], edges=[1, 2])


def test_kaplan_meier_equals_lifelines_on_an_exact_grid(lung: pd.DataFrame) -> None:
    times = np.unique(np.concatenate([[0.0], lung["time"].to_numpy(dtype=np.float64)]))
    edges = np.append(times, times[-1] + 1)
    events, censored = _counts(lung, edges)
    (curve,) = km_from_counts(events, censored, edges=edges, noise_var=0.0)
    reference = KaplanMeierFitter().fit(lung["time"], lung["status"] == 1)
    expected = reference.survival_function_.loc[curve.times].to_numpy()[:, 0]
    np.testing.assert_allclose(curve.survival, expected, rtol=0, atol=1e-10)
    band = reference.confidence_interval_.loc[curve.times].to_numpy()
    np.testing.assert_allclose(curve.lower, band[:, 0], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(curve.upper, band[:, 1], rtol=1e-8, atol=1e-12)


def test_kaplan_meier_on_a_daily_grid_equals_lifelines(lung: pd.DataFrame) -> None:
    edges = _daily_edges(lung)
    events, censored = _counts(lung, edges, "sex")
    curves = km_from_counts(events, censored, edges=edges, noise_var=0.0)
    for sex, curve in zip((1, 2), curves, strict=True):
        part = lung[lung["sex"] == sex]
        reference = KaplanMeierFitter().fit(part["time"], part["status"] == 1)
        expected = reference.survival_function_at_times(curve.times).to_numpy()
        np.testing.assert_allclose(curve.survival, expected, atol=1e-10)


def test_logrank_equals_lifelines_two_groups(lung: pd.DataFrame) -> None:
    events, censored = _counts(lung, _daily_edges(lung), "sex")
    result = logrank_from_counts(events, censored)
    male, female = lung[lung["sex"] == 1], lung[lung["sex"] == 2]
    reference = logrank_test(male["time"], female["time"], male["status"], female["status"])
    assert result.dof == 1
    assert result.statistic == pytest.approx(reference.test_statistic, rel=1e-8, abs=1e-8)
    assert result.p_value == pytest.approx(reference.p_value, rel=1e-8, abs=1e-12)


def test_logrank_equals_lifelines_several_groups(lung: pd.DataFrame) -> None:
    data = lung.dropna(subset=["ph.ecog"])
    data = data[data["ph.ecog"] < 3]
    events, censored = _counts(data, _daily_edges(data), "ph.ecog")
    result = logrank_from_counts(events, censored)
    reference = multivariate_logrank_test(data["time"], data["ph.ecog"], data["status"])
    assert result.dof == 2
    assert result.statistic == pytest.approx(reference.test_statistic, rel=1e-8, abs=1e-8)
    assert result.p_value == pytest.approx(reference.p_value, rel=1e-8, abs=1e-12)


def test_noisy_curves_stay_monotone_in_the_unit_interval(lung: pd.DataFrame) -> None:
    edges = np.arange(0, 1100, 50, dtype=np.float64)
    events, censored = _counts(lung, edges, "sex")
    rng = np.random.default_rng(3)
    noisy_events = events + gaussian_noise(events.shape, 3.0, rng)
    noisy_censored = censored + gaussian_noise(censored.shape, 3.0, rng)
    for curve in km_from_counts(noisy_events, noisy_censored, edges=edges, noise_var=9.0):
        assert np.all(np.diff(curve.survival) <= 0)
        assert np.all((curve.lower >= 0) & (curve.lower <= curve.survival + 1e-12))
        assert np.all((curve.upper <= 1) & (curve.upper >= curve.survival - 1e-12))


def test_noisy_bands_cover_the_noise_free_curve(lung: pd.DataFrame) -> None:
    """Sites' noise (3 sites, std 2 each) on 30-day bins: the bands, which also carry the
    sampling error, cover the noise-free curve at most grid points in most draws."""
    edges = np.arange(0, 1050, 30, dtype=np.float64)
    events, censored = _counts(lung, edges)
    (truth,) = km_from_counts(events, censored, edges=edges, noise_var=0.0)
    noise_var = 3 * 2.0**2
    rng = np.random.default_rng(11)
    covered = []
    for draw in range(100):
        noisy_e = events + gaussian_noise(events.shape, noise_var**0.5, rng)
        noisy_c = censored + gaussian_noise(censored.shape, noise_var**0.5, rng)
        (curve,) = km_from_counts(noisy_e, noisy_c, edges=edges, noise_var=noise_var, seed=draw)
        inside = (curve.lower <= truth.survival + 1e-12) & (truth.survival <= curve.upper + 1e-12)
        covered.append(inside.mean())
    fractions = np.array(covered)
    assert fractions.mean() >= 0.95
    assert np.mean(fractions >= 0.9) >= 0.9
