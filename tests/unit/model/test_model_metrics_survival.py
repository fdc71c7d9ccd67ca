"""Multiclass accuracy, RMSE and Harrell's C against lifelines, scikit-survival and numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lifelines.datasets import load_lung
from lifelines.utils import concordance_index as lifelines_concordance
from sksurv.metrics import concordance_index_censored

from medfed.model.metrics import concordance_index, multiclass_accuracy, rmse


def lung() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NCCTG lung cancer: times (with ties), events, and a plausible risk score."""
    data = load_lung().dropna(subset=["ph.ecog"])
    times = data["time"].to_numpy(dtype=np.float64)
    events = data["status"].to_numpy().astype(bool)
    # A crude risk: older, male, worse ECOG score; integer-valued, so risks tie often.
    risks = (data["age"] // 10 + data["sex"].eq(1) + data["ph.ecog"]).to_numpy(np.float64)
    return times, events, risks


def test_c_index_on_lung_matches_lifelines_and_sksurv() -> None:
    times, events, risks = lung()
    assert len(np.unique(times)) < len(times)  # tied times are exercised
    assert len(np.unique(risks)) < len(risks) / 10  # and tied risks
    ours = concordance_index(times, events, risks)
    # lifelines scores predicted survival times (longer = lower risk): pass the negated risk.
    assert ours == pytest.approx(lifelines_concordance(times, -risks, events), abs=1e-12)
    assert ours == pytest.approx(concordance_index_censored(events, times, risks)[0], abs=1e-12)
    assert 0.55 < ours < 0.75  # the crude score is informative, not perfect


def test_c_index_of_a_perfect_and_reversed_ranking() -> None:
    times = np.array([1.0, 2.0, 3.0, 4.0])
    events = np.array([1, 1, 1, 0])
    assert concordance_index(times, events, -times) == 1.0
    assert concordance_index(times, events, times) == 0.0


def test_c_index_counts_an_event_before_a_censoring_at_the_same_time() -> None:
    # (event at 2, censored at 2) is comparable; (event, event) at 3 is not.
    times = np.array([2.0, 2.0, 3.0, 3.0])
    events = np.array([1, 0, 1, 1])
    risks = np.array([1.0, 0.0, 5.0, 5.0])
    # Pairs: (0,1) concordant, (0,2) and (0,3) discordant; 1/3.
    assert concordance_index(times, events, risks) == pytest.approx(1 / 3)


def test_c_index_without_comparable_pairs_is_nan() -> None:
    assert math.isnan(concordance_index(np.array([1.0, 2.0]), np.array([0, 0]), np.zeros(2)))
    assert math.isnan(concordance_index(np.array([]), np.array([]), np.array([])))


def test_c_index_refuses_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        concordance_index(np.array([1.0, 2.0]), np.array([1]), np.zeros(2))


@st.composite
def survival_data(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = draw(st.integers(min_value=2, max_value=30))
    # Few distinct values: tied times and tied risks are common.
    times = draw(st.lists(st.integers(1, 6), min_size=n, max_size=n))
    events = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    risks = draw(st.lists(st.integers(-2, 2), min_size=n, max_size=n))
    return np.array(times, float), np.array(events), np.array(risks, float)


@settings(max_examples=200, deadline=None, database=None)
@given(survival_data())
def test_c_index_matches_lifelines_on_random_ties(
    case: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    times, events, risks = case
    ours = concordance_index(times, events, risks)
    try:
        expected = lifelines_concordance(times, -risks, events)
    except ZeroDivisionError:  # lifelines: "No admissable pairs in the dataset."
        assert math.isnan(ours)
        return
    assert ours == pytest.approx(expected, abs=1e-12)


@settings(max_examples=100, deadline=None, database=None)
@given(survival_data(), st.floats(0.1, 10.0), st.floats(-5.0, 5.0))
def test_c_index_properties(
    case: tuple[np.ndarray, np.ndarray, np.ndarray], scale: float, shift: float
) -> None:
    times, events, risks = case
    value = concordance_index(times, events, risks)
    if math.isnan(value):
        return
    assert 0.0 <= value <= 1.0
    # Only the ranking of risks matters, and reversing it mirrors the index.
    assert concordance_index(times, events, risks * scale + shift) == pytest.approx(value)
    assert concordance_index(times, events, -risks) == pytest.approx(1.0 - value)


def test_multiclass_accuracy_by_hand() -> None:
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 4.0], [5.0, 6.0, 0.0]])
    assert multiclass_accuracy(np.array([0, 1, 0, 0]), logits) == pytest.approx(2 / 4)
    assert math.isnan(multiclass_accuracy(np.array([]), np.zeros((0, 3))))
    with pytest.raises(ValueError, match="do not match"):
        multiclass_accuracy(np.array([0, 1]), logits)


def test_rmse_matches_numpy() -> None:
    generator = np.random.default_rng(0)
    targets, predictions = generator.normal(size=50), generator.normal(size=50)
    expected = math.sqrt(sum((t - p) ** 2 for t, p in zip(targets, predictions, strict=True)) / 50)
    assert rmse(targets, predictions) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(rmse(np.array([]), np.array([])))
    with pytest.raises(ValueError, match="differ in shape"):
        rmse(np.zeros(3), np.zeros(2))
