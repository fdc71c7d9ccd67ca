"""A site's answer to one exchange of a query: its cohort's vector, before any noise.

Each analysis turns the cohort into a sum whose change when one patient is added or
removed is bounded in L2 by the analysis's `sensitivity`; `client.ask` adds Gaussian
noise of `noise_multiplier * sensitivity` to each part before anything leaves. Values
are clamped to the contract's plausible range and covariates scaled to [-1, 1] with it
(public bounds, never the site's own statistics). A patient lacking a value an
analysis needs is left out of that analysis only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medfed.analysis import cox, glm, survival, tables
from medfed.analysis.answers import pieces
from medfed.analysis.layout import Analysis, km_edges_count, step_layout
from medfed.analysis.query import (
    AskQuery,
    Condition,
    ContractNames,
    CountAnalysis,
    CoxAnalysis,
    HistogramAnalysis,
    KaplanMeierAnalysis,
    LinearAnalysis,
    LogisticAnalysis,
    MeanAnalysis,
    OddsRatioAnalysis,
    QuantilesAnalysis,
)
from medfed.model.sample import PatientSample


@dataclass(frozen=True)
class Part:
    """One analysis's exact sum at one step, and the L2 sensitivity of each piece: a
    Newton step has two (gradient, then the Hessian's triangle), the rest one."""

    values: np.ndarray
    pieces: tuple[tuple[int, float], ...]
    """(length, sensitivity) of consecutive pieces of `values`."""


def value_of(sample: PatientSample, feature: str) -> float | None:
    """A patient's numeric feature or target value; None if absent."""
    if feature in sample.numeric:
        return sample.numeric[feature]
    if feature in sample.targets:
        return sample.targets[feature]
    return None


def meets(sample: PatientSample, condition: Condition) -> bool | None:
    """Whether a patient meets `condition`; None if the value it tests is missing."""
    if condition.any_of:
        codes = sample.codes.get(condition.feature)
        return codes is not None and not codes.isdisjoint(condition.any_of)
    value = value_of(sample, condition.feature)
    if value is None or not math.isfinite(value):
        return None
    if condition.equals is not None:
        return value == condition.equals
    low = -math.inf if condition.min is None else condition.min
    high = math.inf if condition.max is None else condition.max
    return low <= value <= high


def cohort(samples: Sequence[PatientSample], query: AskQuery) -> list[PatientSample]:
    """The patients meeting every cohort condition (a missing value: not in the cohort)."""
    return [s for s in samples if all(meets(s, c) is True for c in query.cohort)]


def _column(samples: Sequence[PatientSample], feature: str) -> np.ndarray:
    values = [value_of(s, feature) for s in samples]
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


def scaled(values: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """Values clamped to the contract's range and mapped onto [-1, 1]."""
    low, high = bounds
    middle, half = (low + high) / 2, (high - low) / 2
    result: np.ndarray = (np.clip(values, low, high) - middle) / half
    return result


def _design(
    samples: Sequence[PatientSample],
    covariates: Sequence[str],
    names: ContractNames,
    analysis: Analysis,
) -> tuple[np.ndarray, np.ndarray]:
    """Covariates scaled to [-1, 1], and the mask of patients who have all of them."""
    columns = [_column(samples, name) for name in covariates]
    x = np.column_stack(columns) if columns else np.zeros((len(samples), 0))
    complete: np.ndarray = np.asarray(np.isfinite(x).all(axis=1))
    bounded = np.column_stack(
        [scaled(x[:, j], analysis.range_of(name, names)) for j, name in enumerate(covariates)]
    )
    return bounded, complete


def _survival(
    samples: Sequence[PatientSample], task: str, names: ContractNames
) -> tuple[np.ndarray, np.ndarray]:
    time_field, event_field = names.survival[task]
    return _column(samples, time_field), _column(samples, event_field)


def _one_shot(
    analysis: Analysis, patients: Sequence[PatientSample], names: ContractNames
) -> np.ndarray:
    if isinstance(analysis, CountAnalysis):
        return np.array([float(len(patients))])
    if isinstance(analysis, HistogramAnalysis | QuantilesAnalysis):
        values = _column(patients, analysis.feature)
        low, high = analysis.range_of(analysis.feature, names)
        rows = tables.histogram_rows(values[np.isfinite(values)], low=low, high=high,
                                     bins=analysis.bins)  # fmt: skip
        return rows.sum(axis=0) if len(rows) else np.zeros(analysis.bins)
    if isinstance(analysis, MeanAnalysis):
        values = _column(patients, analysis.feature)
        low, high = analysis.range_of(analysis.feature, names)
        rows = tables.mean_rows(values[np.isfinite(values)], low=low, high=high)
        return rows.sum(axis=0) if len(rows) else np.zeros(3)
    if isinstance(analysis, OddsRatioAnalysis):
        exposed = [meets(s, analysis.exposure) for s in patients]
        outcome = [meets(s, analysis.outcome) for s in patients]
        known = [e is not None and o is not None for e, o in zip(exposed, outcome, strict=True)]
        rows = tables.two_by_two_rows(
            np.array([bool(e) for e, k in zip(exposed, known, strict=True) if k]),
            np.array([bool(o) for o, k in zip(outcome, known, strict=True) if k]),
        )
        return rows.sum(axis=0) if len(rows) else np.zeros(4)
    if isinstance(analysis, KaplanMeierAnalysis):
        return _kaplan_meier(analysis, patients, names)
    if isinstance(analysis, LinearAnalysis):
        return _linear(analysis, patients, names)
    raise TypeError(f"{analysis.kind} is not a one-shot analysis")


def _kaplan_meier(
    analysis: KaplanMeierAnalysis, patients: Sequence[PatientSample], names: ContractNames
) -> np.ndarray:
    time, event = _survival(patients, analysis.task, names)
    groups = np.zeros(len(patients), dtype=np.int64)
    known = np.isfinite(time) & np.isfinite(event)
    if analysis.group is not None:
        membership = [meets(s, analysis.group.condition) for s in patients]
        groups = np.array([0 if m else 1 for m in membership], dtype=np.int64)
        known &= np.array([m is not None for m in membership])
    edges = km_edges(analysis)
    count = 1 if analysis.group is None else 2
    rows = survival.survival_rows(
        time[known], event[known] > 0.5, None if count == 1 else groups[known],
        edges=edges, groups=None if count == 1 else [0, 1],
    )  # fmt: skip
    width = 2 * count * km_edges_count(analysis)
    return rows.sum(axis=0) if len(rows) else np.zeros(width)


def km_edges(analysis: KaplanMeierAnalysis) -> np.ndarray:
    """The public time grid of a Kaplan-Meier analysis: 0, w, 2w, ..., K w."""
    return np.arange(km_edges_count(analysis) + 1, dtype=np.float64) * analysis.bin_width


def _linear(
    analysis: LinearAnalysis, patients: Sequence[PatientSample], names: ContractNames
) -> np.ndarray:
    x, complete = _design(patients, analysis.covariates, names, analysis)
    y = _column(patients, analysis.outcome)
    keep = complete & np.isfinite(y)
    y_scaled = scaled(y[keep], analysis.range_of(analysis.outcome, names))
    sums: np.ndarray = glm.linear_sums(x[keep], y_scaled)
    return sums


def _newton(
    analysis: CoxAnalysis | LogisticAnalysis,
    patients: Sequence[PatientSample],
    names: ContractNames,
    beta: np.ndarray,
) -> np.ndarray:
    x, complete = _design(patients, analysis.covariates, names, analysis)
    p = beta.shape[0]
    if isinstance(analysis, CoxAnalysis):
        time, event = _survival(patients, analysis.task, names)
        keep = complete & np.isfinite(time) & np.isfinite(event)
        terms = cox.cox_site_terms(x[keep], time[keep], event[keep] > 0.5, beta)
    else:
        outcome = [meets(s, analysis.outcome) for s in patients]
        known = np.array([o is not None for o in outcome])
        keep = complete & known
        y = np.array([1.0 if o else 0.0 for o in outcome])[keep]
        terms = glm.logistic_site_terms(x[keep], y, beta)  # it adds the intercept
    upper = np.triu_indices(p)
    return np.concatenate([terms.gradient, terms.hessian[upper]])


def step_parts(
    query: AskQuery,
    patients: Sequence[PatientSample],
    names: ContractNames,
    step: int,
    betas: Mapping[int, np.ndarray],
) -> list[Part]:
    """The exact parts of the vector for exchange `step`, in `step_layout` order;
    `betas` holds each Newton analysis's coefficients to take its terms at."""
    parts: list[Part] = []
    for slot in step_layout(query, step):
        analysis = query.analyses[slot.index]
        if isinstance(analysis, CoxAnalysis | LogisticAnalysis):
            values = _newton(analysis, patients, names, betas[slot.index])
        else:
            values = _one_shot(analysis, patients, names)
        parts.append(Part(np.asarray(values, dtype=np.float64), pieces(analysis)))
        if parts[-1].values.shape != (slot.stop - slot.start,):
            raise ValueError(f"analysis {slot.index}: a part of the wrong length")
    return parts


def noised(
    parts: Sequence[Part], *, noise_multiplier: float, rng: np.random.Generator
) -> np.ndarray:
    """The parts concatenated, each piece with Gaussian noise of std
    `noise_multiplier * sensitivity` (0: exact, for the benchmark's no-DP reference)."""
    out: list[np.ndarray] = []
    for part in parts:
        start = 0
        for length, sensitivity in part.pieces:
            piece = part.values[start : start + length].astype(np.float64)
            std = noise_multiplier * sensitivity
            out.append(piece + (rng.normal(0.0, std, size=length) if std > 0 else 0.0))
            start += length
    return np.concatenate(out) if out else np.zeros(0)
