"""Aggregation as pure functions over named numpy arrays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def fedavg(updates: Sequence[tuple[Mapping[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """Average each array over `updates`, weighted by each update's example count.

    Accumulates in float64 and returns float32, so the order of updates does not
    change the result beyond float32 rounding.
    """
    if not updates:
        raise ValueError("fedavg needs at least one update")
    total = sum(weight for _, weight in updates)
    if total <= 0 or any(weight <= 0 for _, weight in updates):
        raise ValueError("every update needs a positive example count")
    names = set(updates[0][0])
    for arrays, _ in updates:
        if set(arrays) != names:
            raise ValueError("updates name different arrays")
        for name in names:
            if arrays[name].shape != updates[0][0][name].shape:
                raise ValueError(f"array {name} differs in shape between updates")
    averaged: dict[str, np.ndarray] = {}
    for name in sorted(names):
        accumulator = np.zeros(updates[0][0][name].shape, dtype=np.float64)
        for arrays, weight in updates:
            accumulator += arrays[name].astype(np.float64) * (weight / total)
        averaged[name] = accumulator.astype(np.float32)
    return averaged
