"""A site's data, loaded once: samples, the held-out split, the manifest, every problem.

`load_site_data` is the one entry point the site trainer and `medfed site check` call.
The manifest identifies the data without revealing it: a SHA-256 fingerprint over the
canonical mapped data (patients sorted by id, fields in contract order, exact float
bytes), the patient count, coverage counts per modality and the contract's digest. The
privacy ledger and the audit chain key on the fingerprint.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from medfed.model.contract import MODALITY_ORDER, Modality, StudyContract
from medfed.model.sample import PatientSample
from medfed.sites.config import DatasetConfig, NumericSource, TargetSource
from medfed.sites.connectors import read_dataset
from medfed.sites.errors import DataError, DataProblem
from medfed.sites.join import join_patients, split_by_patient
from medfed.sites.records import DatasetRead, PartialRecord

LEGACY_TABLE_NAME = "patients.csv"
"""The table a site without `[[datasets]]` reads from its data_dir (the demo's layout)."""


class SiteDataSource(Protocol):
    """What `load_site_data` needs of `site.toml` (`client.config.SiteConfig` has it)."""

    @property
    def datasets(self) -> tuple[DatasetConfig, ...]: ...

    @property
    def source(self) -> Path: ...

    @property
    def data_dir(self) -> Path: ...


@dataclass(frozen=True)
class DatasetManifest:
    """What identifies a site's mapped data; counts only, never a value."""

    fingerprint: str
    contract_sha256: str
    patients: int
    coverage: Mapping[Modality, int]
    labelled: Mapping[str, int]
    datasets: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "fingerprint": self.fingerprint,
            "contract_sha256": self.contract_sha256,
            "patients": self.patients,
            "coverage": dict(self.coverage),
            "labelled": dict(self.labelled),
            "datasets": list(self.datasets),
        }


@dataclass(frozen=True)
class DatasetSummary:
    """One dataset as `medfed site check` shows it: patients, coverage, missingness."""

    name: str
    format: str
    patients: int
    coverage: Mapping[Modality, int]
    missing: Mapping[str, int]
    problems: tuple[DataProblem, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "format": self.format,
            "patients": self.patients,
            "coverage": dict(self.coverage),
            "missing": dict(self.missing),
            "problems": [_problem_json(p) for p in self.problems],
        }


@dataclass(frozen=True)
class SiteData:
    """A site's samples (one per patient), split by patient, with manifest and problems."""

    samples: tuple[PatientSample, ...]
    train: tuple[PatientSample, ...]
    held_out: tuple[PatientSample, ...]
    manifest: DatasetManifest
    datasets: tuple[DatasetSummary, ...]
    problems: tuple[DataProblem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def require_clean(self) -> SiteData:
        """This data if it has no problem; else `DataError` carrying every problem, so
        nothing is ever trained on a bad row."""
        if self.problems:
            raise DataError(list(self.problems))
        return self


def legacy_datasets(data_dir: Path, contract: StudyContract) -> tuple[DatasetConfig, ...]:
    """The one CSV table a site.toml without `[[datasets]]` reads: `data_dir/patients.csv`
    with columns named as the contract's features and targets."""
    return (
        DatasetConfig(
            name="patients",
            format="csv",
            paths=(data_dir / LEGACY_TABLE_NAME,),
            patient_id=contract.patient_id,
            numeric={feature.name: NumericSource() for feature in contract.numeric},
            targets={name: TargetSource() for task in contract.tasks for name in task.label_fields},
        ),
    )


def load_site_data(
    config: SiteDataSource, contract: StudyContract, *, held_out_per_mille: int | None = None
) -> SiteData:
    """Read every dataset of `config`, join per patient, split (by the contract's
    `holdout_fraction` and `holdout_min` unless `held_out_per_mille` says), and
    fingerprint."""
    datasets = config.datasets or legacy_datasets(config.data_dir, contract)
    base = config.source.parent
    reads = [read_dataset(dataset, contract, base) for dataset in datasets]
    samples, conflicts = join_patients(reads, contract)
    problems = [problem for read in reads for problem in read.problems] + conflicts
    summaries = tuple(
        _summary(dataset, read, contract) for dataset, read in zip(datasets, reads, strict=True)
    )
    for summary in summaries:
        if summary.patients == 0 and not summary.problems:
            problems.append(DataProblem(f"dataset {summary.name}", None, None, "holds no patients"))
    if not samples and not problems:
        problems.append(
            DataProblem("site.toml", None, None, "the site's datasets hold no patients")
        )
    per_mille = (
        round(contract.holdout_fraction * 1000)
        if held_out_per_mille is None
        else held_out_per_mille
    )
    train, held_out = split_by_patient(samples, per_mille=per_mille, minimum=contract.holdout_min)
    return SiteData(
        samples=tuple(samples),
        train=train,
        held_out=held_out,
        manifest=build_manifest(samples, contract, tuple(d.name for d in datasets)),
        datasets=summaries,
        problems=tuple(problems),
    )


def modalities_of(sample: PatientSample | PartialRecord) -> tuple[Modality, ...]:
    """The modalities a sample (or partial record) holds, in `MODALITY_ORDER`."""
    present: dict[Modality, bool] = {
        "clinical": bool(sample.numeric) or any(sample.codes.values()),
        "omics": sample.omics is not None,
        "molecule": sample.smiles is not None,
        "protein": sample.protein is not None,
    }
    return tuple(m for m in MODALITY_ORDER if present[m])


def _coverage(
    records: Sequence[PatientSample | PartialRecord], contract: StudyContract
) -> dict[Modality, int]:
    counts: dict[Modality, int] = {m: 0 for m in contract.modalities}
    for record in records:
        for modality in modalities_of(record):
            if modality in counts:
                counts[modality] += 1
    return counts


def _summary(dataset: DatasetConfig, read: DatasetRead, contract: StudyContract) -> DatasetSummary:
    records = list(read.records.values())
    numeric = list(dataset.numeric)
    if not numeric and dataset.format == "fhir":  # FHIR reads every feature with a LOINC code
        numeric = [f.name for f in contract.numeric if f.loinc]
    names = [*numeric, *dataset.categorical, *dataset.targets]
    missing: dict[str, int] = {}
    for name in dict.fromkeys(names):
        missing[name] = sum(
            1
            for r in records
            if not r.numeric.get(name) and not r.codes.get(name) and name not in r.targets
        )
    return DatasetSummary(
        name=dataset.name,
        format=dataset.format,
        patients=len(records),
        coverage=_coverage(records, contract),
        missing=missing,
        problems=read.problems,
    )


def fingerprint(samples: Sequence[PatientSample], contract: StudyContract) -> str:
    """SHA-256 over the canonical mapped data: the contract's digest, then each patient
    (sorted by id) with every field in contract order, strings length-prefixed and
    numbers as exact IEEE-754 bytes, so any change of any value changes it."""
    digest = hashlib.sha256(contract.sha256().encode())

    def text(value: str | None) -> None:
        if value is None:
            digest.update(b"\x00")
        else:
            raw = value.encode()
            digest.update(b"\x01" + struct.pack(">Q", len(raw)) + raw)

    def number(value: float | None) -> None:
        digest.update(b"\x00" if value is None else b"\x01" + struct.pack(">d", value))

    labels = [name for task in contract.tasks for name in task.label_fields]
    for sample in sorted(samples, key=lambda s: s.patient_id):
        text(sample.patient_id)
        for feature in contract.numeric:
            number(sample.numeric.get(feature.name))
        for categorical in contract.categorical:
            codes = sorted(sample.codes.get(categorical.name, frozenset()))
            digest.update(struct.pack(">Q", len(codes)))
            for code in codes:
                text(code)
        if sample.omics is None:
            digest.update(b"\x00")
        else:
            digest.update(b"\x01" + sample.omics.astype(">f4").tobytes())
        text(sample.smiles)
        text(sample.protein)
        for name in labels:
            number(sample.targets.get(name))
    return digest.hexdigest()


def build_manifest(
    samples: Sequence[PatientSample], contract: StudyContract, datasets: tuple[str, ...]
) -> DatasetManifest:
    """The manifest of `samples`: fingerprint, counts, coverage; no raw values."""
    labels = [name for task in contract.tasks for name in task.label_fields]
    return DatasetManifest(
        fingerprint=fingerprint(samples, contract),
        contract_sha256=contract.sha256(),
        patients=len(samples),
        coverage=_coverage(samples, contract),
        labelled={name: sum(1 for s in samples if name in s.targets) for name in labels},
        datasets=datasets,
    )


def _problem_json(problem: DataProblem) -> dict[str, object]:
    return {
        "file": problem.file,
        "row": problem.row,
        "column": problem.column,
        "message": problem.message,
    }


def problem_json(problem: DataProblem) -> dict[str, object]:
    """A problem as a JSON object: file, row, column, message."""
    return _problem_json(problem)
