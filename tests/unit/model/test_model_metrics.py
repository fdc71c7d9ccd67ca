"""AUROC against a brute-force count over all positive-negative pairs; accuracy by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.model.metrics import accuracy, auroc


def pairwise_auroc(labels: list[bool], scores: list[float]) -> float:
    """P(score of a positive > score of a negative), ties counting one half."""
    positives = [s for label, s in zip(labels, scores, strict=True) if label]
    negatives = [s for label, s in zip(labels, scores, strict=True) if not label]
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


# Scores from a small set of values, so ties are common; some scattered floats as well.
scores_strategy = st.one_of(
    st.integers(min_value=-3, max_value=3).map(float),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
)


@st.composite
def labelled_scores(draw: st.DrawFn) -> tuple[list[bool], list[float]]:
    n = draw(st.integers(min_value=2, max_value=40))
    labels = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    scores = draw(st.lists(scores_strategy, min_size=n, max_size=n))
    return labels, scores


@settings(max_examples=300, deadline=None, database=None)
@given(labelled_scores())
def test_auroc_matches_pairwise_count(case: tuple[list[bool], list[float]]) -> None:
    labels, scores = case
    result = auroc(np.array(labels), np.array(scores))
    if all(labels) or not any(labels):
        assert math.isnan(result)
    else:
        assert result == pytest.approx(pairwise_auroc(labels, scores), abs=1e-12)


@pytest.mark.parametrize(
    ("labels", "scores", "expected"),
    [
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
        ([0, 1], [1.0, 1.0], 0.5),
        ([1, 1, 0, 0], [3.0, 2.0, 1.0, 0.0], 1.0),
        ([1, 1, 0, 0], [0.0, 1.0, 2.0, 3.0], 0.0),
        ([0, 1, 0, 1, 1], [2.0, 2.0, 1.0, 3.0, 2.0], (0.5 + 1 + 1 + 1 + 0.5 + 1) / 6),
    ],
)
def test_auroc_known_values(labels: list[int], scores: list[float], expected: float) -> None:
    assert auroc(np.array(labels), np.array(scores)) == pytest.approx(expected)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], []])
def test_auroc_is_nan_with_one_class(labels: list[int]) -> None:
    assert math.isnan(auroc(np.array(labels), np.arange(len(labels), dtype=float)))


def test_auroc_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        auroc(np.array([0, 1, 1]), np.array([0.2, 0.4]))


def test_auroc_accepts_integer_and_float_labels() -> None:
    scores = np.array([0.1, 0.9, 0.5, 0.3])
    assert auroc(np.array([0, 1, 1, 0]), scores) == auroc(np.array([0.0, 1.0, 1.0, 0.0]), scores)


def test_accuracy_counts_the_right_side_of_the_threshold() -> None:
    labels = np.array([1, 0, 1, 0, 1])
    logits = np.array([2.0, -1.0, -0.5, 0.0, 0.0])
    assert accuracy(labels, logits) == pytest.approx(3 / 5)
    assert accuracy(labels, logits, threshold=-0.75) == pytest.approx(4 / 5)


def test_accuracy_is_nan_without_samples() -> None:
    assert math.isnan(accuracy(np.array([]), np.array([])))


def test_accuracy_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        accuracy(np.array([1, 0, 1]), np.array([0.5]))
