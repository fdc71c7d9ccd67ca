"""The held-out AUROC's 95% interval (post-processing of the released histograms): it
covers the AUROC of the population the patients are drawn from about 95% of the time,
and shrinks as sites pool their patients."""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

from medfed.privacy.release import (
    BINS,
    NEGATIVES,
    POSITIVES,
    WIDTH,
    auroc_from_histograms,
    auroc_interval,
    vector_auroc_interval,
)

rng = np.random.default_rng(20261205)


def _histogram(scores: np.ndarray) -> np.ndarray:
    bins = np.clip((scores * BINS).astype(int), 0, BINS - 1)
    return np.bincount(bins, minlength=BINS).astype(np.float64)


def _scores(n: int, *, shift: float) -> np.ndarray:
    return np.asarray(norm.cdf(rng.normal(shift, 1.0, n)))


def test_the_interval_covers_the_population_auroc_about_95_percent_of_the_time() -> None:
    # The population's binned AUROC, from two million draws of each class.
    truth = auroc_from_histograms(
        _histogram(_scores(2_000_000, shift=0.8)), _histogram(_scores(2_000_000, shift=0.0))
    )
    trials = 400
    covered = 0
    for _ in range(trials):
        interval = auroc_interval(
            _histogram(_scores(60, shift=0.8)), _histogram(_scores(90, shift=0.0))
        )
        assert interval is not None
        covered += interval[0] <= truth <= interval[1]
    # Binomial(400, 0.95) lies in [0.91, 0.985] with probability > 0.999.
    assert 0.91 <= covered / trials <= 0.985


def test_pooling_sites_narrows_the_interval_and_tiny_classes_have_none() -> None:
    one = np.zeros(WIDTH)
    one[POSITIVES] = _histogram(_scores(40, shift=1.0))
    one[NEGATIVES] = _histogram(_scores(60, shift=0.0))
    other = np.zeros(WIDTH)
    other[POSITIVES] = _histogram(_scores(400, shift=1.0))
    other[NEGATIVES] = _histogram(_scores(600, shift=0.0))
    small, pooled = vector_auroc_interval(one), vector_auroc_interval(one + other)
    assert small is not None and pooled is not None
    assert pooled[1] - pooled[0] < small[1] - small[0]
    assert small[0] <= auroc_from_histograms(one[POSITIVES], one[NEGATIVES]) <= small[1]

    lonely = np.zeros(BINS)
    lonely[7] = 1.0
    assert auroc_interval(lonely, _histogram(_scores(50, shift=0.0))) is None
    assert vector_auroc_interval([0.0] * (WIDTH - 1)) is None
