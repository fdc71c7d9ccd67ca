"""Evaluation metrics as plain numpy functions."""

from __future__ import annotations

import numpy as np


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties).

    Returns NaN when only one class is present, since the area is undefined then.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    start = 0
    while start < scores.size:
        end = start
        while end + 1 < scores.size and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    rank_sum = ranks[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def accuracy(labels: np.ndarray, scores: np.ndarray, *, threshold: float = 0.0) -> float:
    """Share of samples whose score falls on the side of `threshold` that their label says."""
    labels = np.asarray(labels).astype(bool)
    predictions = np.asarray(scores) > threshold
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and scores {predictions.shape} differ in shape")
    if labels.size == 0:
        return float("nan")
    return float((predictions == labels).mean())


def multiclass_accuracy(labels: np.ndarray, logits: np.ndarray) -> float:
    """Share of samples whose highest logit (n, classes) is at their class index (n,)."""
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] != labels.size:
        raise ValueError(f"labels {labels.shape} and logits {logits.shape} do not match")
    if labels.size == 0:
        return float("nan")
    return float((logits.argmax(axis=1) == labels).mean())


def rmse(targets: np.ndarray, predictions: np.ndarray) -> float:
    """Root mean squared error; NaN without samples."""
    targets = np.asarray(targets, dtype=np.float64)
    predictions = np.asarray(predictions, dtype=np.float64)
    if targets.shape != predictions.shape:
        raise ValueError(
            f"targets {targets.shape} and predictions {predictions.shape} differ in shape"
        )
    if targets.size == 0:
        return float("nan")
    return float(np.sqrt(np.mean((targets - predictions) ** 2)))


_PAIR_BLOCK = 1024
"""Events compared at once in `concordance_index`: bounds its memory to a block x n matrix."""


def concordance_index(times: np.ndarray, events: np.ndarray, risks: np.ndarray) -> float:
    """Harrell's concordance index of predicted risks (higher risk = earlier event).

    A pair is comparable when the sample that ends first had an event: its time is
    strictly earlier, or equal to the other's censoring time (an event outlives no
    censoring at the same time; two events at one time are not comparable), as
    lifelines and scikit-survival count them. A comparable pair is concordant when the
    earlier event has the higher risk; tied risks count one half. NaN without pairs.
    """
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    events = np.asarray(events).astype(bool).reshape(-1)
    risks = np.asarray(risks, dtype=np.float64).reshape(-1)
    if not times.size == events.size == risks.size:
        raise ValueError(
            f"times {times.size}, events {events.size} and risks {risks.size} differ in length"
        )
    event_index = np.flatnonzero(events)
    comparable = 0
    score = 0.0
    for start in range(0, event_index.size, _PAIR_BLOCK):
        block = event_index[start : start + _PAIR_BLOCK]
        t_i, r_i = times[block, None], risks[block, None]
        pairs = (times[None, :] > t_i) | ((times[None, :] == t_i) & ~events[None, :])
        comparable += int(pairs.sum())
        score += float((pairs & (r_i > risks[None, :])).sum())
        score += 0.5 * float((pairs & (r_i == risks[None, :])).sum())
    if comparable == 0:
        return float("nan")
    return score / comparable
