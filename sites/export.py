"""Writing patients out in every format a site reads, with the `[[datasets]]` entry for each.

The synthetic consortium generator and the example consortium both use this: give it
patients (values already in the contract's units) and a format, and it writes the files
and returns the `DatasetConfig` that reads them back. Every write is whole-file.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tomli_w

from medfed.model.contract import StudyContract
from medfed.sites.config import DatasetConfig
from medfed.sites.connectors.fhir import CODE_SYSTEMS

ClinicalFormat = Literal["csv", "parquet", "fhir", "omop"]
TARGET_CODE_PREFIX = "medfed-target-"
"""FHIR Observation / OMOP observation code under which a target is written."""


@dataclass(frozen=True)
class ClinicalPatient:
    """One patient's clinical values in the contract's units, codes and labels."""

    patient_id: str
    numeric: Mapping[str, float] = field(default_factory=dict)
    codes: Mapping[str, Sequence[str]] = field(default_factory=dict)
    targets: Mapping[str, float] = field(default_factory=dict)


def _code_of(contract: StudyContract, name: str) -> str:
    feature = next(f for f in contract.numeric if f.name == name)
    return feature.loinc or f"medfed-{name}"


def _label_fields(contract: StudyContract) -> list[str]:
    return [name for task in contract.tasks for name in task.label_fields]


def write_clinical(
    patients: Sequence[ClinicalPatient],
    contract: StudyContract,
    folder: Path,
    *,
    fmt: ClinicalFormat,
    name: str,
    relative_to: Path,
) -> DatasetConfig:
    """Write `patients` under `folder` in `fmt`; the dataset entry, with paths relative
    to `relative_to` (the folder of site.toml)."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = _label_fields(contract)
    numeric = [f.name for f in contract.numeric]
    categorical = [f.name for f in contract.categorical]
    if fmt in ("csv", "parquet"):
        path = folder / f"{name}.{fmt}"
        rows = [_flat_row(p, numeric, categorical, labels, contract.patient_id) for p in patients]
        _write_rows(path, rows, [contract.patient_id, *numeric, *categorical, *labels])
        return DatasetConfig.model_validate(
            {
                "name": name,
                "format": fmt,
                "paths": [str(path.relative_to(relative_to))],
                "patient_id": contract.patient_id,
                "numeric": {n: {} for n in numeric},
                "categorical": {c: {} for c in categorical},
                "targets": {t: {} for t in labels},
            }
        )
    coded = {
        "numeric": {n: {"code": _code_of(contract, n)} for n in numeric},
        "categorical": {c: {} for c in categorical},
        "targets": {t: {"code": TARGET_CODE_PREFIX + t} for t in labels},
    }
    if fmt == "fhir":
        path = folder / f"{name}.ndjson"
        lines = [json.dumps(r) for p in patients for r in _fhir_resources(p, contract)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        where: dict[str, Any] = {"paths": [str(path.relative_to(relative_to))]}
    else:
        omop = folder / name
        omop.mkdir(parents=True, exist_ok=True)
        for table, (columns, rows) in _omop_tables(patients, contract).items():
            _write_rows(omop / f"{table}.csv", rows, columns)
        where = {"paths": [str(omop.relative_to(relative_to))]}
    return DatasetConfig.model_validate({"name": name, "format": fmt, **where, **coded})


def _flat_row(
    patient: ClinicalPatient,
    numeric: list[str],
    categorical: list[str],
    labels: list[str],
    pid: str,
) -> dict[str, object]:
    row: dict[str, object] = {pid: patient.patient_id}
    row.update({n: patient.numeric.get(n) for n in numeric})
    row.update({c: ";".join(patient.codes.get(c, ())) or None for c in categorical})
    row.update({t: patient.targets.get(t) for t in labels})
    return row


def _write_rows(path: Path, rows: list[dict[str, object]], columns: list[str]) -> None:
    if path.suffix == ".parquet":
        table = pa.table({c: [row.get(c) for row in rows] for c in columns})
        pq.write_table(table, path)
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else _cell(row[c]) for c in columns])
    path.write_text(buffer.getvalue(), encoding="utf-8")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if not value.is_integer() else str(int(value))
    return str(value)


def _fhir_resources(patient: ClinicalPatient, contract: StudyContract) -> list[dict[str, Any]]:
    pid = patient.patient_id
    subject = {"reference": f"Patient/{pid}"}
    units = {f.name: f.unit for f in contract.numeric}
    out: list[dict[str, Any]] = [{"resourceType": "Patient", "id": pid}]
    for n, (name, value) in enumerate(patient.numeric.items()):
        out.append(
            {
                "resourceType": "Observation",
                "id": f"{pid}-n{n}",
                "status": "final",
                "code": {
                    "coding": [{"system": "http://loinc.org", "code": _code_of(contract, name)}]
                },
                "subject": subject,
                "valueQuantity": {
                    "value": value,
                    "unit": units[name],
                    "system": "http://unitsofmeasure.org",
                    "code": units[name],
                },
            }
        )
    systems = {f.name: f.system for f in contract.categorical}
    for name, codes in patient.codes.items():
        system = CODE_SYSTEMS.get(systems[name], ("urn:medfed:local",))[0]
        for n, code in enumerate(codes):
            concept = {"coding": [{"system": system, "code": code}]}
            if systems[name] in ("atc", "rxnorm"):
                out.append(
                    {
                        "resourceType": "MedicationStatement",
                        "id": f"{pid}-{name}-{n}",
                        "status": "active",
                        "subject": subject,
                        "medicationCodeableConcept": concept,
                    }
                )
            else:
                out.append(
                    {
                        "resourceType": "Condition",
                        "id": f"{pid}-{name}-{n}",
                        "subject": subject,
                        "code": concept,
                    }
                )
    for n, (name, value) in enumerate(patient.targets.items()):
        out.append(
            {
                "resourceType": "Observation",
                "id": f"{pid}-t{n}",
                "status": "final",
                "code": {
                    "coding": [{"system": "urn:medfed:target", "code": TARGET_CODE_PREFIX + name}]
                },
                "subject": subject,
                "valueQuantity": {"value": value},
            }
        )
    return out


def _omop_tables(
    patients: Sequence[ClinicalPatient], contract: StudyContract
) -> dict[str, tuple[list[str], list[dict[str, object]]]]:
    units = {f.name: f.unit for f in contract.numeric}
    systems = {f.name: f.system for f in contract.categorical}
    Rows = list[dict[str, object]]
    person: Rows = []
    measurement: Rows = []
    observation: Rows = []
    condition: Rows = []
    drug: Rows = []
    for p in patients:
        person.append({"person_id": p.patient_id})
        for name, value in p.numeric.items():
            measurement.append(
                {
                    "person_id": p.patient_id,
                    "measurement_concept_id": 0,
                    "measurement_source_value": _code_of(contract, name),
                    "value_as_number": value,
                    "unit_source_value": units[name],
                }
            )
        for name, codes in p.codes.items():
            for code in codes:
                if systems[name] in ("atc", "rxnorm"):
                    drug.append(
                        {"person_id": p.patient_id, "drug_concept_id": 0, "drug_source_value": code}
                    )
                else:
                    condition.append(
                        {
                            "person_id": p.patient_id,
                            "condition_concept_id": 0,
                            "condition_source_value": code,
                        }
                    )
        for name, value in p.targets.items():
            observation.append(
                {
                    "person_id": p.patient_id,
                    "observation_concept_id": 0,
                    "observation_source_value": TARGET_CODE_PREFIX + name,
                    "value_as_number": value,
                }
            )
    return {
        "person": (["person_id"], person),
        "measurement": (
            [
                "person_id",
                "measurement_concept_id",
                "measurement_source_value",
                "value_as_number",
                "unit_source_value",
            ],
            measurement,
        ),
        "observation": (
            ["person_id", "observation_concept_id", "observation_source_value", "value_as_number"],
            observation,
        ),
        "condition_occurrence": (
            ["person_id", "condition_concept_id", "condition_source_value"],
            condition,
        ),
        "drug_exposure": (["person_id", "drug_concept_id", "drug_source_value"], drug),
    }


def write_omics(
    matrix: Mapping[str, np.ndarray],
    genes: Sequence[str],
    path: Path,
    *,
    name: str,
    relative_to: Path,
    targets: Mapping[str, Mapping[str, float]] | None = None,
) -> DatasetConfig:
    """A samples x genes CSV (`patient_id` first column, optional target columns)."""
    labels = sorted({t for row in (targets or {}).values() for t in row})
    rows = []
    for pid, values in matrix.items():
        row: dict[str, object] = {"patient_id": pid}
        row.update(
            {g: None if np.isnan(v) else float(v) for g, v in zip(genes, values, strict=True)}
        )
        row.update({t: (targets or {}).get(pid, {}).get(t) for t in labels})
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_rows(path, rows, ["patient_id", *genes, *labels])
    return DatasetConfig.model_validate(
        {
            "name": name,
            "format": "omics",
            "paths": [str(path.relative_to(relative_to))],
            "targets": {t: {} for t in labels},
        }
    )


def write_sequences(
    kind: Literal["smiles", "fasta"],
    items: Mapping[str, str],
    path: Path,
    *,
    name: str,
    relative_to: Path,
    targets: Mapping[str, Mapping[str, float]] | None = None,
) -> DatasetConfig:
    """Molecules as a CSV (`patient_id,smiles,targets...`) or proteins as FASTA
    (`>ID target=value`)."""
    labels = sorted({t for row in (targets or {}).values() for t in row})
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "smiles":
        rows = [
            {"patient_id": pid, "smiles": s, **(targets or {}).get(pid, {})}
            for pid, s in items.items()
        ]
        _write_rows(path, rows, ["patient_id", "smiles", *labels])
    else:
        lines = []
        for pid, sequence in items.items():
            tags = " ".join(f"{t}={_cell(v)}" for t, v in (targets or {}).get(pid, {}).items())
            lines.append(f">{pid} {tags}".rstrip())
            lines.extend(sequence[i : i + 60] for i in range(0, len(sequence), 60))
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return DatasetConfig.model_validate(
        {
            "name": name,
            "format": kind,
            "paths": [str(path.relative_to(relative_to))],
            "targets": {t: {} for t in labels},
        }
    )


def datasets_toml(datasets: Sequence[DatasetConfig]) -> str:
    """The `[[datasets]]` tables of site.toml for `datasets` (defaults left out)."""
    documents = [d.model_dump(mode="json", exclude_defaults=True) for d in datasets]
    for document, dataset in zip(documents, datasets, strict=True):
        document["name"], document["format"] = dataset.name, dataset.format
    return tomli_w.dumps({"datasets": documents})
