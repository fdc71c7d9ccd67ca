"""OMOP CDM v5.4 tables, as CSV/Parquet files (`omop`) or in a SQLite database (`omop-sql`).

Read: person (the patients), measurement and observation (numeric features by concept
id, `[datasets.numeric] glucose = { code = "3004501" }`, or by a `*_source_value` equal
to the feature's LOINC code; targets by concept id), condition_occurrence (ICD-10 or
SNOMED features) and drug_exposure (ATC or RxNorm features): a concept id is translated
by the feature's `recode`, else its `*_source_value` is taken as the code. The unit is
the dataset's, else the row's `unit_source_value`, else the contract's.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from medfed.model.contract import CategoricalFeature, StudyContract
from medfed.sites.config import DatasetConfig, NumericSource
from medfed.sites.connectors.tables import Row, TableError, read_table
from medfed.sites.records import DatasetRead, RecordBuilder, Where, is_blank, parse_time

TABLES = ("person", "measurement", "observation", "condition_occurrence", "drug_exposure")
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
        for name, source in builder.numeric_sources().items():
            for code in (source.code, builder.numeric_feature(name).loinc):
                if code:
                    self.numeric.setdefault(code, (name, source))
        self.targets = {s.code: name for name, s in builder.target_sources().items() if s.code}
        chosen = set(builder.dataset.categorical) or {f.name for f in builder.contract.categorical}
        features = [f for f in builder.contract.categorical if f.name in chosen]
        self.conditions = [f for f in features if f.system in ("icd10", "snomed")]
        self.drugs = [f for f in features if f.system in ("atc", "rxnorm")]

    def take(self, table: str, row: Row, where: Where) -> None:
        patient_id = self.builder.patient(row.get(_ID), where)
        if patient_id is None:
            return
        self.builder.record(patient_id)
        if table in ("measurement", "observation"):
            self._value(table, row, patient_id, where)
        elif table == "condition_occurrence":
            self._code("condition", row, self.conditions, patient_id, where)
        elif table == "drug_exposure":
            self._code("drug", row, self.drugs, patient_id, where)

    def _value(self, table: str, row: Row, patient_id: str, where: Where) -> None:
        concept = _text(row.get(f"{table}_concept_id"))
        source_value = _text(row.get(f"{table}_source_value"))
        time = parse_time(row.get(f"{table}_datetime")) or parse_time(row.get(f"{table}_date"))
        value_at = Where(where.file, where.row, "value_as_number")
        for code in (concept, source_value):
            if code in self.numeric:
                name, source = self.numeric[code]
                unit = source.unit or _text(row.get("unit_source_value")) or None
                self.builder.add_numeric(
                    patient_id,
                    name,
                    row.get("value_as_number"),
                    unit=unit,
                    time=time,
                    where=value_at,
                )
                break
        for code in (concept, source_value):
            if code in self.targets:
                cell = row.get("value_as_number")
                if is_blank(cell):
                    cell = row.get("value_as_string")
                self.builder.add_target(patient_id, self.targets[code], cell, value_at)
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


def _text(cell: object) -> str:
    if is_blank(cell):
        return ""
    if isinstance(cell, float) and cell.is_integer():
        return str(int(cell))
    return str(cell).strip()
