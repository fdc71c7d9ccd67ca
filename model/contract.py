"""The data contract of a study: its modalities, features, vocabularies and tasks.

The network is sized from the contract, and every site maps its local data onto it.
Standardisation uses the contract's reference mean and scale, never a site's own
statistics, so all sites feed the model the same way and nothing site-specific leaks.
The contract's digest (`StudyContract.sha256`) is part of the model's identity.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Modality = Literal["clinical", "omics", "molecule", "protein"]
MODALITY_ORDER: tuple[Modality, ...] = ("clinical", "omics", "molecule", "protein")
"""The fixed order of modalities wherever they are listed (tensors, documents, parameters)."""

_SNAKE = r"^[a-z][a-z0-9_]*$"
_FIELD = r"^\S+$"  # a sample's target field: any name without spaces


def _repeated(values: tuple[str, ...] | list[str]) -> list[str]:
    return sorted({value for value in values if list(values).count(value) > 1})


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NumericFeature(_Frozen):
    """One numeric clinical feature: its unit, plausible range and reference scaling."""

    name: str = Field(pattern=_SNAKE)
    unit: str = Field(min_length=1)
    minimum: float
    maximum: float
    reference_mean: float
    reference_scale: float = Field(gt=0)
    reduce: Literal["latest", "mean", "min", "max", "first"] = "latest"
    """How repeated measurements of one patient are reduced to one value."""
    loinc: str | None = None
    """The LOINC code that FHIR or OMOP observations of this feature map from."""
    optional: bool = False
    """A site may lack this feature entirely (the model masks what is missing); an
    optional feature's low coverage is shown by `site check`, not a problem."""

    @model_validator(mode="after")
    def _range_is_ordered(self) -> NumericFeature:
        if not self.minimum < self.maximum:
            raise ValueError(f"feature {self.name}: minimum must be below maximum")
        return self


CodeSystem = Literal["icd10", "atc", "rxnorm", "snomed", "loinc", "local"]


class CategoricalFeature(_Frozen):
    """A set-valued coded feature (e.g. diagnoses): the exact codes the model knows.

    Codes match exactly (no prefix hierarchy); a code outside the vocabulary is a data
    problem that the site reports, never silently dropped.
    """

    name: str = Field(pattern=_SNAKE)
    system: CodeSystem
    vocabulary: tuple[str, ...] = Field(min_length=1)
    optional: bool = False
    """A site may hold no code of this feature at all (see `NumericFeature.optional`)."""

    @field_validator("vocabulary")
    @classmethod
    def _codes_are_unique_and_non_empty(cls, vocabulary: tuple[str, ...]) -> tuple[str, ...]:
        if any(not code.strip() or code != code.strip() for code in vocabulary):
            raise ValueError("codes must be non-empty and carry no surrounding spaces")
        repeated = _repeated(vocabulary)
        if repeated:
            raise ValueError(f"codes repeat: {repeated}")
        return vocabulary


class OmicsPanel(_Frozen):
    """An ordered gene panel; values are transformed, then standardised by the reference."""

    genes: tuple[str, ...] = Field(min_length=1)
    transform: Literal["log1p", "none"] = "log1p"
    reference_mean: float = 0.0
    reference_scale: float = Field(default=1.0, gt=0)
    gene_means: tuple[float, ...] = ()
    """Per gene, the reference mean of the transformed value (a public reference cohort);
    empty: `reference_mean` for every gene."""
    gene_scales: tuple[float, ...] = ()
    """Per gene, the reference scale (> 0); empty: `reference_scale` for every gene."""

    @model_validator(mode="after")
    def _per_gene_references_fit(self) -> OmicsPanel:
        for name, values in (("gene_means", self.gene_means), ("gene_scales", self.gene_scales)):
            if values and len(values) != len(self.genes):
                raise ValueError(f"{name} has {len(values)} values for {len(self.genes)} genes")
            if any(not math.isfinite(v) for v in values):
                raise ValueError(f"{name} must be finite")
        if any(v <= 0 for v in self.gene_scales):
            raise ValueError("gene_scales must be positive")
        return self

    @field_validator("genes")
    @classmethod
    def _genes_are_unique(cls, genes: tuple[str, ...]) -> tuple[str, ...]:
        if any(not gene.strip() or gene != gene.strip() for gene in genes):
            raise ValueError("gene symbols must be non-empty and carry no surrounding spaces")
        repeated = _repeated(genes)
        if repeated:
            raise ValueError(f"genes repeat: {repeated}")
        return genes


_BRACKET_ATOMS = (
    "[nH]", "[NH+]", "[NH2+]", "[NH3+]", "[N+]", "[N-]", "[n+]", "[O-]", "[O+]", "[S-]",
    "[S+]", "[s+]", "[P+]", "[C@@H]", "[C@H]", "[C@@]", "[C@]", "[S@@]", "[S@]", "[N@@]",
    "[N@]", "[N@+]", "[N@@+]", "[P@@]", "[P@]", "[Si]", "[Se]", "[se]", "[B-]", "[Na+]",
    "[K+]", "[Li+]", "[Ca+2]", "[Mg+2]", "[Zn+2]", "[Fe+2]", "[Fe+3]", "[Cl-]", "[Br-]",
    "[I-]", "[H]", "[2H]", "[CH]", "[CH2]", "[C-]", "[c-]", "[Pt]", "[Cu+2]", "[Co+2]",
    "[As]", "[Hg]", "[Al]", "[Ag+]", "[Sn]", "[Ge]",
)  # fmt: skip
DEFAULT_SMILES_VOCABULARY: tuple[str, ...] = (
    *("B", "C", "N", "O", "P", "S", "F", "Cl", "Br", "I"),
    *("b", "c", "n", "o", "p", "s"),
    *_BRACKET_ATOMS,
    *("=", "#", "-", "/", "\\", ":", "(", ")", ".", "+"),
)
"""Atom-level SMILES tokens known by default. Ring-closure digits (1-9, %10-%99) are
always known to the tokenizer and need not be listed."""


class MoleculeSpec(_Frozen):
    """Molecules as SMILES: the atom-level tokens the model knows and the maximum length."""

    max_length: int = Field(ge=1)
    vocabulary: tuple[str, ...] = Field(default=DEFAULT_SMILES_VOCABULARY, min_length=1)

    @field_validator("vocabulary")
    @classmethod
    def _tokens_are_unique(cls, vocabulary: tuple[str, ...]) -> tuple[str, ...]:
        if any(not token or token != token.strip() for token in vocabulary):
            raise ValueError("tokens must be non-empty and carry no spaces")
        repeated = _repeated(vocabulary)
        if repeated:
            raise ValueError(f"tokens repeat: {repeated}")
        return vocabulary


class ProteinSpec(_Frozen):
    """Protein sequences: one token per residue over `alphabet`, at most `max_length`."""

    max_length: int = Field(ge=1)
    alphabet: str = Field(default="ACDEFGHIKLMNPQRSTVWY", min_length=1)

    @field_validator("alphabet")
    @classmethod
    def _alphabet_is_letters(cls, alphabet: str) -> str:
        if not alphabet.isalpha() or not alphabet.isupper():
            raise ValueError("the alphabet must be upper-case letters")
        repeated = _repeated(list(alphabet))
        if repeated:
            raise ValueError(f"residues repeat: {repeated}")
        return alphabet


TaskKind = Literal["binary", "multiclass", "regression", "survival"]
SurvivalLoss = Literal["discrete-hazard", "cox"]
"""How a survival head is trained: a discrete-time hazard over the task's intervals (a sum
of per-patient terms, so DP-SGD's per-sample clipping bounds each patient), or the Cox
partial likelihood (couples patients through risk sets: not bounded by clipping)."""


class TaskSpec(_Frozen):
    """One prediction task: its head's kind and the field(s) holding its label.

    `target` is the label's field (for survival: the time); `event` is the survival
    event indicator (1 = event); `classes` names a multiclass task's classes in order.
    A survival task's `survival_loss` picks its loss; the discrete-time hazard splits
    follow-up at `interval_cuts` (in the target's unit, e.g. days), which the contract
    declares from public knowledge (clinical landmarks), never from a site's data.
    `reference_mean` / `reference_scale` standardise a regression target the same way
    features are (the head predicts the standardised value; metrics are in real units).
    `unit` is the UCUM unit of a survival time or regression target (`d`, `mo`, `a`):
    sites convert their values to it, and a site value in another unit with no `unit`
    here is a problem, never taken as is.
    """

    name: str = Field(pattern=_SNAKE)
    kind: TaskKind
    target: str = Field(pattern=_FIELD)
    event: str | None = Field(default=None, pattern=_FIELD)
    classes: tuple[str, ...] = ()
    survival_loss: SurvivalLoss = "discrete-hazard"
    interval_cuts: tuple[float, ...] = ()
    """Cut points (strictly increasing, > 0) of the discrete-time hazard's intervals:
    [0, c1), [c1, c2), ..., [c_last, inf). None: one interval (event or not)."""
    reference_mean: float = 0.0
    reference_scale: float = Field(default=1.0, gt=0)
    unit: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _fields_fit_the_kind(self) -> TaskSpec:
        if self.kind == "survival":
            if self.event is None:
                raise ValueError(f"task {self.name}: a survival task needs an event field")
            if self.event == self.target:
                raise ValueError(f"task {self.name}: event and target must differ")
        elif self.event is not None:
            raise ValueError(f"task {self.name}: only a survival task has an event field")
        if self.kind == "multiclass":
            if len(self.classes) < 2:
                raise ValueError(f"task {self.name}: a multiclass task needs at least 2 classes")
            if _repeated(self.classes):
                raise ValueError(f"task {self.name}: classes repeat: {_repeated(self.classes)}")
        elif self.classes:
            raise ValueError(f"task {self.name}: only a multiclass task has classes")
        cuts = self.interval_cuts
        if cuts and (self.kind != "survival" or self.survival_loss != "discrete-hazard"):
            raise ValueError(
                f"task {self.name}: interval_cuts belong to a discrete-hazard survival task"
            )
        if any(not math.isfinite(c) or c <= 0 for c in cuts) or any(
            b <= a for a, b in itertools.pairwise(cuts)
        ):
            raise ValueError(
                f"task {self.name}: interval_cuts must be finite, positive and increasing"
            )
        if self.kind != "regression" and (self.reference_mean, self.reference_scale) != (0, 1):
            raise ValueError(f"task {self.name}: only a regression target has a reference")
        if self.unit is not None and self.kind not in ("survival", "regression"):
            raise ValueError(f"task {self.name}: only a survival or regression target has a unit")
        return self

    @property
    def discrete_hazard(self) -> bool:
        """A survival task trained with the discrete-time hazard loss."""
        return self.kind == "survival" and self.survival_loss == "discrete-hazard"

    @property
    def intervals(self) -> int:
        """Intervals of a discrete-hazard task: one more than its cuts (else 1)."""
        return len(self.interval_cuts) + 1 if self.discrete_hazard else 1

    @property
    def label_fields(self) -> tuple[str, ...]:
        """The sample target fields this task reads: (target,) or (target, event)."""
        return (self.target,) if self.event is None else (self.target, self.event)

    @property
    def outputs(self) -> int:
        """Outputs of the task's head per sample: classes, intervals, else 1."""
        if self.kind == "multiclass":
            return len(self.classes)
        return self.intervals


class StudyContract(_Frozen):
    """Everything a study's data must be: modalities, features, vocabularies and tasks."""

    version: int = 2
    name: str = "study"
    patient_id: str = Field(default="patient_id", min_length=1)
    numeric: tuple[NumericFeature, ...] = ()
    categorical: tuple[CategoricalFeature, ...] = ()
    omics: OmicsPanel | None = None
    molecule: MoleculeSpec | None = None
    protein: ProteinSpec | None = None
    tasks: tuple[TaskSpec, ...] = Field(min_length=1)
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)
    """About this share of each site's patients (chosen by a hash of their id) is held
    out for evaluation and never trained on."""
    holdout_min: int = Field(default=0, ge=0, le=100_000)
    """Each site holds out at least this many patients (the next by hash order), but
    never more than half of them: a small site still gets a usable held-out set."""

    @model_validator(mode="after")
    def _names_are_consistent(self) -> StudyContract:
        features = [f.name for f in self.numeric] + [f.name for f in self.categorical]
        if _repeated(features):
            raise ValueError(f"feature names repeat: {_repeated(features)}")
        tasks = [task.name for task in self.tasks]
        if _repeated(tasks):
            raise ValueError(f"task names repeat: {_repeated(tasks)}")
        labels = {field for task in self.tasks for field in task.label_fields}
        clash = sorted(labels & set(features))
        if clash:
            raise ValueError(f"targets must not also be features: {clash}")
        if self.patient_id in features or self.patient_id in labels:
            raise ValueError(f"the patient id {self.patient_id!r} must not also be a feature")
        if not self.modalities:
            raise ValueError(
                "a study needs at least one modality: features, omics, molecule or protein"
            )
        return self

    @property
    def modalities(self) -> tuple[Modality, ...]:
        """The modalities this study uses, in `MODALITY_ORDER`."""
        present: dict[Modality, bool] = {
            "clinical": bool(self.numeric or self.categorical),
            "omics": self.omics is not None,
            "molecule": self.molecule is not None,
            "protein": self.protein is not None,
        }
        return tuple(modality for modality in MODALITY_ORDER if present[modality])

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Names of the numeric clinical features, in order."""
        return tuple(feature.name for feature in self.numeric)

    def task(self, name: str) -> TaskSpec:
        """The task called `name`; KeyError if the study has none."""
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(name)

    def canonical_json(self) -> str:
        """The contract as sorted, compact JSON: what instructions to the sites carry.
        Keys added after contracts were in use are left out while they hold their
        default (`_ADDED_LATER`), so those contracts keep their digest."""
        document = _without_later_defaults(self.model_dump(mode="json"))
        document["tasks"] = [_task_without_later_defaults(task) for task in document["tasks"]]
        return json.dumps(document, sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        """A stable digest of the contract's canonical JSON; part of the model's identity."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    @classmethod
    def from_toml_table(cls, table: Mapping[str, Any]) -> StudyContract:
        """Parse a contract from a TOML table (a plain `model_validate`)."""
        return cls.model_validate(table)


_ADDED_LATER: dict[str, object] = {
    "unit": None,  # TaskSpec.unit (a feature's unit is never None)
    "optional": False,
    "holdout_fraction": 0.2,
    "holdout_min": 0,
}


def _without_later_defaults(value: Any) -> Any:
    if isinstance(value, list):
        return [_without_later_defaults(item) for item in value]
    if isinstance(value, dict):
        return {
            key: _without_later_defaults(item)
            for key, item in value.items()
            if not (
                key in _ADDED_LATER
                and item == _ADDED_LATER[key]
                and type(item) is type(_ADDED_LATER[key])
            )
        }
    return value


_TASK_ADDED_LATER: dict[str, object] = {
    "interval_cuts": [],
    "reference_mean": 0.0,
    "reference_scale": 1.0,
}


def _task_without_later_defaults(task: dict[str, Any]) -> dict[str, Any]:
    """A task's keys added later, left out while they hold their default. Its
    `survival_loss` is left out only where it means nothing (a task that is not
    survival): a survival task's loss changed its default, so it is always hashed and
    a survival contract written before the field keeps no digest it no longer earns."""
    return {
        key: item
        for key, item in task.items()
        if not (
            (key == "survival_loss" and task.get("kind") != "survival")
            or (
                key in _TASK_ADDED_LATER
                and item == _TASK_ADDED_LATER[key]
                and type(item) is type(_TASK_ADDED_LATER[key])
            )
        )
    }


def _feature(
    name: str, unit: str, lo: float, hi: float, mean: float, scale: float
) -> NumericFeature:
    return NumericFeature(
        name=name, unit=unit, minimum=lo, maximum=hi, reference_mean=mean, reference_scale=scale
    )


DEMO_CONTRACT = StudyContract(
    numeric=(
        _feature("age", "a", 18, 110, 62, 14),
        _feature("bmi", "kg/m2", 12, 70, 27, 5),
        _feature("systolic_bp", "mm[Hg]", 60, 260, 132, 18),
        _feature("heart_rate", "/min", 25, 220, 78, 13),
        _feature("glucose", "mmol/L", 1.5, 40, 6.2, 1.8),
        _feature("creatinine", "umol/L", 20, 1500, 90, 30),
        _feature("hemoglobin", "g/dL", 4, 22, 13.5, 1.7),
        _feature("albumin", "g/L", 10, 60, 40, 5),
    ),
    tasks=(TaskSpec(name="readmission", kind="binary", target="readmitted_30d"),),
)
"""The demo study's contract: eight routine clinical measurements and 30-day readmission."""
