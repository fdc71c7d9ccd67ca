"""Counts, histograms, means, quantiles and odds ratios: classical answers without noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.stats.contingency import odds_ratio as scipy_odds_ratio

from medfed.analysis.errors import AnalysisError
from medfed.analysis.mechanism import gaussian_noise
from medfed.analysis.tables import (
    COUNT_SENSITIVITY,
    MEAN_SENSITIVITY,
    histogram_rows,
    mean_from_sums,
    mean_rows,
    odds_ratio,
    quantiles_from_histogram,
    two_by_two_rows,
)


def test_gaussian_noise_is_zero_without_std_and_seeded_otherwise() -> None:
    assert np.array_equal(gaussian_noise((2, 3), 0.0), np.zeros((2, 3)))
    first = gaussian_noise(1000, 2.0, np.random.default_rng(4))
    assert np.array_equal(first, gaussian_noise(1000, 2.0, np.random.default_rng(4)))
    assert first.std() == pytest.approx(2.0, rel=0.1)
    assert gaussian_noise(3, 1.0).shape == (3,)
    with pytest.raises(AnalysisError):
        gaussian_noise(3, -1.0)


def test_histogram_rows_sum_to_numpy_histogram_with_clipping() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(50, 20, 500)
    rows = histogram_rows(values, low=0, high=100, bins=10)
    expected, _ = np.histogram(np.clip(values, 0, 100), bins=10, range=(0, 100))
    assert np.array_equal(rows.sum(axis=0), expected)
    assert np.all(np.linalg.norm(rows, axis=1) == COUNT_SENSITIVITY)


def test_mean_equals_the_classical_t_interval() -> None:
    rng = np.random.default_rng(1)
    values = rng.uniform(20, 80, 300)
    rows = mean_rows(values, low=10, high=90)
    assert np.linalg.norm(rows, axis=1).max() <= MEAN_SENSITIVITY
    estimate = mean_from_sums(rows.sum(axis=0), low=10, high=90, noise_var=0.0)
    sem = stats.sem(values)
    low, high = stats.t.interval(0.95, values.size - 1, loc=values.mean(), scale=sem)
    assert estimate.value == pytest.approx(values.mean(), rel=1e-12)
    assert estimate.std_error == pytest.approx(sem, rel=1e-9)
    assert (estimate.ci_low, estimate.ci_high) == pytest.approx((low, high), rel=1e-9)
    assert estimate.n == 300


def test_noisy_mean_is_wider_and_too_few_patients_are_refused() -> None:
    values = np.linspace(0, 1, 100)
    sums = mean_rows(values, low=0, high=1).sum(axis=0)
    exact = mean_from_sums(sums, low=0, high=1, noise_var=0.0)
    noisy = mean_from_sums(sums, low=0, high=1, noise_var=9.0)
    assert noisy.std_error**2 == pytest.approx(exact.std_error**2 + 9.0 * 1.25 / 100**2)
    with pytest.raises(AnalysisError):
        mean_from_sums(np.array([0.5, 0.2, 0.1]), low=0, high=1, noise_var=1.0)


def test_quantiles_are_the_grouped_data_formula() -> None:
    """A textbook grouped median: L + (n/2 - F) / f * h."""
    counts = np.array([5.0, 10.0, 20.0, 10.0, 5.0])
    median, first, last = quantiles_from_histogram(counts, low=0, high=50, probs=[0.5, 0.0, 1.0])
    assert median == pytest.approx(20 + (25 - 15) / 20 * 10)
    assert (first, last) == (0.0, 50.0)


def test_quantiles_clamp_negative_noisy_counts_and_skip_empty_bins() -> None:
    counts = np.array([-2.0, 4.0, 0.0, 4.0])
    (q0, median, q75) = quantiles_from_histogram(counts, low=0, high=4, probs=[0.0, 0.5, 0.75])
    assert q0 == 1.0
    assert median == 2.0
    assert q75 == 3.5
    with pytest.raises(AnalysisError):
        quantiles_from_histogram(np.array([-1.0, 0.0]), low=0, high=1, probs=[0.5])


def test_odds_ratio_equals_scipy_woolf_interval() -> None:
    exposed = np.array([True] * 60 + [False] * 90)
    outcome = np.array([True] * 25 + [False] * 35 + [True] * 15 + [False] * 75)
    cells = two_by_two_rows(exposed, outcome).sum(axis=0)
    assert np.array_equal(cells, [25, 35, 15, 75])
    estimate = odds_ratio(cells, noise_var=0.0)
    reference = scipy_odds_ratio(cells.reshape(2, 2).astype(int), kind="sample")
    interval = reference.confidence_interval(0.95)
    assert estimate.value == pytest.approx(reference.statistic, rel=1e-12)
    assert (estimate.ci_low, estimate.ci_high) == pytest.approx((interval.low, interval.high))
    assert estimate.std_error == pytest.approx(math.sqrt(sum(1 / cells)))


def test_odds_ratio_noise_and_haldane_correction() -> None:
    cells = np.array([25.0, 35.0, 15.0, 75.0])
    noisy = odds_ratio(cells, noise_var=4.0)
    assert noisy.std_error == pytest.approx(math.sqrt(sum((cells + 4) / cells**2)))
    corrected = odds_ratio(np.array([-1.5, 10.0, 8.0, 12.0]), noise_var=0.0)
    assert corrected.value == pytest.approx(0.5 * 12.5 / (10.5 * 8.5))
    assert corrected.n == pytest.approx(32.0)
