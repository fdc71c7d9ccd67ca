"""From the sites' summed, noised vectors to answers a researcher reads.

`pieces` states each analysis's released pieces and their L2 sensitivity (the site
noises each piece with std `noise_multiplier * sensitivity`); `piece_noise_var` is the
summed vector's noise variance per coordinate of a piece, given every answering site's
noise multiplier. `one_shot_answer` turns a one-shot analysis's sum into its answer;
`NewtonState` steps a regression by one Newton iteration per exchange. Every answer is
plain JSON, with its confidence interval including the DP noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from medfed.analysis import cox, glm, survival, tables
from medfed.analysis.layout import (
    Analysis,
    groups_of,
    km_edges_count,
    newton_width,
    one_shot_width,
    step_layout,
    triangle,
)
from medfed.analysis.linalg import noise_eigenvalue_floor, symmetric_from_upper
from medfed.analysis.newton import NewtonTerms, fit_summary, noisy_covariance, noisy_step
from medfed.analysis.query import (
    AskQuery,
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

LEVEL = 0.95
SWAMPED = (
    "the DP noise on the Hessian is as large as its smallest eigenvalue: at this epsilon and"
    " cohort the fit is not estimable (no interval is given); ask with a larger epsilon, fewer"
    " iterations or covariates, a smaller beta-l1-bound or max-patients, or another analysis"
)
STEP_BOUND = 5.0
"""The largest Euclidean norm of one Newton step on the [-1, 1] scale."""


def pieces(analysis: Analysis) -> tuple[tuple[int, float], ...]:
    """(length, L2 sensitivity) of each consecutive piece `analysis` releases per step."""
    if isinstance(analysis, CoxAnalysis):
        p = len(analysis.covariates)
        bound, most = analysis.beta_l1_bound, analysis.max_patients
        return (
            (p, cox.cox_gradient_sensitivity(p, beta_l1_bound=bound, max_patients=most)),
            (triangle(p), cox.cox_hessian_sensitivity(p, beta_l1_bound=bound, max_patients=most)),
        )
    if isinstance(analysis, LogisticAnalysis):
        p = len(analysis.covariates)
        width = newton_width(analysis)
        return (
            (width, glm.logistic_gradient_sensitivity(p)),
            (triangle(width), glm.logistic_hessian_sensitivity(p)),
        )
    if isinstance(analysis, MeanAnalysis):
        return ((3, tables.MEAN_SENSITIVITY),)
    if isinstance(analysis, LinearAnalysis):
        return ((one_shot_width(analysis), glm.linear_sensitivity(len(analysis.covariates))),)
    return ((one_shot_width(analysis), tables.COUNT_SENSITIVITY),)


def sensitivities(query: AskQuery, step: int) -> np.ndarray:
    """Per coordinate of a step's vector, its piece's sensitivity: a site divides by it
    before secure aggregation encodes the vector (every coordinate then moves by at most 1
    per patient), and the coordinator multiplies the sum back."""
    parts = [
        np.full(length, sensitivity)
        for slot in step_layout(query, step)
        for length, sensitivity in pieces(query.analyses[slot.index])
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def piece_noise_var(analysis: Analysis, multipliers: Sequence[float]) -> tuple[float, ...]:
    """Per piece: the noise variance of one coordinate of the sites' sum."""
    total = sum(z * z for z in multipliers)
    return tuple(total * s * s for _, s in pieces(analysis))


def _estimate(estimate: tables.Estimate) -> dict[str, object]:
    return {
        "value": estimate.value,
        "std_error": estimate.std_error,
        "ci_low": estimate.ci_low,
        "ci_high": estimate.ci_high,
        "n": estimate.n,
        "level": estimate.level,
    }


def _noise_std(noise: tuple[float, ...]) -> float:
    return math.sqrt(noise[0])


def one_shot_answer(
    analysis: Analysis, summed: np.ndarray, noise: tuple[float, ...], names: ContractNames
) -> dict[str, object]:
    """The answer of a one-shot analysis from the sites' summed vector."""
    head: dict[str, object] = {
        "kind": analysis.kind,
        "title": analysis.title,
        "noise_std": _noise_std(noise),
    }
    if isinstance(analysis, CountAnalysis):
        n = float(summed[0])
        half = 1.959963984540054 * math.sqrt(noise[0])
        return {**head, "count": n, "ci_low": n - half, "ci_high": n + half}
    if isinstance(analysis, HistogramAnalysis):
        low, high = analysis.range_of(analysis.feature, names)
        edges = np.linspace(low, high, analysis.bins + 1)
        return {**head, "feature": analysis.feature, "edges": edges.tolist(),
                "counts": summed.tolist()}  # fmt: skip
    if isinstance(analysis, MeanAnalysis):
        low, high = analysis.range_of(analysis.feature, names)
        estimate = tables.mean_from_sums(summed, low=low, high=high, noise_var=noise[0])
        return {**head, "feature": analysis.feature, **_estimate(estimate)}
    if isinstance(analysis, QuantilesAnalysis):
        low, high = analysis.range_of(analysis.feature, names)
        values = tables.quantiles_from_histogram(summed, low=low, high=high,
                                                 probs=list(analysis.probs))  # fmt: skip
        return {**head, "feature": analysis.feature, "probs": list(analysis.probs),
                "quantiles": np.asarray(values).tolist(),
                "resolution": (high - low) / analysis.bins}  # fmt: skip
    if isinstance(analysis, OddsRatioAnalysis):
        estimate = tables.odds_ratio(summed, noise_var=noise[0])
        return {**head, "cells": summed.tolist(), "exposure": analysis.exposure.describe(),
                "outcome": analysis.outcome.describe(), **_estimate(estimate)}  # fmt: skip
    if isinstance(analysis, KaplanMeierAnalysis):
        return {**head, **kaplan_meier_answer(analysis, summed, noise[0])}
    if isinstance(analysis, LinearAnalysis):
        return {**head, **linear_answer(analysis, summed, noise[0], names)}
    raise TypeError(f"{analysis.kind} is not a one-shot analysis")


def kaplan_meier_answer(
    analysis: KaplanMeierAnalysis, summed: np.ndarray, noise_var: float
) -> dict[str, object]:
    """Curves per group with bands, and the log-rank test when there are two groups."""
    groups, bins = groups_of(analysis), km_edges_count(analysis)
    counts = summed.reshape(2, groups, bins)
    events, censored = counts[0], counts[1]
    edges = np.arange(bins + 1, dtype=np.float64) * analysis.bin_width
    curves = survival.km_from_counts(events, censored, edges=edges, noise_var=noise_var,
                                     level=LEVEL)  # fmt: skip
    labels = ["all"] if analysis.group is None else list(analysis.group.labels)
    answer: dict[str, object] = {
        "task": analysis.task,
        "group": None if analysis.group is None else analysis.group.condition.describe(),
        "curves": [_curve(label, curve) for label, curve in zip(labels, curves, strict=True)],
    }
    if groups == 2:
        test = survival.logrank_from_counts(events, censored, noise_var=noise_var)
        answer["logrank"] = {
            "statistic": test.statistic,
            "dof": test.dof,
            "p_value": test.p_value,
            "includes_noise": noise_var > 0,
        }
    return answer


def _exp(value: float) -> float:
    """exp, infinite beyond what a float holds (an interval that wide says nothing)."""
    return math.exp(value) if value < 700 else math.inf


def _ranges(analysis: Analysis, names: ContractNames) -> dict[str, tuple[float, float]]:
    covariates = getattr(analysis, "covariates", ())
    return {feature: analysis.range_of(feature, names) for feature in covariates}


def _curve(label: str, curve: survival.KmCurve) -> dict[str, object]:
    below = np.nonzero(curve.survival <= 0.5)[0]
    return {
        "label": label,
        "times": curve.times.tolist(),
        "survival": curve.survival.tolist(),
        "lower": curve.lower.tolist(),
        "upper": curve.upper.tolist(),
        "at_risk": curve.at_risk.tolist(),
        "events": curve.events.tolist(),
        "median": float(curve.times[below[0]]) if below.size else None,
        "level": curve.level,
    }


def linear_answer(
    analysis: LinearAnalysis, summed: np.ndarray, noise_var: float, names: ContractNames
) -> dict[str, object]:
    """OLS coefficients per unit of each covariate (and the outcome's unit)."""
    p = len(analysis.covariates)
    fit = glm.linear_fit_from_sums(summed, p, noise_var=noise_var, level=LEVEL)
    return {
        "outcome": analysis.outcome,
        **coefficients(
            fit,
            [INTERCEPT, *analysis.covariates],
            _ranges(analysis, names),
            outcome_range=analysis.range_of(analysis.outcome, names),
        ),
    }


INTERCEPT = "intercept"
"""The intercept's row: its value with every covariate at the middle of its range."""


def coefficients(
    fit: object, labels: Sequence[str], ranges: Mapping[str, tuple[float, float]],
    *, outcome_range: tuple[float, float] | None = None, ratio: str | None = None,
) -> dict[str, object]:  # fmt: skip
    """A fit's rows: each coefficient per unit of its covariate (the fit is on the
    [-1, 1] scale of `ranges`: a coefficient divides by the covariate's half range), with
    its CI, and `ratio` (hazard or odds ratio) as exp of it where the model has one. The
    intercept is the value at the middle of every range (of the outcome's unit, for a
    linear fit)."""
    beta, se = np.asarray(fit.beta), np.asarray(fit.std_error)  # type: ignore[attr-defined]
    low, high = np.asarray(fit.ci_low), np.asarray(fit.ci_high)  # type: ignore[attr-defined]
    p_values = np.asarray(fit.p_value)  # type: ignore[attr-defined]
    out_scale = 1.0 if outcome_range is None else (outcome_range[1] - outcome_range[0]) / 2
    shift = 0.0 if outcome_range is None else (outcome_range[0] + outcome_range[1]) / 2
    rows = []
    for j, label in enumerate(labels):
        span = ranges.get(label)
        unit = 1.0 if span is None else (span[1] - span[0]) / 2
        row: dict[str, object] = {
            "term": label,
            "coef": float(beta[j]) * out_scale / unit + (shift if label == INTERCEPT else 0.0),
            "std_error": float(se[j]) * out_scale / unit,
            "ci_low": float(low[j]) * out_scale / unit + (shift if label == INTERCEPT else 0.0),
            "ci_high": float(high[j]) * out_scale / unit + (shift if label == INTERCEPT else 0.0),
            "p_value": float(p_values[j]),
        }
        if ratio is not None and label != INTERCEPT:
            coef, lo, hi = (float(beta[j]), float(low[j]), float(high[j]))
            row.update({ratio: _exp(coef / unit), f"{ratio}_ci_low": _exp(lo / unit),
                        f"{ratio}_ci_high": _exp(hi / unit)})  # fmt: skip
        rows.append(row)
    return {"coefficients": rows, "level": LEVEL}


@dataclass
class NewtonState:
    """A regression fitted one Newton step per exchange from the sites' noised sums."""

    analysis: CoxAnalysis | LogisticAnalysis
    beta: np.ndarray
    steps: int = 0
    information: np.ndarray | None = None
    noise: tuple[float, float] = (0.0, 0.0)
    sites: list[int] = field(default_factory=list)
    failure: str = ""
    """Why a step could not be taken (the noised sums gave no usable Hessian); the fit
    then stops and its answer says so."""
    swamped: bool = False
    """The last release's Hessian noise reached the information's smallest eigenvalue:
    the fit's curvature is noise, and no interval would be honest."""

    @classmethod
    def start(cls, analysis: CoxAnalysis | LogisticAnalysis) -> NewtonState:
        return cls(analysis, np.zeros(newton_width(analysis)))

    def done(self, step: int) -> bool:
        return step >= self.analysis.iterations or bool(self.failure)

    def update(self, summed: np.ndarray, noise: tuple[float, ...], *, sites: int) -> None:
        """One Newton step from the summed gradient and Hessian triangle at `beta`."""
        p = self.beta.shape[0]
        terms = NewtonTerms(math.nan, summed[:p], symmetric_from_upper(summed[p:], p))
        smallest = float(np.linalg.eigvalsh(-terms.hessian).min())
        self.swamped = smallest <= noise_eigenvalue_floor(noise[1], p)
        bound = self.analysis.beta_l1_bound if isinstance(self.analysis, CoxAnalysis) else None
        step = noisy_step(terms, self.beta, hessian_noise_var=noise[1], step_bound=STEP_BOUND,
                          beta_l1_bound=bound)  # fmt: skip
        self.beta, self.information = step.beta, step.information
        self.noise = (noise[0], noise[1])
        self.steps += 1
        self.sites.append(sites)

    def answer(self, names: ContractNames) -> dict[str, object]:
        """Coefficients with CIs that include the DP noise (`newton.newton_fit`'s rule)."""
        if self.information is None:
            raise ValueError("no Newton step was taken")
        covariance = noisy_covariance(
            self.information, gradient_noise_var=self.noise[0], hessian_noise_var=self.noise[1]
        )
        fit = fit_summary(self.beta, covariance, level=LEVEL, iterations=self.steps)
        labels = list(self.analysis.covariates)
        ratio = "hazard_ratio"
        if isinstance(self.analysis, LogisticAnalysis):
            labels, ratio = [INTERCEPT, *labels], "odds_ratio"
        rows = coefficients(fit, labels, _ranges(self.analysis, names), ratio=ratio)
        if self.swamped:  # no honest interval: say so rather than print a narrow one
            for row in rows["coefficients"]:  # type: ignore[attr-defined]
                for key in list(row):
                    if key.endswith(("ci_low", "ci_high")) or key in ("std_error", "p_value"):
                        row[key] = None
        return {
            "kind": self.analysis.kind,
            "title": self.analysis.title,
            "estimable": not self.swamped,
            "why": SWAMPED if self.swamped else "",
            "iterations": self.steps,
            "sites_per_step": self.sites,
            "noise_std": [math.sqrt(v) for v in self.noise],
            **rows,
        }
