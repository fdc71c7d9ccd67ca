"""CSV/TSV and Parquet tables (and SMILES in a table): columns mapped onto the contract.

Without a `time_column` a table holds one row per patient: a patient repeated with a
different value is a problem. With one, rows are repeated measurements, reduced later
by each feature's rule.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from medfed.model.contract import StudyContract
from medfed.sites.config import DatasetConfig
from medfed.sites.connectors.molecules import check_smiles
from medfed.sites.connectors.tables import Row, Table, TableError, read_table
from medfed.sites.records import DatasetRead, RecordBuilder, Where, is_blank, parse_time


def read_tabular(dataset: DatasetConfig, contract: StudyContract, base: Path) -> DatasetRead:
    """Read every file of a `csv`, `parquet` or tabular `smiles` dataset."""
    builder = RecordBuilder(contract, dataset, one_row_per_patient=dataset.time_column is None)
    builder.check_mapping(Where(f"dataset {dataset.name}"))
    for relative in dataset.paths:
        path = relative if relative.is_absolute() else base / relative
        try:
            table = read_table(
                path,
                delimiter=dataset.delimiter,
                encoding=dataset.encoding,
                required=_required_columns(dataset, builder),
            )
        except TableError as exc:
            builder.problems.append(exc.problem)
            continue
        builder.problems.extend(table.problems)
        _map_rows(table, dataset, builder)
    return builder.result()


def _required_columns(dataset: DatasetConfig, builder: RecordBuilder) -> tuple[str, ...]:
    columns = [dataset.patient_id]
    if dataset.time_column is not None:
        columns.append(dataset.time_column)
    if dataset.format == "smiles":
        columns.append(dataset.smiles_column)
    for sources in (
        builder.numeric_sources(),
        builder.categorical_sources(),
        builder.target_sources(),
    ):
        for name, source in sources.items():
            columns.append(source.column or name)
    return tuple(dict.fromkeys(columns))


def _map_rows(table: Table, dataset: DatasetConfig, builder: RecordBuilder) -> None:
    for line, row in table.rows:
        where = Where(table.file, line, dataset.patient_id)
        patient_id = builder.patient(row.get(dataset.patient_id), where)
        if patient_id is None:
            continue
        builder.record(patient_id)
        time = _row_time(row, dataset, table.file, line, builder)
        for name, source in builder.numeric_sources().items():
            column = source.column or name
            builder.add_numeric(
                patient_id,
                name,
                row.get(column),
                unit=source.unit,
                time=time,
                where=Where(table.file, line, column),
            )
        for name, coded in builder.categorical_sources().items():
            column = coded.column or name
            cell = row.get(column)
            if not is_blank(cell):
                codes = [code.strip() for code in str(cell).split(coded.separator)]
                builder.add_codes(
                    patient_id, name, [c for c in codes if c], Where(table.file, line, column)
                )
        for name, target in builder.target_sources().items():
            column = target.column or name
            builder.add_target(patient_id, name, row.get(column), Where(table.file, line, column))
        if dataset.format == "smiles":
            where = Where(table.file, line, dataset.smiles_column)
            _add_smiles(row, dataset, builder, patient_id, where)


def _add_smiles(
    row: Row, dataset: DatasetConfig, builder: RecordBuilder, patient_id: str, where: Where
) -> None:
    cell = row.get(dataset.smiles_column)
    if is_blank(cell):
        return
    smiles = str(cell).strip()
    molecule = builder.contract.molecule
    if molecule is None:
        builder.problem(where, "the study contract has no molecules")
        return
    problem = check_smiles(smiles, molecule)
    if problem is not None:
        builder.problem(where, problem)
        return
    record = builder.record(patient_id)
    if record.smiles is not None and record.smiles != smiles:
        builder.problem(where, f"patient {patient_id!r} already has another molecule")
        return
    record.smiles = smiles


def _row_time(
    row: Row, dataset: DatasetConfig, file: str, line: int, builder: RecordBuilder
) -> dt.datetime | None:
    if dataset.time_column is None:
        return None
    cell = row.get(dataset.time_column)
    time = parse_time(cell)
    if time is None:
        builder.problem(
            Where(file, line, dataset.time_column), f"{cell!r} is not an ISO date or date-time"
        )
    return time
