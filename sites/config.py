"""The data part of `site.toml`: which datasets a site holds and how they map onto the contract.

Each `[[datasets]]` entry names its files, its format and how local columns, codes and
units map onto the study contract's names. The models are strict (unknown keys refused)
and frozen; `client/config.py` embeds them in `SiteConfig`. Paths are relative to the
folder of `site.toml`; the caller resolves them.

```toml
[[datasets]]
name = "labs"
format = "csv"
paths = ["data/labs.csv"]
patient_id = "mrn"
time_column = "taken_at"
[datasets.numeric]
glucose = { column = "glu", unit = "mg/dL" }
sex = { column = "sex", recode = { M = 1, F = 0 } }
[datasets.categorical]
diagnoses = { column = "icd", separator = ";" }
[datasets.targets]
readmitted_30d = { column = "readmit", recode = { yes = 1, no = 0 } }
```
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from medfed.model.device_kinds import DeviceKind

DatasetFormat = Literal["csv", "parquet", "fhir", "omop", "omop-sql", "smiles", "fasta", "omics"]
Accelerator = DeviceKind
Orientation = Literal["samples_x_genes", "genes_x_samples"]

DATASET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_STRICT = ConfigDict(frozen=True, extra="forbid")


PatientField = Literal["age", "sex"]
"""Demographics read from the patient resource or table, not from observations: `age`
(FHIR `Patient.birthDate`, OMOP `person.year/month/day_of_birth`, in years at the
dataset's `index_date`) and `sex` (FHIR `Patient.gender`, OMOP `person.gender_concept_id`
8507 male / 8532 female, then `gender_source_value`), mapped to a number by `recode`."""


class NumericSource(BaseModel):
    """Where one contract numeric feature comes from in a dataset, and in which unit.

    `column` names a table column (CSV/Parquet); `code` names the LOINC code of FHIR
    Observations (default: the contract feature's `loinc`) or the OMOP concept id of a
    measurement/observation; `patient` reads a demographic instead (`PatientField`).
    `unit` is the local unit (UCUM); unset means the unit the record itself states
    (FHIR valueQuantity, OMOP unit_source_value) or, failing that, the contract's unit.
    `recode` maps local values (text, a FHIR code or boolean `true`/`false`, an OMOP
    `value_as_concept_id`) onto numbers in the contract's unit: `{ M = 1, F = 0 }`.
    """

    model_config = _STRICT

    column: str | None = None
    code: str | None = None
    patient: PatientField | None = None
    unit: str | None = None
    recode: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_place(self) -> NumericSource:
        if self.patient is not None and (self.column is not None or self.code is not None):
            raise ValueError("a numeric source reads a patient field, or a column/code: not both")
        if self.patient == "sex" and not self.recode:
            raise ValueError("patient = 'sex' needs a recode, e.g. { male = 1, female = 0 }")
        return self


class CategoricalSource(BaseModel):
    """Where one contract categorical feature's codes come from.

    Tables: `column` holds one or more codes split by `separator`. FHIR: codes come
    from the resource type that carries the feature's code system (Condition for ICD-10,
    MedicationRequest/Statement for ATC or RxNorm). OMOP: concept ids are translated by
    `recode` (concept id -> contract code). `recode` also renames local codes in tables.
    With `code`, the feature's value is the *value* of the FHIR Observations with that
    code (valueCodeableConcept's code, valueString, valueBoolean) or of the OMOP
    observation/measurement rows with that concept id or source value
    (value_as_concept_id, else value_as_string): how a `local` feature such as smoking
    status is read.
    """

    model_config = _STRICT

    column: str | None = None
    code: str | None = None
    separator: str = Field(default=";", min_length=1)
    recode: dict[str, str] = Field(default_factory=dict)


class TargetSource(BaseModel):
    """Where a task's target (or survival event) column comes from.

    `column` for tables; `code` for a FHIR Observation code or an OMOP observation
    concept id. `recode` maps local labels onto numbers (`yes = 1`); a multiclass target
    may also hold the contract's class names, which become their class index. `unit`
    is the local unit of a survival time or regression target (UCUM: `d`, `wk`, `mo`,
    `a`); unset means the unit the record states (FHIR valueQuantity, OMOP
    unit_source_value) or the task's. Converted to the task's `unit`.
    """

    model_config = _STRICT

    column: str | None = None
    code: str | None = None
    unit: str | None = None
    recode: dict[str, float] = Field(default_factory=dict)


class DatasetConfig(BaseModel):
    """One `[[datasets]]` entry of `site.toml`."""

    model_config = _STRICT

    name: str = Field(pattern=DATASET_NAME_PATTERN)
    format: DatasetFormat
    paths: tuple[Path, ...] = ()
    connection: str | None = Field(default=None, pattern=r"^sqlite:///.+")
    patient_id: str = "patient_id"
    time_column: str | None = None
    delimiter: str | None = Field(default=None, min_length=1, max_length=1)
    encoding: str = "utf-8"
    numeric: dict[str, NumericSource] = Field(default_factory=dict)
    categorical: dict[str, CategoricalSource] = Field(default_factory=dict)
    targets: dict[str, TargetSource] = Field(default_factory=dict)
    smiles_column: str = "smiles"
    sequence_column: str = "sequence"
    orientation: Orientation = "samples_x_genes"
    index_date: dt.date | None = None
    """The date at which `patient = "age"` is computed (completed years)."""

    @model_validator(mode="after")
    def _where_the_data_is(self) -> DatasetConfig:
        if self.format == "omop-sql":
            if self.connection is None:
                raise ValueError("format omop-sql needs connection = 'sqlite:///PATH'")
            if self.paths:
                raise ValueError("format omop-sql reads its connection, not paths")
        else:
            if not self.paths:
                raise ValueError(f"format {self.format} needs at least one path in paths")
            if self.connection is not None:
                raise ValueError(f"format {self.format} takes paths, not a connection")
        demographics = {name for name, s in self.numeric.items() if s.patient is not None}
        if demographics and self.format not in ("fhir", "omop", "omop-sql"):
            raise ValueError(
                f"numeric {sorted(demographics)}: `patient` fields are read from FHIR or OMOP;"
                " a table maps a column"
            )
        ages = [name for name, s in self.numeric.items() if s.patient == "age"]
        if ages and self.index_date is None:
            raise ValueError(
                f"numeric.{ages[0]} is an age from the birth date: set index_date = 'YYYY-MM-DD'"
            )
        return self

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file of an `omop-sql` connection string, as written."""
        if self.connection is None:
            return None
        return Path(self.connection.removeprefix("sqlite:///"))


def _names_are_unique(datasets: tuple[DatasetConfig, ...]) -> tuple[DatasetConfig, ...]:
    names = [dataset.name for dataset in datasets]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"dataset names repeat: {repeated}")
    return datasets


Datasets = Annotated[tuple[DatasetConfig, ...], AfterValidator(_names_are_unique)]
"""The `[[datasets]]` array of `site.toml`: names unique within the site."""


class SiteDataConfig(BaseModel):
    """The data and hardware part of `site.toml`, for callers that hold only that."""

    model_config = _STRICT

    datasets: Datasets = ()
    accelerator: Accelerator = "cpu"
