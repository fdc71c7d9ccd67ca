"""Omics matrices (CSV/TSV): samples x genes or genes x samples, onto the contract's panel.

The matrix's columns (or rows) are matched to the panel's genes by symbol; values land in
panel order, as measured (the contract's transform is applied by the model). An empty
cell or `NA` is a gene not measured (NaN). Every panel gene must be in the matrix: one
that is not is a gene panel mismatch. Genes outside the panel are ignored.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from medfed.model.contract import OmicsPanel, StudyContract
from medfed.sites.config import DatasetConfig
from medfed.sites.connectors.tables import Table, TableError, read_table
from medfed.sites.records import DatasetRead, RecordBuilder, Where, is_blank, parse_number

_MISSING = frozenset({"na", "nan", "null", "."})


def read_omics(dataset: DatasetConfig, contract: StudyContract, base: Path) -> DatasetRead:
    """Read every matrix file of an `omics` dataset."""
    builder = RecordBuilder(contract, dataset, one_row_per_patient=True)
    builder.check_mapping(Where(f"dataset {dataset.name}"))
    if contract.omics is None:
        builder.problem(Where(f"dataset {dataset.name}"), "the study contract has no omics panel")
        return builder.result()
    for relative in dataset.paths:
        path = relative if relative.is_absolute() else base / relative
        try:
            table = read_table(path, delimiter=dataset.delimiter, encoding=dataset.encoding)
        except TableError as exc:
            builder.problems.append(exc.problem)
            continue
        builder.problems.extend(table.problems)
        if dataset.orientation == "samples_x_genes":
            _samples_by_genes(table, dataset, contract.omics, builder)
        else:
            _genes_by_samples(table, contract.omics, builder)
    return builder.result()


def _panel_mismatch(
    name: str, panel: OmicsPanel, present: set[str], builder: RecordBuilder
) -> bool:
    missing = [gene for gene in panel.genes if gene not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        builder.problem(
            Where(name, 1),
            f"gene panel mismatch: {len(missing)} of the panel's {len(panel.genes)} genes are"
            f" not in the matrix ({shown})",
        )
    return bool(missing)


def _value(cell: object, where: Where, builder: RecordBuilder, panel: OmicsPanel) -> float | None:
    """The cell's value; NaN when not measured; None (and a problem) when it is no number."""
    if is_blank(cell) or (isinstance(cell, str) and cell.strip().lower() in _MISSING):
        return math.nan
    value = parse_number(cell)
    if value is None:
        builder.problem(where, f"{cell!r} is not a number")
        return None
    if panel.transform == "log1p" and value < 0:
        builder.problem(where, f"{value:g} is negative, but the panel takes counts (log1p)")
        return None
    return value


def _samples_by_genes(
    table: Table, dataset: DatasetConfig, panel: OmicsPanel, builder: RecordBuilder
) -> None:
    id_column = dataset.patient_id if dataset.patient_id in table.header else table.header[0]
    if _panel_mismatch(table.file, panel, set(table.header[1:]), builder):
        return
    for line, row in table.rows:
        patient_id = builder.patient(row.get(id_column), Where(table.file, line, id_column))
        if patient_id is None:
            continue
        values = [
            _value(row.get(g), Where(table.file, line, g), builder, panel) for g in panel.genes
        ]
        _keep(patient_id, values, Where(table.file, line, id_column), builder)
        for name, target in builder.target_sources().items():
            column = target.column or name
            builder.add_target(patient_id, name, row.get(column), Where(table.file, line, column))


def _genes_by_samples(table: Table, panel: OmicsPanel, builder: RecordBuilder) -> None:
    gene_column, samples = table.header[0], table.header[1:]
    by_gene = {str(row.get(gene_column, "")).strip(): (line, row) for line, row in table.rows}
    if _panel_mismatch(table.file, panel, set(by_gene), builder):
        return
    for sample in samples:
        patient_id = builder.patient(sample, Where(table.file, 1, sample))
        if patient_id is None:
            continue
        values = []
        for gene in panel.genes:
            line, row = by_gene[gene]
            values.append(_value(row.get(sample), Where(table.file, line, sample), builder, panel))
        _keep(patient_id, values, Where(table.file, 1, sample), builder)


def _keep(
    patient_id: str, values: list[float | None], where: Where, builder: RecordBuilder
) -> None:
    if any(value is None for value in values):
        return
    record = builder.record(patient_id)
    if record.omics is not None:
        builder.problem(where, f"patient {patient_id!r} has a second omics profile")
        return
    record.omics = np.array(values, dtype=np.float32)
