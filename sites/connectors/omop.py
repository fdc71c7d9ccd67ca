"""OMOP CDM v5.4 tables, as CSV/Parquet files (`omop`) or in a SQLite database (`omop-sql`).

Read: person (the patients; `gender_concept_id` / `gender_source_value` and
`year_of_birth`, `month_of_birth`, `day_of_birth` for `patient = "sex"` / `"age"`
features), measurement and observation (numeric features by concept id,
`[datasets.numeric] glucose = { code = "3004501" }`, or by a `*_source_value` equal to
the feature's LOINC code, from `value_as_number`, else `value_as_concept_id` or
`value_as_string` through the feature's `recode`; `local` categorical features by
`categorical.X.code` from `value_as_concept_id`, else `value_as_string`; targets by
concept id), condition_occurrence (ICD-10 or SNOMED features) and drug_exposure (ATC or
RxNorm features): a concept id is translated by the feature's `recode`, else its
`*_source_value` is taken as the code. The unit is the dataset's, else the row's
`unit_source_value`, else the contract's (targets: the task's).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from medfed.model.contract import CategoricalFeature, StudyContract
from medfed.sites.config import DatasetConfig, NumericSource
from medfed.sites.connectors.tables import Row, TableError, read_table
from medfed.sites.demographics import (
    OMOP_GENDER,
    UNKNOWN_GENDER,
    BirthDateError,
    age_at,
    birth_date,
)
from medfed.sites.records import DatasetRead, RecordBuilder, Where, is_blank, parse_time

TABLES = ("person", "measurement", "observation", "condition_occurrence", "drug_exposure")
COLUMNS = (
    "person_id", "gender_concept_id", "gender_source_value", "year_of_birth", "month_of_birth",
    "day_of_birth", "measurement_concept_id", "measurement_source_value", "measurement_date",
    "measurement_datetime", "observation_concept_id", "observation_source_value",
    "observation_date", "observation_datetime", "value_as_number", "value_as_concept_id",
    "value_as_string", "unit_source_value", "condition_concept_id", "condition_source_value",
    "drug_concept_id", "drug_source_value",
)  # fmt: skip
"""Every column the connector reads; docs/site.md lists them."""
_SUFFIXES = (".csv", ".tsv", ".parquet")
_ID = "person_id"


def read_omop(dataset: DatasetConfig, contract: StudyContract, base: Path) -> DatasetRead:
    """Read the OMOP tables of an `omop` (files) or `omop-sql` (SQLite) dataset."""
    builder = RecordBuilder(contract, dataset, one_row_per_patient=False)
    builder.check_mapping(Where(f"dataset {dataset.name}"))
    tables = (
        _sql_tables(dataset, base, builder)
        if dataset.format == "omop-sql"
        else _file_tables(dataset, base, builder)
    )
    if tables is None:
        return builder.result()
    mapper = _Mapper(builder)
    for table in TABLES:
        file, rows = tables.get(table, ("", []))
        for row_number, row in rows:
            mapper.take(table, row, Where(file, row_number, _ID))
    return builder.result()


Rows = list[tuple[int, Row]]


def _file_tables(
    dataset: DatasetConfig, base: Path, builder: RecordBuilder
) -> dict[str, tuple[str, Rows]] | None:
    found: dict[str, Path] = {}
    for relative in dataset.paths:
        path = relative if relative.is_absolute() else base / relative
        candidates = sorted(path.iterdir()) if path.is_dir() else [path]
        for candidate in candidates:
            if candidate.stem.lower() in TABLES and candidate.suffix.lower() in _SUFFIXES:
                found[candidate.stem.lower()] = candidate
    if "person" not in found:
        shown = ", ".join(str(p) for p in dataset.paths)
        builder.problem(Where(shown), "holds no OMOP person table (person.csv or person.parquet)")
        return None
    tables: dict[str, tuple[str, Rows]] = {}
    for name, path in found.items():
        try:
            table = read_table(
                path, delimiter=dataset.delimiter, encoding=dataset.encoding, required=(_ID,)
            )
        except TableError as exc:
            builder.problems.append(exc.problem)
            continue
        builder.problems.extend(table.problems)
        tables[name] = (table.file, list(table.rows))
    return tables


def _sql_tables(
    dataset: DatasetConfig, base: Path, builder: RecordBuilder
) -> dict[str, tuple[str, Rows]] | None:
    relative = dataset.sqlite_path
    assert relative is not None  # the config requires a connection for omop-sql
    path = relative if relative.is_absolute() else base / relative
    where = Where(str(dataset.connection))
    if not path.is_file():
        builder.problem(where, f"database file {path} does not exist")
        return None
    tables: dict[str, tuple[str, Rows]] = {}
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
            present = {
                r[0].lower()
                for r in connection.execute(
                    "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')"
                )
            }
            if "person" not in present:
                builder.problem(where, "holds no OMOP person table")
                return None
            for name in TABLES:
                if name not in present:
                    continue
                cursor = connection.execute(f"SELECT * FROM {name}")  # name from TABLES only
                columns = [d[0].lower() for d in cursor.description]
                if _ID not in columns:
                    builder.problem(Where(f"{where.file}#{name}", 1, _ID), "column is missing")
                    continue
                rows = [
                    (i, dict(zip(columns, values, strict=True)))
                    for i, values in enumerate(cursor, start=1)
                ]
                tables[name] = (f"{where.file}#{name}", rows)
    except sqlite3.Error as exc:
        builder.problem(where, f"cannot be read as an OMOP database ({exc})")
        return None
    return tables


class _Mapper:
    """Maps OMOP rows onto the builder by concept ids and source values."""

    def __init__(self, builder: RecordBuilder) -> None:
        self.builder = builder
        self.numeric: dict[str, tuple[str, NumericSource]] = {}
        self.demographics: dict[str, NumericSource] = {}
        for name, source in builder.numeric_sources().items():
            if source.patient is not None:
                self.demographics[name] = source
                continue
            for code in (source.code, builder.numeric_feature(name).loinc):
                if code:
                    self.numeric.setdefault(code, (name, source))
        self.targets = {s.code: name for name, s in builder.target_sources().items() if s.code}
        self.valued = {s.code: name for name, s in builder.categorical_sources().items() if s.code}
        chosen = set(builder.dataset.categorical) or {f.name for f in builder.contract.categorical}
        features = [f for f in builder.contract.categorical if f.name in chosen]
        features = [f for f in features if f.name not in self.valued.values()]
        self.conditions = [f for f in features if f.system in ("icd10", "snomed")]
        self.drugs = [f for f in features if f.system in ("atc", "rxnorm")]

    def take(self, table: str, row: Row, where: Where) -> None:
        patient_id = self.builder.patient(row.get(_ID), where)
        if patient_id is None:
            return
        self.builder.record(patient_id)
        if table == "person":
            self._person(row, patient_id, where)
        elif table in ("measurement", "observation"):
            self._value(table, row, patient_id, where)
        elif table == "condition_occurrence":
            self._code("condition", row, self.conditions, patient_id, where)
        elif table == "drug_exposure":
            self._code("drug", row, self.drugs, patient_id, where)

    def _person(self, row: Row, patient_id: str, where: Where) -> None:
        """Sex from gender_concept_id (8507 male, 8532 female; else gender_source_value)
        and age at the index date from year/month/day_of_birth."""
        index = self.builder.dataset.index_date
        for name, source in self.demographics.items():
            if source.patient == "sex":
                at = Where(where.file, where.row, "gender_concept_id")
                concept = _text(row.get("gender_concept_id"))
                local = _text(row.get("gender_source_value"))
                value = next(
                    (v for v in (concept, local) if v in source.recode),
                    OMOP_GENDER.get(concept, local),
                )
                if value not in UNKNOWN_GENDER:
                    self.builder.add_numeric(
                        patient_id, name, value, unit=None, time=None, where=at
                    )
            elif index is not None and not is_blank(row.get("year_of_birth")):
                at = Where(where.file, where.row, "year_of_birth")
                try:
                    born = birth_date(
                        row.get("year_of_birth"), row.get("month_of_birth"), row.get("day_of_birth")
                    )
                    age = age_at(born, index)
                except BirthDateError as exc:
                    self.builder.problem(at, str(exc))
                    continue
                self.builder.add_numeric(patient_id, name, age, unit="a", time=None, where=at)

    def _value(self, table: str, row: Row, patient_id: str, where: Where) -> None:
        concept = _text(row.get(f"{table}_concept_id"))
        source_value = _text(row.get(f"{table}_source_value"))
        time = parse_time(row.get(f"{table}_datetime")) or parse_time(row.get(f"{table}_date"))
        unit = _text(row.get("unit_source_value")) or None
        for code in (concept, source_value):
            if code in self.numeric:
                name, source = self.numeric[code]
                cell, column = _value_cell(row)
                self.builder.add_numeric(
                    patient_id,
                    name,
                    cell,
                    unit=source.unit or unit,
                    time=time,
                    where=Where(where.file, where.row, column),
                )
                break
        for code in (concept, source_value):
            if code in self.valued:
                cell, column = _value_cell(row, concept_first=True)
                at = Where(where.file, where.row, column)
                if is_blank(cell):
                    self.builder.problem(at, f"{table} {code} ({self.valued[code]}) has no value")
                else:
                    self.builder.add_codes(patient_id, self.valued[code], [_text(cell)], at)
                break
        for code in (concept, source_value):
            if code in self.targets:
                cell, column = _value_cell(row)
                self.builder.add_target(
                    patient_id,
                    self.targets[code],
                    cell,
                    Where(where.file, where.row, column),
                    unit=unit,
                )
                break

    def _code(
        self,
        prefix: str,
        row: Row,
        features: list[CategoricalFeature],
        patient_id: str,
        where: Where,
    ) -> None:
        if not features:
            return
        concept = _text(row.get(f"{prefix}_concept_id"))
        source_value = _text(row.get(f"{prefix}_source_value"))
        at = Where(where.file, where.row, f"{prefix}_concept_id")
        for feature in features:
            source = self.builder.dataset.categorical.get(feature.name)
            recode = source.recode if source is not None else {}
            code = concept if concept in recode else source_value
            if recode.get(code, code) in feature.vocabulary or feature is features[-1]:
                if code:
                    self.builder.add_codes(patient_id, feature.name, [code], at)
                else:
                    self.builder.problem(
                        at, f"concept {concept!r} has no recode and no {prefix}_source_value"
                    )
                return


def _value_cell(row: Row, *, concept_first: bool = False) -> tuple[object, str]:
    """A measurement or observation row's value and its column: value_as_number, else
    value_as_concept_id (0 is OMOP's "no concept"), else value_as_string; a coded
    feature looks at the concept first."""
    concept = row.get("value_as_concept_id")
    has_concept = not is_blank(concept) and _text(concept) != "0"
    order = ["value_as_number", "value_as_concept_id", "value_as_string"]
    if concept_first:
        order = ["value_as_concept_id", "value_as_string", "value_as_number"]
    for column in order:
        cell = row.get(column)
        if column == "value_as_concept_id" and not has_concept:
            continue
        if not is_blank(cell):
            return (_text(cell) if column == "value_as_concept_id" else cell), column
    return None, order[0]


def _text(cell: object) -> str:
    if is_blank(cell):
        return ""
    if isinstance(cell, float) and cell.is_integer():
        return str(int(cell))
    return str(cell).strip()
