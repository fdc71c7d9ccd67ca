"""One small clinical cohort, written in every clinical format the connectors read.

The same three patients (values chosen by hand, in the units hospitals use) are written
as CSV, Parquet, FHIR (a Bundle plus bulk NDJSON), OMOP files and OMOP in SQLite. The
shared suite reads each and compares with `EXPECTED`, computed from published
conversion factors (glucose 1 mmol/L = 18.0 mg/dL, creatinine 1 mg/dL = 88.4 umol/L).
"""

from __future__ import annotations

import csv
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from medfed.model.contract import CategoricalFeature, NumericFeature, StudyContract, TaskSpec
from medfed.sites.config import DatasetConfig

CONTRACT = StudyContract(
    name="cohort",
    numeric=(
        NumericFeature(
            name="age",
            unit="a",
            minimum=0,
            maximum=120,
            reference_mean=60,
            reference_scale=15,
            loinc="30525-0",
        ),
        NumericFeature(
            name="glucose",
            unit="mmol/L",
            minimum=1.5,
            maximum=40,
            reference_mean=6,
            reference_scale=2,
            loinc="2345-7",
            reduce="latest",
        ),
        NumericFeature(
            name="creatinine",
            unit="umol/L",
            minimum=20,
            maximum=1500,
            reference_mean=90,
            reference_scale=30,
            loinc="2160-0",
            reduce="mean",
        ),
    ),
    categorical=(
        CategoricalFeature(name="diagnoses", system="icd10", vocabulary=("E11", "I10", "J45")),
        CategoricalFeature(name="drugs", system="atc", vocabulary=("A10BA02", "C09AA05")),
    ),
    tasks=(TaskSpec(name="readmission", kind="binary", target="readmitted_30d"),),
)

# patient -> (age a, [(glucose mg/dL, date)], [creatinine mg/dL], diagnoses, drugs, label)
Patient = tuple[float, list[tuple[float, str]], list[float], list[str], list[str], int]
PATIENTS: dict[str, Patient] = {
    "p1": (
        70,
        [(90.0, "2024-01-01"), (180.0, "2024-03-01")],
        [1.0, 1.2],
        ["E11", "I10"],
        ["A10BA02"],
        1,
    ),
    "p2": (55, [(100.0, "2024-02-01")], [0.9], ["I10"], ["C09AA05"], 0),
    "p3": (40, [], [0.8], ["J45"], [], 0),
}

EXPECTED: dict[str, dict[str, Any]] = {
    "p1": {
        "age": 70.0,
        "glucose": 9.99,
        "creatinine": 1.1 * 88.4,
        "diagnoses": {"E11", "I10"},
        "drugs": {"A10BA02"},
        "readmitted_30d": 1.0,
    },
    "p2": {
        "age": 55.0,
        "glucose": 5.55,
        "creatinine": 0.9 * 88.4,
        "diagnoses": {"I10"},
        "drugs": {"C09AA05"},
        "readmitted_30d": 0.0,
    },
    "p3": {
        "age": 40.0,
        "glucose": None,
        "creatinine": 0.8 * 88.4,
        "diagnoses": {"J45"},
        "drugs": set(),
        "readmitted_30d": 0.0,
    },
}
"""Latest glucose (p1: the March value), mean creatinine, in the contract's units."""

ATC = "http://www.whocc.no/atc"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
LOINC = "http://loinc.org"
READMISSION_CODE = "readmit-30d"
DRUG_CONCEPTS = {"A10BA02": "1503297", "C09AA05": "1308216"}  # OMOP concept ids (RxNorm)


def _long_rows() -> list[dict[str, Any]]:
    """One row per measurement (long format), with a date column."""
    rows = []
    for pid, (age, glucose, creatinine, dx, drugs, label) in PATIENTS.items():
        base = {
            "mrn": pid,
            "dx": ";".join(dx),
            "meds": ";".join(drugs),
            "readmit": "yes" if label else "no",
            "age": age,
        }
        rows.append({**base, "taken": "2024-01-01", "glu": "", "crea": creatinine[0]})
        for value, date in glucose:
            rows.append({**base, "taken": date, "glu": value, "crea": ""})
        for value in creatinine[1:]:
            rows.append({**base, "taken": "2024-04-01", "glu": "", "crea": value})
    return rows


def _tabular_dataset(fmt: str, path: str) -> DatasetConfig:
    return DatasetConfig.model_validate(
        {
            "name": "clinic",
            "format": fmt,
            "paths": [path],
            "patient_id": "mrn",
            "time_column": "taken",
            "numeric": {
                "age": {"column": "age"},
                "glucose": {"column": "glu", "unit": "mg/dL"},
                "creatinine": {"column": "crea", "unit": "mg/dL"},
            },
            "categorical": {"diagnoses": {"column": "dx"}, "drugs": {"column": "meds"}},
            "targets": {"readmitted_30d": {"column": "readmit", "recode": {"yes": 1, "no": 0}}},
        }
    )


def write_csv(root: Path) -> DatasetConfig:
    rows = _long_rows()
    with (root / "clinic.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return _tabular_dataset("csv", "clinic.csv")


def write_parquet(root: Path) -> DatasetConfig:
    rows = _long_rows()
    numbers = ("glu", "crea", "age")
    columns = {
        key: [
            None if row[key] == "" else (float(row[key]) if key in numbers else str(row[key]))
            for row in rows
        ]
        for key in rows[0]
    }
    pq.write_table(pa.table(columns), root / "clinic.parquet")
    return _tabular_dataset("parquet", "clinic.parquet")


def _fhir_resources(pid: str) -> list[dict[str, Any]]:
    age, glucose, creatinine, dx, drugs, label = PATIENTS[pid]
    subject = {"reference": f"Patient/{pid}"}

    def observation(n: int, code: str, value: float, unit: str, date: str) -> dict[str, Any]:
        return {
            "resourceType": "Observation",
            "id": f"{pid}-o{n}",
            "status": "final",
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "subject": subject,
            "effectiveDateTime": date,
            "valueQuantity": {
                "value": value,
                "unit": unit,
                "system": "http://unitsofmeasure.org",
                "code": unit,
            },
        }

    resources: list[dict[str, Any]] = [{"resourceType": "Patient", "id": pid}]
    resources.append(observation(0, "30525-0", age, "a", "2024-01-01"))
    for n, (value, date) in enumerate(glucose, start=1):
        resources.append(observation(n, "2345-7", value, "mg/dL", date))
    for n, value in enumerate(creatinine, start=10):
        resources.append(observation(n, "2160-0", value, "mg/dL", "2024-01-01"))
    for n, code in enumerate(dx):
        resources.append(
            {
                "resourceType": "Condition",
                "id": f"{pid}-c{n}",
                "subject": subject,
                "code": {"coding": [{"system": ICD10, "code": code}]},
            }
        )
    for n, code in enumerate(drugs):
        resources.append(
            {
                # p2's drug is an order, the others are statements: both resource types
                "resourceType": "MedicationRequest" if pid == "p2" else "MedicationStatement",
                **({"intent": "order"} if pid == "p2" else {}),
                "id": f"{pid}-m{n}",
                "status": "active",
                "subject": subject,
                "medicationCodeableConcept": {"coding": [{"system": ATC, "code": code}]},
            }
        )
    resources.append(
        {
            "resourceType": "Observation",
            "id": f"{pid}-r",
            "status": "final",
            "code": {"coding": [{"system": "urn:local", "code": READMISSION_CODE}]},
            "subject": subject,
            "valueInteger": label,
        }
    )
    return resources


def write_fhir(root: Path) -> DatasetConfig:
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for pid in ("p1", "p2") for r in _fhir_resources(pid)],
    }
    (root / "bundle.json").write_text(json.dumps(bundle), encoding="utf-8")
    lines = [json.dumps(r) for r in _fhir_resources("p3")]
    (root / "export.ndjson").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return DatasetConfig.model_validate(
        {
            "name": "ehr",
            "format": "fhir",
            "paths": ["bundle.json", "export.ndjson"],
            "targets": {"readmitted_30d": {"code": READMISSION_CODE}},
        }
    )


def omop_tables() -> dict[str, list[dict[str, Any]]]:
    """The cohort as OMOP CDM v5.4 rows (person ids 1..3 stand for p1..p3)."""
    tables: dict[str, list[dict[str, Any]]] = {
        "person": [],
        "measurement": [],
        "observation": [],
        "condition_occurrence": [],
        "drug_exposure": [],
    }
    for pid, (age, glucose, creatinine, dx, drugs, label) in PATIENTS.items():
        tables["person"].append({"person_id": pid, "year_of_birth": 2024 - int(age)})
        measurements = [("30525-0", age, "a", "2024-01-01")]
        measurements += [("2345-7", v, "mg/dL", d) for v, d in glucose]
        measurements += [("2160-0", v, "mg/dL", "2024-01-01") for v in creatinine]
        for code, value, unit, date in measurements:
            tables["measurement"].append(
                {
                    "person_id": pid,
                    "measurement_concept_id": 0,
                    "measurement_source_value": code,
                    "measurement_date": date,
                    "value_as_number": value,
                    "unit_source_value": unit,
                }
            )
        tables["observation"].append(
            {
                "person_id": pid,
                "observation_concept_id": 4000001,
                "observation_source_value": "",
                "observation_date": "2024-05-01",
                "value_as_number": label,
                "value_as_string": "",
            }
        )
        for code in dx:
            tables["condition_occurrence"].append(
                {"person_id": pid, "condition_concept_id": 0, "condition_source_value": code}
            )
        for code in drugs:
            tables["drug_exposure"].append(
                {"person_id": pid, "drug_concept_id": DRUG_CONCEPTS[code], "drug_source_value": ""}
            )
    return tables


def _omop_dataset(fmt: str, where: dict[str, Any]) -> DatasetConfig:
    recode = {concept: code for code, concept in DRUG_CONCEPTS.items()}
    return DatasetConfig.model_validate(
        {
            "name": "cdm",
            "format": fmt,
            **where,
            "numeric": {"age": {}, "glucose": {}, "creatinine": {}},
            "categorical": {"diagnoses": {}, "drugs": {"recode": recode}},
            "targets": {"readmitted_30d": {"code": "4000001"}},
        }
    )


def write_omop(root: Path) -> DatasetConfig:
    folder = root / "omop"
    folder.mkdir()
    for name, rows in omop_tables().items():
        with (folder / f"{name}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return _omop_dataset("omop", {"paths": ["omop"]})


def write_omop_sql(root: Path) -> DatasetConfig:
    with sqlite3.connect(root / "cdm.sqlite") as connection:
        for name, rows in omop_tables().items():
            columns = list(rows[0])
            connection.execute(f"CREATE TABLE {name} ({', '.join(columns)})")
            connection.executemany(
                f"INSERT INTO {name} VALUES ({', '.join('?' for _ in columns)})",
                [tuple(row[c] for c in columns) for row in rows],
            )
    connection.close()
    return _omop_dataset("omop-sql", {"connection": "sqlite:///cdm.sqlite"})


WRITERS: dict[str, Callable[[Path], DatasetConfig]] = {
    "csv": write_csv,
    "parquet": write_parquet,
    "fhir": write_fhir,
    "omop": write_omop,
    "omop-sql": write_omop_sql,
}
