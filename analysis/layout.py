"""Where each analysis's numbers sit in a site's released vector, step by step.

At every exchange a site sends one vector: the concatenated answers of the analyses
that release something at that step (one-shot analyses at step 0; a Newton analysis a
gradient and the Hessian's upper triangle at each of its iterations). Coordinator and
site derive the same layout from the query and the contract's names, so the vector
carries no labels and its length is checked on arrival.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from medfed.analysis.query import (
    AskQuery,
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

Analysis = (
    CountAnalysis
    | HistogramAnalysis
    | MeanAnalysis
    | QuantilesAnalysis
    | OddsRatioAnalysis
    | KaplanMeierAnalysis
    | CoxAnalysis
    | LogisticAnalysis
    | LinearAnalysis
)


def triangle(n: int) -> int:
    """Entries of an n x n symmetric matrix's upper triangle (with its diagonal)."""
    return n * (n + 1) // 2


def km_edges_count(analysis: KaplanMeierAnalysis) -> int:
    """Bins of a Kaplan-Meier grid: [0, w), [w, 2w), ..., up to the horizon."""
    return max(1, math.ceil(analysis.horizon / analysis.bin_width))


def groups_of(analysis: KaplanMeierAnalysis) -> int:
    return 1 if analysis.group is None else 2


def newton_width(analysis: CoxAnalysis | LogisticAnalysis) -> int:
    """Coefficients of a Newton fit: the covariates (and a logistic intercept)."""
    return len(analysis.covariates) + (1 if isinstance(analysis, LogisticAnalysis) else 0)


def linear_width(analysis: LinearAnalysis) -> int:
    """The sufficient statistics of a linear fit: X'X's triangle, X'y, y'y (X with an
    intercept column, so its first diagonal entry is the count)."""
    width = len(analysis.covariates) + 1
    return triangle(width) + width + 1


def one_shot_width(analysis: Analysis) -> int:
    """The length of a one-shot analysis's released vector."""
    if isinstance(analysis, CountAnalysis):
        return 1
    if isinstance(analysis, HistogramAnalysis | QuantilesAnalysis):
        return analysis.bins
    if isinstance(analysis, MeanAnalysis):
        return 3
    if isinstance(analysis, OddsRatioAnalysis):
        return 4
    if isinstance(analysis, KaplanMeierAnalysis):
        return 2 * groups_of(analysis) * km_edges_count(analysis)
    if isinstance(analysis, LinearAnalysis):
        return linear_width(analysis)
    raise TypeError(f"{analysis.kind} is not a one-shot analysis")


@dataclass(frozen=True)
class Slot:
    """One analysis's part of a step's vector."""

    index: int
    """The analysis's position in the query."""
    start: int
    stop: int
    newton: bool
    """A Newton step: the gradient, then the Hessian's upper triangle."""


def releases_at(analysis: Analysis, step: int) -> bool:
    """Whether `analysis` releases a vector at exchange `step` (0-based)."""
    if isinstance(analysis, CoxAnalysis | LogisticAnalysis):
        return step < analysis.iterations
    return step == 0


def step_layout(query: AskQuery, step: int) -> list[Slot]:
    """The slots of the vector a site sends at exchange `step`."""
    slots: list[Slot] = []
    offset = 0
    for index, analysis in enumerate(query.analyses):
        if not releases_at(analysis, step):
            continue
        if isinstance(analysis, CoxAnalysis | LogisticAnalysis):
            p = newton_width(analysis)
            width, newton = p + triangle(p), True
        else:
            width, newton = one_shot_width(analysis), False
        slots.append(Slot(index, offset, offset + width, newton))
        offset += width
    return slots


def step_width(query: AskQuery, step: int) -> int:
    """The length of a site's vector at exchange `step`."""
    slots = step_layout(query, step)
    return slots[-1].stop if slots else 0


def step_digest(query_sha256: str, step: int, betas: Mapping[str, object]) -> str:
    """What one exchange asks of every site, as a digest: the query, the step and the
    Newton coefficients (canonical JSON). Under secure aggregation the announcement names
    it, so the coordinator cannot ask one site something else than the others."""
    text = json.dumps({"query": query_sha256, "step": step, "betas": betas},
                      sort_keys=True, separators=(",", ":"))  # fmt: skip
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
