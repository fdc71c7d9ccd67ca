"""Bad input, one test each: a clear problem naming file, row and column; never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from medfed.model.contract import DEMO_CONTRACT
from medfed.sites.config import DatasetConfig, SiteDataConfig
from medfed.sites.connectors import read_dataset
from medfed.sites.errors import DataError, DataProblem
from medfed.sites.join import join_patients

from .cohort import CONTRACT

HEADER = "mrn,age,glu,readmit"


def _csv_dataset(**more: object) -> DatasetConfig:
    return DatasetConfig.model_validate(
        {
            "name": "clinic",
            "format": "csv",
            "paths": ["t.csv"],
            "patient_id": "mrn",
            "numeric": {"age": {}, "glucose": {"column": "glu", "unit": "mg/dL"}},
            "targets": {"readmitted_30d": {"column": "readmit"}},
            **more,
        }
    )


def _problems(tmp_path: Path, text: str | bytes, **more: object) -> list[tuple[object, ...]]:
    path = tmp_path / "t.csv"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    read = read_dataset(_csv_dataset(**more), CONTRACT, tmp_path)
    _, conflicts = join_patients([read], CONTRACT)
    return [_short(p) for p in (*read.problems, *conflicts)]


def _short(problem: DataProblem) -> tuple[object, ...]:
    return (Path(problem.file).name, problem.row, problem.column, problem.message)


def test_missing_file(tmp_path: Path) -> None:
    read = read_dataset(_csv_dataset(), CONTRACT, tmp_path)
    assert [_short(p) for p in read.problems] == [
        ("t.csv", None, None, "cannot be read (No such file or directory)")
    ]


def test_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "t.csv").mkdir()  # a folder where the file should be
    read = read_dataset(_csv_dataset(), CONTRACT, tmp_path)
    assert [_short(p)[:3] for p in read.problems] == [("t.csv", None, None)]
    assert read.problems[0].message.startswith("cannot be read (")


def test_wrong_delimiter_says_so(tmp_path: Path) -> None:
    found = _problems(tmp_path, "mrn;age;glu;readmit\np1;60;100;0\n")
    assert found == [
        (
            "t.csv",
            1,
            "mrn",
            "column is missing (the header looks ';'-separated; set the dataset's delimiter)"
            " (also missing: age, glu, readmit)",
        )
    ]
    assert _problems(tmp_path, "mrn;age;glu;readmit\np1;60;100;0\n", delimiter=";") == []


def test_wrong_encoding_names_the_line(tmp_path: Path) -> None:
    text = f"{HEADER}\np1,60,100,0\nJosé,60,100,0\n".encode("latin-1")  # é is byte 20+12+3
    assert _problems(tmp_path, text) == [
        ("t.csv", 3, None, "is not utf-8 text (byte 35); set the dataset's encoding")
    ]
    assert _problems(tmp_path, text, encoding="latin-1") == []


def test_missing_column(tmp_path: Path) -> None:
    assert _problems(tmp_path, "mrn,age,readmit\np1,60,0\n") == [
        ("t.csv", 1, "glu", "column is missing")
    ]


def test_text_in_a_numeric_column(tmp_path: Path) -> None:
    assert _problems(tmp_path, f"{HEADER}\np1,60,high,0\n") == [
        ("t.csv", 2, "glu", "'high' is not a number")
    ]


def test_impossible_values(tmp_path: Path) -> None:
    found = _problems(tmp_path, f"{HEADER}\np1,-4,100,0\np2,60,2000,1\np3,60,100,2\n")
    assert found == [
        ("t.csv", 2, "age", "-4 a is outside the plausible range [0, 120]"),
        ("t.csv", 3, "glu", "2000 mg/dL = 111.012 mmol/L is outside the plausible range [1.5, 40]"),
        ("t.csv", 4, "readmit", "2 is not 0 or 1"),
    ]


def test_duplicate_patient_with_conflicting_values(tmp_path: Path) -> None:
    found = _problems(tmp_path, f"{HEADER}\np1,60,100,0\np2,50,90,0\np1,61,100,0\n")
    assert found == [
        ("t.csv", 4, "age", "patient 'p1' repeats with a different age (61, not 60 as at row 2)")
    ]
    # The same row twice is not a conflict.
    assert _problems(tmp_path, f"{HEADER}\np1,60,100,0\np1,60,100,0\n") == []


def test_duplicate_patient_with_conflicting_labels(tmp_path: Path) -> None:
    found = _problems(tmp_path, f"{HEADER}\np1,60,100,0\np1,60,100,1\n")
    assert len(found) == 1 and found[0][:3] == ("t.csv", 3, "readmit")
    assert "has readmitted_30d 1 here but 0" in str(found[0][3])


def test_empty_patient_id(tmp_path: Path) -> None:
    assert _problems(tmp_path, f"{HEADER}\n,60,100,0\n") == [
        ("t.csv", 2, "mrn", "patient id is empty")
    ]


def test_empty_file(tmp_path: Path) -> None:
    assert _problems(tmp_path, "") == [("t.csv", None, None, "is empty: no header row")]


def test_unconvertible_unit(tmp_path: Path) -> None:
    found = _problems(
        tmp_path, f"{HEADER}\np1,60,100,0\n", numeric={"glucose": {"column": "glu", "unit": "kg"}}
    )
    assert found == [("t.csv", 2, "glu", "cannot convert 'kg' to 'mmol/L' for glucose")]


def test_unknown_code(tmp_path: Path) -> None:
    found = _problems(
        tmp_path,
        "mrn,dx\np1,E11;Q99\n",
        numeric={},
        targets={},
        categorical={"diagnoses": {"column": "dx"}},
    )
    assert found == [("t.csv", 2, "dx", "code 'Q99' is not in the icd10 vocabulary of diagnoses")]


def _fhir(tmp_path: Path, resources: list[object]) -> list[tuple[object, ...]]:
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in resources],
    }
    (tmp_path / "b.json").write_text(json.dumps(bundle), encoding="utf-8")
    dataset = DatasetConfig(name="ehr", format="fhir", paths=(Path("b.json"),))
    return [_short(p) for p in read_dataset(dataset, CONTRACT, tmp_path).problems]


def test_invalid_fhir_resources(tmp_path: Path) -> None:
    found = _fhir(
        tmp_path,
        [
            {"resourceType": "Patient", "id": "p1", "birthDate": "not a date"},
            {"resourceType": "Observation", "id": "o1", "status": "final"},  # no code
            {"resourceType": "Spaceship", "id": "s1"},
            {"id": "x"},
            {"resourceType": "Observation", "id": "o2", "status": "final",
             "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
             "valueQuantity": {"value": 5, "unit": "mmol/L"}},  # no subject
        ],
    )  # fmt: skip
    assert [f[:3] for f in found] == [
        ("b.json", 1, "Patient/p1"),
        ("b.json", 2, "Observation/o1"),
        ("b.json", 3, "Spaceship/s1"),
        ("b.json", 4, None),
        ("b.json", 5, "Observation/o2"),
    ]
    assert "invalid FHIR Patient: birthDate" in str(found[0][3])
    assert "invalid FHIR Observation: code" in str(found[1][3])
    assert "'Spaceship' is not a FHIR R4 resource" in str(found[2][3])
    assert "no resourceType" in str(found[3][3])
    assert "no subject reference" in str(found[4][3])


def test_fhir_that_is_not_json(tmp_path: Path) -> None:
    (tmp_path / "b.json").write_text("{not json", encoding="utf-8")
    dataset = DatasetConfig(name="ehr", format="fhir", paths=(Path("b.json"),))
    (problem,) = read_dataset(dataset, CONTRACT, tmp_path).problems
    assert problem.message.startswith("is not JSON (")


def _one(**dataset: object) -> dict[str, object]:
    return {"datasets": [{"name": "a", **dataset}]}


@pytest.mark.parametrize(
    ("document", "says"),
    [
        (_one(format="csv", paths=["x"], colour=1), "colour"),
        (_one(format="xlsx", paths=["x"]), "format"),
        (_one(format="csv"), "needs at least one path"),
        (_one(format="omop-sql", paths=["x"]), "connection"),
        (_one(format="omop-sql", connection="postgres://h/db"), "sqlite:///"),
        (_one(format="csv", paths=["x"], numeric={"age": {"col": "a"}}), "col"),
        ({"datasets": [{"name": "a", "format": "csv", "paths": ["x"]}] * 2}, "names repeat"),
        ({"accelerator": "tpu"}, "accelerator"),
    ],
)
def test_config_with_unknown_key_or_bad_value(document: dict[str, object], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        SiteDataConfig.model_validate(document)


def test_demo_contract_table_without_targets_column_is_named(tmp_path: Path) -> None:
    (tmp_path / "patients.csv").write_text("patient_id,age\np1,60\n", encoding="utf-8")
    from medfed.sites.manifest import legacy_datasets

    (dataset,) = legacy_datasets(Path("."), DEMO_CONTRACT)
    read = read_dataset(dataset, DEMO_CONTRACT, tmp_path)
    assert read.problems[0].message.startswith("column is missing")
    assert read.problems[0].row == 1


def test_a_dataset_with_a_header_and_no_rows_holds_no_patients(tmp_path: Path) -> None:
    from dataclasses import dataclass

    from medfed.sites.manifest import load_site_data

    @dataclass(frozen=True)
    class Site:
        datasets: tuple[DatasetConfig, ...]
        source: Path
        data_dir: Path

    (tmp_path / "t.csv").write_text(HEADER + "\n", encoding="utf-8")
    data = load_site_data(Site((_csv_dataset(),), tmp_path / "site.toml", tmp_path), CONTRACT)
    assert [str(p) for p in data.problems] == ["dataset clinic: holds no patients"]
    assert data.samples == () and not data.ok
    with pytest.raises(DataError, match="holds no patients"):
        data.require_clean()  # what the trainer calls: nothing trains on bad data


def test_a_time_that_is_not_a_date(tmp_path: Path) -> None:
    found = _problems(tmp_path, f"{HEADER},t\np1,60,100,0,yesterday\n", time_column="t")
    assert found == [("t.csv", 2, "t", "'yesterday' is not an ISO date or date-time")]
