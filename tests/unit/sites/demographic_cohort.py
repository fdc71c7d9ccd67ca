"""A cohort of demographics, coded values and a survival time, written as a hospital has it.

The same three patients in CSV (sex as `M`/`F`, smoker as `yes`/`no`, survival in
months), FHIR (Patient.gender and birthDate, Observations with valueBoolean,
valueString, valueInteger, valueCodeableConcept, a blood-pressure panel's component,
survival as a Quantity in `mo`) and OMOP (person's gender_concept_id and
year/month/day_of_birth, value_as_concept_id, unit_source_value `mo`), as files and in
SQLite. `EXPECTED` is computed by hand: ages in completed years at the index date
2024-03-03 (a birth date known to the month is its 15th, to the year 1 July), months
as 365.25 / 12 days (UCUM `mo`, the mean Julian month).
"""

from __future__ import annotations

import csv
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medfed.model.contract import CategoricalFeature, NumericFeature, StudyContract, TaskSpec
from medfed.sites.config import DatasetConfig


def _feature(name: str, unit: str, lo: float, hi: float) -> NumericFeature:
    return NumericFeature(
        name=name, unit=unit, minimum=lo, maximum=hi, reference_mean=(lo + hi) / 2,
        reference_scale=(hi - lo) / 4,
    )  # fmt: skip


CONTRACT = StudyContract(
    name="demographics",
    numeric=(
        _feature("age", "a", 0, 120),
        _feature("sex", "1", 0, 1),
        _feature("smoker", "1", 0, 1),
        _feature("nyha", "1", 1, 4),
        _feature("systolic_bp", "mm[Hg]", 60, 260),
    ),
    categorical=(
        CategoricalFeature(
            name="smoking_status", system="local", vocabulary=("never", "former", "current")
        ),
    ),
    tasks=(TaskSpec(name="survival", kind="survival", target="time_d", event="dead", unit="d"),),
)

INDEX_DATE = "2024-03-03"
EXPECTED: dict[str, dict[str, Any]] = {
    # born 1950-03-04: one day short of 74 on 2024-03-03
    "p1": {"age": 73.0, "sex": 1.0, "smoker": 1.0, "nyha": 3.0, "systolic_bp": 140.0,
           "smoking_status": {"current"}, "time_d": 12 * 365.25 / 12, "dead": 1.0},
    # born 1980-07 (day unknown: the 15th)
    "p2": {"age": 43.0, "sex": 0.0, "smoker": 0.0, "nyha": 1.0, "systolic_bp": 120.0,
           "smoking_status": {"never"}, "time_d": 1.5 * 365.25 / 12, "dead": 0.0},
    # born 1990 (month unknown: 1 July); sex unknown; no blood pressure
    "p3": {"age": 33.0, "sex": None, "smoker": 0.0, "nyha": None, "systolic_bp": None,
           "smoking_status": {"former"}, "time_d": 24 * 365.25 / 12, "dead": 0.0},
}  # fmt: skip

# patient -> (csv sex, FHIR gender, FHIR birthDate, OMOP (gender, year, month, day),
#             smoker, nyha, sbp, status, survival months, dead)
ROWS: dict[str, tuple[Any, ...]] = {
    "p1": ("M", "male", "1950-03-04", (8507, 1950, 3, 4), True, 3, 140, "current", 12, 1),
    "p2": ("F", "female", "1980-07", (8532, 1980, 7, None), False, 1, 120, "never", 1.5, 0),
    "p3": ("", "unknown", "1990", (0, 1990, None, None), False, None, None, "former", 24, 0),
}
SNOMED_SMOKING = {"current": "77176002", "former": "8517006", "never": "266919005"}
OMOP_SMOKING = {"current": "4298794", "former": "4310250", "never": "4144272"}
OMOP_YES_NO = {True: "4188539", False: "4188540"}


def write_csv(root: Path) -> DatasetConfig:
    with (root / "patients.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["mrn", "sex", "age", "smoker", "nyha", "sbp", "status", "months", "dead"])
        for pid, (sex, *_, smoker, nyha, sbp, status, months, dead) in ROWS.items():
            age = EXPECTED[pid]["age"]
            yes = "yes" if smoker else "no"
            writer.writerow([pid, sex, age, yes, nyha, sbp, status, months, dead])
    return DatasetConfig.model_validate(
        {
            "name": "registry",
            "format": "csv",
            "paths": ["patients.csv"],
            "patient_id": "mrn",
            "numeric": {
                "age": {},
                "sex": {"recode": {"M": 1, "F": 0}},
                "smoker": {"recode": {"yes": 1, "no": 0}},
                "nyha": {},
                "systolic_bp": {"column": "sbp"},
            },
            "categorical": {"smoking_status": {"column": "status"}},
            "targets": {"time_d": {"column": "months", "unit": "mo"}, "dead": {}},
        }
    )


def _observation(pid: str, n: int, code: str, **value: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"{pid}-{n}",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        **value,
    }


def _fhir_resources(pid: str) -> list[dict[str, Any]]:
    _, gender, born, _, smoker, nyha, sbp, status, months, dead = ROWS[pid]
    resources: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": pid, "gender": gender, "birthDate": born}
    ]
    # p3's smoking answer is free text; the others a boolean
    smoke = {"valueString": "no"} if pid == "p3" else {"valueBoolean": smoker}
    resources.append(_observation(pid, 1, "smoker", **smoke))
    if nyha is not None:
        resources.append(_observation(pid, 2, "nyha", valueInteger=nyha))
    if sbp is not None:
        component = {
            "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
            "valueQuantity": {"value": sbp, "unit": "mmHg", "code": "mm[Hg]"},
        }
        resources.append(_observation(pid, 3, "85354-9", component=[component]))
    concept = {"coding": [{"system": "http://snomed.info/sct", "code": SNOMED_SMOKING[status]}]}
    resources.append(_observation(pid, 4, "72166-2", valueCodeableConcept=concept))
    time = {"value": months, "unit": "months", "system": "http://unitsofmeasure.org", "code": "mo"}
    resources.append(_observation(pid, 5, "survival-time", valueQuantity=time))
    resources.append(_observation(pid, 6, "died", valueBoolean=bool(dead)))
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
            "index_date": INDEX_DATE,
            "numeric": {
                "age": {"patient": "age"},
                "sex": {"patient": "sex", "recode": {"male": 1, "female": 0}},
                "smoker": {"code": "smoker", "recode": {"true": 1, "false": 0, "no": 0}},
                "nyha": {"code": "nyha"},
                "systolic_bp": {"code": "8480-6"},
            },
            "categorical": {
                "smoking_status": {
                    "code": "72166-2",
                    "recode": {code: name for name, code in SNOMED_SMOKING.items()},
                }
            },
            "targets": {"time_d": {"code": "survival-time"}, "dead": {"code": "died"}},
        }
    )


def omop_tables() -> dict[str, list[dict[str, Any]]]:
    """The cohort as OMOP CDM v5.4 rows."""
    person, observation, measurement = [], [], []
    for pid, (
        _,
        _,
        _,
        (gender, year, month, day),
        smoker,
        nyha,
        sbp,
        status,
        months,
        dead,
    ) in ROWS.items():
        person.append(
            {"person_id": pid, "gender_concept_id": gender, "year_of_birth": year,
             "month_of_birth": month, "day_of_birth": day, "gender_source_value": ""}
        )  # fmt: skip

        def obs(
            concept: int, number: Any = None, as_concept: Any = None, unit: str = "", pid: str = pid
        ) -> None:
            observation.append(
                {"person_id": pid, "observation_concept_id": concept,
                 "observation_source_value": "", "observation_date": "2024-01-01",
                 "value_as_number": number, "value_as_concept_id": as_concept,
                 "value_as_string": "", "unit_source_value": unit}
            )  # fmt: skip

        obs(900001, as_concept=OMOP_YES_NO[smoker])
        obs(900002, as_concept=OMOP_SMOKING[status])
        obs(900003, number=months, unit="mo")
        obs(900004, number=dead)
        if nyha is not None:
            obs(900005, number=nyha)
        if sbp is not None:
            measurement.append(
                {"person_id": pid, "measurement_concept_id": 3004249,
                 "measurement_source_value": "", "measurement_date": "2024-01-01",
                 "value_as_number": sbp, "value_as_concept_id": 0,
                 "unit_source_value": "mmHg"}
            )  # fmt: skip
    return {"person": person, "observation": observation, "measurement": measurement}


def _omop_dataset(fmt: str, where: dict[str, Any]) -> DatasetConfig:
    return DatasetConfig.model_validate(
        {
            "name": "cdm",
            "format": fmt,
            **where,
            "index_date": INDEX_DATE,
            "numeric": {
                "age": {"patient": "age"},
                "sex": {"patient": "sex", "recode": {"male": 1, "female": 0}},
                "smoker": {
                    "code": "900001",
                    "recode": {v: float(k) for k, v in OMOP_YES_NO.items()},
                },
                "nyha": {"code": "900005"},
                "systolic_bp": {"code": "3004249"},
            },
            "categorical": {
                "smoking_status": {
                    "code": "900002",
                    "recode": {code: name for name, code in OMOP_SMOKING.items()},
                }
            },
            "targets": {"time_d": {"code": "900003"}, "dead": {"code": "900004"}},
        }
    )


def _csv_tables(folder: Path) -> None:
    for name, rows in omop_tables().items():
        with (folder / f"{name}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def write_omop(root: Path) -> DatasetConfig:
    folder = root / "omop"
    folder.mkdir()
    _csv_tables(folder)
    return _omop_dataset("omop", {"paths": ["omop"]})


def write_omop_sql(root: Path) -> DatasetConfig:
    connection = sqlite3.connect(root / "cdm.sqlite")
    with connection:
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
    "fhir": write_fhir,
    "omop": write_omop,
    "omop-sql": write_omop_sql,
}
