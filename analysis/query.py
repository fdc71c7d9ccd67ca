"""A question for the consortium (`medfed ask`): a cohort and the analyses to run on it.

The query is a typed, frozen value parsed at the edge (the TOML file, the run config, a
site's message) and the same bytes everywhere: its digest (`AskQuery.sha256`) is what a
privacy officer approves, what every site charges its ledger under, and what the
evidence record names. Names of features, codes and targets are checked against the
study's contract by `check_against` (the caller passes the contract's names, so this
room stays pure).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_ANALYSES = 16
MAX_BINS = 512
MAX_ITERATIONS = 25
QUERY_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class QueryError(ValueError):
    """A query is malformed or names what its study's contract lacks; the message says where."""


class _Frozen(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, allow_inf_nan=False
    )


class Condition(_Frozen):
    """A test on one patient: a numeric feature (or target) in a range or equal to a
    value, or a coded feature holding any of some codes."""

    feature: str = Field(min_length=1, max_length=64)
    min: float | None = None
    max: float | None = None
    equals: float | None = None
    any_of: tuple[str, ...] = Field(default=(), alias="any-of", max_length=256)

    @model_validator(mode="after")
    def _one_test(self) -> Condition:
        ranged = self.min is not None or self.max is not None
        kinds = int(ranged) + int(self.equals is not None) + int(bool(self.any_of))
        if kinds != 1:
            raise ValueError(
                f"condition on {self.feature!r}: give exactly one of min/max, equals or any-of"
            )
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"condition on {self.feature!r}: min is above max")
        return self

    def describe(self) -> str:
        if self.any_of:
            return f"{self.feature} has any of {', '.join(self.any_of)}"
        if self.equals is not None:
            return f"{self.feature} = {self.equals:g}"
        parts = []
        if self.min is not None:
            parts.append(f"{self.feature} >= {self.min:g}")
        if self.max is not None:
            parts.append(f"{self.feature} <= {self.max:g}")
        return " and ".join(parts)


class GroupBy(_Frozen):
    """Two groups of the cohort: those meeting `condition` and the rest."""

    condition: Condition
    labels: tuple[str, str] = ("yes", "no")


class _Analysis(_Frozen):
    title: str = Field(default="", max_length=120)
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict, max_length=16)
    """Public clamping bounds per numeric feature, narrower than the contract's plausible
    range (e.g. creatinine 40-300 umol/L): values are clamped to them and covariates scaled
    by them, so a wide plausible range does not drown the signal in noise."""

    @model_validator(mode="after")
    def _bounds_ordered(self) -> _Analysis:
        for feature, (low, high) in self.bounds.items():
            if not low < high:
                raise ValueError(f"bounds.{feature}: the low bound must be below the high one")
        return self

    def range_of(self, feature: str, names: ContractNames) -> tuple[float, float]:
        """The clamping range of `feature` here: the query's bounds, else the contract's."""
        return self.bounds.get(feature, names.numeric[feature])


class CountAnalysis(_Analysis):
    """The cohort's size."""

    kind: Literal["count"]


class HistogramAnalysis(_Analysis):
    """A numeric feature's histogram over the contract's plausible range."""

    kind: Literal["histogram"]
    feature: str
    bins: int = Field(default=10, ge=1, le=MAX_BINS)


class MeanAnalysis(_Analysis):
    """A numeric feature's mean (values clamped to the contract's range)."""

    kind: Literal["mean"]
    feature: str


class QuantilesAnalysis(_Analysis):
    """A numeric feature's quantiles, read off a fine histogram."""

    kind: Literal["quantiles"]
    feature: str
    probs: tuple[float, ...] = Field(default=(0.25, 0.5, 0.75), min_length=1, max_length=19)
    bins: int = Field(default=100, ge=2, le=MAX_BINS)

    @model_validator(mode="after")
    def _probs_inside(self) -> QuantilesAnalysis:
        if not all(0 < p < 1 for p in self.probs):
            raise ValueError("quantiles: every prob must lie strictly between 0 and 1")
        return self


class OddsRatioAnalysis(_Analysis):
    """A 2x2 table of exposure against outcome, and its odds ratio."""

    kind: Literal["odds-ratio"]
    exposure: Condition
    outcome: Condition


class KaplanMeierAnalysis(_Analysis):
    """Kaplan-Meier curves of a survival task per group, and the log-rank test."""

    kind: Literal["kaplan-meier"]
    task: str
    group: GroupBy | None = None
    bin_width: float = Field(default=30.0, gt=0, alias="bin-width")
    horizon: float = Field(gt=0)
    """The last time on the grid (a time beyond it counts in the last bin)."""

    @model_validator(mode="after")
    def _grid_size(self) -> KaplanMeierAnalysis:
        if math.ceil(self.horizon / self.bin_width) > 4096:
            raise ValueError("kaplan-meier: horizon / bin-width gives more than 4096 bins")
        return self


class CoxAnalysis(_Analysis):
    """Cox proportional hazards on a survival task, stratified by site (each hospital its
    own baseline hazard), by Newton iterations on the sites' summed terms."""

    kind: Literal["cox"]
    task: str
    covariates: tuple[str, ...] = Field(min_length=1, max_length=12)
    iterations: int = Field(default=4, ge=1, le=MAX_ITERATIONS)
    beta_l1_bound: float = Field(default=3.0, gt=0, le=20, alias="beta-l1-bound")
    """Bound on the L1 norm of the coefficients on the [-1, 1] scale: the sensitivity holds
    inside it, and every step is projected back into it."""
    max_patients: int = Field(default=10_000, ge=2, le=10_000_000, alias="max-patients")
    """A public bound on one site's cohort, which the sensitivity grows with (as log n)."""


class LogisticAnalysis(_Analysis):
    """Logistic regression of a binary outcome on numeric covariates."""

    kind: Literal["logistic"]
    outcome: Condition
    covariates: tuple[str, ...] = Field(min_length=1, max_length=12)
    iterations: int = Field(default=4, ge=1, le=MAX_ITERATIONS)


class LinearAnalysis(_Analysis):
    """Linear regression of a numeric feature on numeric covariates (one release)."""

    kind: Literal["linear"]
    outcome: str
    covariates: tuple[str, ...] = Field(min_length=1, max_length=12)


Analysis = Annotated[
    CountAnalysis
    | HistogramAnalysis
    | MeanAnalysis
    | QuantilesAnalysis
    | OddsRatioAnalysis
    | KaplanMeierAnalysis
    | CoxAnalysis
    | LogisticAnalysis
    | LinearAnalysis,
    Field(discriminator="kind"),
]
NEWTON_KINDS = ("cox", "logistic")
"""Analyses fitted by Newton iterations: one exchange with the sites per iteration."""


class AskQuery(_Frozen):
    """A cohort, the analyses to run on it, and what each site may spend on the answer."""

    name: str = Field(pattern=QUERY_NAME)
    study: str = Field(pattern=QUERY_NAME)
    """The study whose data contract (features, codes, targets) the query reads."""
    epsilon: float = Field(gt=0, le=100)
    """What each site spends on the whole query (every analysis and iteration)."""
    delta: float = Field(default=1e-6, gt=0, lt=1)
    min_sites: int = Field(default=2, ge=1, alias="min-sites")
    timeout_s: float = Field(default=60.0, gt=0, le=3600, alias="timeout-s")
    secure_aggregation: bool = Field(default=True, alias="secure-aggregation")
    """The coordinator learns only the sum of the sites' noised answers; off: it sees each
    site's (still DP) answer, which the results and the evidence record say loudly."""
    cohort: tuple[Condition, ...] = Field(default=(), max_length=32)
    analyses: tuple[Analysis, ...] = Field(min_length=1, max_length=MAX_ANALYSES)

    def canonical_json(self) -> str:
        """The query's canonical text (sorted keys, aliases): the same on every machine."""
        document = self.model_dump(mode="json", by_alias=True)
        return json.dumps(document, sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        """What an officer approves and every site's ledger names."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    @property
    def iterations(self) -> int:
        """Exchanges with the sites: 1, or the most Newton iterations of any analysis."""
        newton = [
            a.iterations for a in self.analyses if isinstance(a, CoxAnalysis | LogisticAnalysis)
        ]
        return max([1, *newton])

    def releases(self) -> int:
        """Gaussian releases each site makes: one per one-shot analysis, and a gradient
        and a Hessian per Newton iteration."""
        total = 0
        for analysis in self.analyses:
            if isinstance(analysis, CoxAnalysis | LogisticAnalysis):
                total += 2 * analysis.iterations
            else:
                total += 1
        return total


def parse_query(document: Mapping[str, object], *, where: str) -> AskQuery:
    """The query in a TOML document (`[query]`, `[[query.cohort]]`, `[[query.analyses]]`),
    or a `QueryError` naming the first problem's key."""
    body = document.get("query")
    if not isinstance(body, Mapping):
        raise QueryError(f"{where}: no [query] table")
    return query_from(body, where=where)


def query_from(body: Mapping[str, object] | str, *, where: str) -> AskQuery:
    """The query in a mapping or its canonical JSON; `QueryError` naming the key at fault."""
    try:
        if isinstance(body, str):
            return AskQuery.model_validate_json(body)
        return AskQuery.model_validate(dict(body))
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "query"
        raise QueryError(f"{where}: query.{key}: {first['msg']}") from exc


@dataclass(frozen=True)
class ContractNames:
    """What a contract offers a query, by name: numeric features with their ranges,
    coded features, and survival tasks (time and event fields)."""

    numeric: Mapping[str, tuple[float, float]]
    coded: Sequence[str]
    survival: Mapping[str, tuple[str, str]]
    binary_targets: Sequence[str] = ()


def _check_condition(condition: Condition, names: ContractNames, where: str) -> None:
    if condition.any_of:
        if condition.feature not in names.coded:
            raise QueryError(f"{where}: {condition.feature!r} is not a coded feature of the study")
    elif condition.feature not in names.numeric and condition.feature not in names.binary_targets:
        raise QueryError(f"{where}: {condition.feature!r} is not a numeric feature of the study")


def _check_numeric(feature: str, names: ContractNames, where: str) -> None:
    if feature not in names.numeric:
        raise QueryError(f"{where}: {feature!r} is not a numeric feature of the study")


def check_against(query: AskQuery, names: ContractNames) -> None:
    """Raise `QueryError` if the query names a feature, code or task the contract lacks,
    or bounds a feature beyond the contract's plausible range."""
    for index, analysis in enumerate(query.analyses):
        for feature, (low, high) in analysis.bounds.items():
            where = f"query.analyses[{index}].bounds.{feature}"
            _check_numeric(feature, names, where)
            lowest, highest = names.numeric[feature]
            if low < lowest or high > highest:
                raise QueryError(
                    f"{where}: [{low:g}, {high:g}] is not inside the contract's range"
                    f" [{lowest:g}, {highest:g}]"
                )
    for index, condition in enumerate(query.cohort):
        _check_condition(condition, names, f"query.cohort[{index}]")
    for index, analysis in enumerate(query.analyses):
        where = f"query.analyses[{index}] ({analysis.kind})"
        if isinstance(analysis, HistogramAnalysis | MeanAnalysis | QuantilesAnalysis):
            _check_numeric(analysis.feature, names, where)
        elif isinstance(analysis, OddsRatioAnalysis):
            _check_condition(analysis.exposure, names, f"{where}.exposure")
            _check_condition(analysis.outcome, names, f"{where}.outcome")
        elif isinstance(analysis, KaplanMeierAnalysis | CoxAnalysis):
            if analysis.task not in names.survival:
                raise QueryError(f"{where}: {analysis.task!r} is not a survival task of the study")
            if isinstance(analysis, KaplanMeierAnalysis) and analysis.group is not None:
                _check_condition(analysis.group.condition, names, f"{where}.group")
            if isinstance(analysis, CoxAnalysis):
                for feature in analysis.covariates:
                    _check_numeric(feature, names, where)
        elif isinstance(analysis, LogisticAnalysis):
            _check_condition(analysis.outcome, names, f"{where}.outcome")
            for feature in analysis.covariates:
                _check_numeric(feature, names, where)
        elif isinstance(analysis, LinearAnalysis):
            for feature in (analysis.outcome, *analysis.covariates):
                _check_numeric(feature, names, where)
