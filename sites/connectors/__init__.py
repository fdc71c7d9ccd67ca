"""Connectors: each reads one dataset format into per-patient partial records and problems.

Every connector is a `Connector`: given the dataset's config, the study contract and
the folder its relative paths start from, it returns a `DatasetRead` and never raises
for bad data (problems name file, row and column). `CONNECTORS` maps each format of
`site.toml` to its connector; one shared test suite runs over all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from medfed.model.contract import StudyContract
from medfed.sites.config import DatasetConfig, DatasetFormat
from medfed.sites.connectors.fhir import read_fhir
from medfed.sites.connectors.molecules import is_smi_file, read_fasta, read_smi
from medfed.sites.connectors.omics import read_omics
from medfed.sites.connectors.omop import read_omop
from medfed.sites.connectors.tabular import read_tabular
from medfed.sites.records import DatasetRead


class Connector(Protocol):
    """Reads one dataset: `(dataset, contract, base folder) -> DatasetRead`."""

    def __call__(
        self, dataset: DatasetConfig, contract: StudyContract, base: Path
    ) -> DatasetRead: ...


def read_smiles(dataset: DatasetConfig, contract: StudyContract, base: Path) -> DatasetRead:
    """A SMILES dataset: `.smi` files, or a table (CSV, Parquet) with a SMILES column."""
    if all(is_smi_file(path) for path in dataset.paths):
        return read_smi(dataset, contract, base)
    return read_tabular(dataset, contract, base)


CONNECTORS: Mapping[DatasetFormat, Connector] = {
    "csv": read_tabular,
    "parquet": read_tabular,
    "fhir": read_fhir,
    "omop": read_omop,
    "omop-sql": read_omop,
    "smiles": read_smiles,
    "fasta": read_fasta,
    "omics": read_omics,
}


def read_dataset(dataset: DatasetConfig, contract: StudyContract, base: Path) -> DatasetRead:
    """Read `dataset` with its format's connector."""
    return CONNECTORS[dataset.format](dataset, contract, base)
