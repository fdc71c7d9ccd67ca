"""One suite that every clinical connector passes: the same cohort, read from each format,
joins to the same samples, equal to values computed by hand from published factors."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medfed.sites.config import DatasetConfig
from medfed.sites.connectors import read_dataset
from medfed.sites.errors import DataProblem
from medfed.sites.join import join_patients
from medfed.sites.manifest import fingerprint

from .cohort import CONTRACT, EXPECTED, WRITERS

FORMATS = sorted(WRITERS)


def _read(tmp_path: Path, fmt: str) -> tuple[DatasetConfig, list[DataProblem], dict[str, object]]:
    dataset = WRITERS[fmt](tmp_path)
    read = read_dataset(dataset, CONTRACT, tmp_path)
    samples, conflicts = join_patients([read], CONTRACT)
    return dataset, [*read.problems, *conflicts], {s.patient_id: s for s in samples}


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_cohort_reads_as_computed_by_hand(tmp_path: Path, fmt: str) -> None:
    _, problems, samples = _read(tmp_path, fmt)

    assert problems == []
    assert sorted(samples) == sorted(EXPECTED)
    for pid, expected in EXPECTED.items():
        sample = samples[pid]
        for name in ("age", "glucose", "creatinine"):
            if expected[name] is None:
                assert name not in sample.numeric  # type: ignore[attr-defined]
            else:
                assert sample.numeric[name] == pytest.approx(expected[name], abs=0.01)  # type: ignore[attr-defined]
        assert set(sample.codes.get("diagnoses", ())) == expected["diagnoses"]  # type: ignore[attr-defined]
        assert set(sample.codes.get("drugs", ())) == expected["drugs"]  # type: ignore[attr-defined]
        assert dict(sample.targets) == {"readmitted_30d": expected["readmitted_30d"]}  # type: ignore[attr-defined]


def test_every_format_gives_the_same_fingerprint(tmp_path: Path) -> None:
    prints = set()
    for fmt in FORMATS:
        folder = tmp_path / fmt
        folder.mkdir()
        _, problems, samples = _read(folder, fmt)
        assert problems == []
        prints.add(fingerprint(list(samples.values()), CONTRACT))  # type: ignore[arg-type]
    assert len(prints) == 1


def _replace_number(root: Path, old: float, new: float) -> int:
    """Replace a number in every file of any format under `root`; how many files changed."""
    changed = 0
    for path in root.rglob("*"):
        if path.suffix in (".csv", ".json", ".ndjson"):
            text = path.read_text(encoding="utf-8")
            if repr(old) in text:
                path.write_text(text.replace(repr(old), repr(new)), encoding="utf-8")
                changed += 1
        elif path.suffix == ".parquet":
            table = pq.read_table(path)
            rows = [
                {k: new if v == old else v for k, v in row.items()} for row in table.to_pylist()
            ]
            pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
            changed += 1
        elif path.suffix == ".sqlite":
            with sqlite3.connect(path) as connection:
                connection.execute(
                    "UPDATE measurement SET value_as_number = ? WHERE value_as_number = ?",
                    (new, old),
                )
            connection.close()
            changed += 1
    return changed


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_missing_file_is_a_problem_naming_it(tmp_path: Path, fmt: str) -> None:
    dataset = WRITERS[fmt](tmp_path)
    for path in [*tmp_path.rglob("*")][::-1]:
        if path.is_file():
            path.unlink()
        else:
            path.rmdir()
    read = read_dataset(dataset, CONTRACT, tmp_path)
    assert read.records == {}
    assert read.problems
    named = [*(str(p) for p in dataset.paths), str(dataset.connection), "cdm.sqlite", "omop"]
    assert any(any(name in p.file or name in p.message for name in named) for p in read.problems)


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_out_of_range_value_names_where(tmp_path: Path, fmt: str) -> None:
    dataset = WRITERS[fmt](tmp_path)
    # 9000 mg/dL glucose (500 mmol/L) is impossible; put it where p1's 180 mg/dL was.
    assert _replace_number(tmp_path, 180.0, 9000.0)
    read = read_dataset(dataset, CONTRACT, tmp_path)
    messages = [p for p in read.problems if "outside the plausible range" in p.message]
    assert len(messages) == 1
    problem = messages[0]
    assert problem.row is not None
    assert "9000 mg/dL = 499.5" in problem.message  # 9000 / 18.0 = 500, to 0.1%
    if fmt == "csv":  # header on line 1; p1's rows on lines 2, 3 (90 mg/dL) and 4
        assert (problem.row, problem.column) == (4, "glu")
    assert "[1.5, 40]" in problem.message


@pytest.mark.parametrize("fmt", ["csv", "fhir", "omop"])
def test_an_unknown_code_is_a_problem(tmp_path: Path, fmt: str) -> None:
    dataset = WRITERS[fmt](tmp_path)
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix in (".csv", ".json", ".ndjson"):
            text = path.read_text(encoding="utf-8")
            path.write_text(text.replace("J45", "Z99"), encoding="utf-8")
    read = read_dataset(dataset, CONTRACT, tmp_path)
    assert [p.message for p in read.problems] == [
        "code 'Z99' is not in the icd10 vocabulary of diagnoses"
    ]
    assert read.problems[0].row is not None


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_mapping_onto_an_unknown_feature_is_a_problem(tmp_path: Path, fmt: str) -> None:
    dataset = WRITERS[fmt](tmp_path)
    document = dataset.model_dump()
    document["numeric"] = {**document["numeric"], "lactate": {"column": "lac", "code": "2524-7"}}
    read = read_dataset(DatasetConfig.model_validate(document), CONTRACT, tmp_path)
    assert any("maps 'lactate', which the study contract lacks" in p.message for p in read.problems)


# Demographics, every value type and target units: the same cohort in every format.

from . import demographic_cohort as demo  # noqa: E402


def _read_demographics(tmp_path: Path, fmt: str) -> tuple[list[DataProblem], dict[str, object]]:
    dataset = demo.WRITERS[fmt](tmp_path)
    read = read_dataset(dataset, demo.CONTRACT, tmp_path)
    samples, conflicts = join_patients([read], demo.CONTRACT)
    return [*read.problems, *conflicts], {s.patient_id: s for s in samples}


@pytest.mark.parametrize("fmt", sorted(demo.WRITERS))
def test_demographics_coded_values_and_target_units_read_as_computed_by_hand(
    tmp_path: Path, fmt: str
) -> None:
    problems, samples = _read_demographics(tmp_path, fmt)

    assert problems == []
    assert sorted(samples) == sorted(demo.EXPECTED)
    for pid, expected in demo.EXPECTED.items():
        sample = samples[pid]
        for name in ("age", "sex", "smoker", "nyha", "systolic_bp"):
            if expected[name] is None:
                assert name not in sample.numeric, (pid, name)  # type: ignore[attr-defined]
            else:
                assert sample.numeric[name] == pytest.approx(expected[name]), (pid, name)  # type: ignore[attr-defined]
        assert set(sample.codes["smoking_status"]) == expected["smoking_status"]  # type: ignore[attr-defined]
        assert sample.targets["time_d"] == pytest.approx(expected["time_d"])  # type: ignore[attr-defined]
        assert sample.targets["dead"] == expected["dead"]  # type: ignore[attr-defined]


def test_twelve_months_is_a_year_of_days_not_twelve_days(tmp_path: Path) -> None:
    _, samples = _read_demographics(tmp_path, "fhir")
    assert samples["p1"].targets["time_d"] == pytest.approx(365.25)  # type: ignore[attr-defined]


@pytest.mark.parametrize("fmt", ["fhir", "omop"])
def test_a_time_in_a_unit_the_contract_cannot_take_is_a_problem(tmp_path: Path, fmt: str) -> None:
    dataset = demo.WRITERS[fmt](tmp_path)
    no_unit = demo.CONTRACT.model_copy(
        update={"tasks": (demo.CONTRACT.tasks[0].model_copy(update={"unit": None}),)}
    )
    read = read_dataset(dataset, no_unit, tmp_path)
    messages = {p.message for p in read.problems}
    assert messages == {
        "time_d is in 'mo' but the study contract gives task survival no unit to convert it"
        " to (set unit in the contract's task)"
    }
    assert len(read.problems) == 3  # one per patient, each naming its row


def test_a_value_not_in_the_recode_is_a_problem_naming_what_it_knows(tmp_path: Path) -> None:
    dataset = demo.WRITERS["csv"](tmp_path)
    path = tmp_path / "patients.csv"
    path.write_text(path.read_text(encoding="utf-8").replace("p2,F,", "p2,W,"), encoding="utf-8")
    read = read_dataset(dataset, demo.CONTRACT, tmp_path)
    assert [(p.row, p.column, p.message) for p in read.problems] == [
        (3, "sex", "'W' is not a number (recode knows ['F', 'M'])")
    ]


def test_a_fhir_value_type_that_holds_no_number_is_named(tmp_path: Path) -> None:
    dataset = demo.WRITERS["fhir"](tmp_path)
    path = tmp_path / "export.ndjson"
    text = path.read_text(encoding="utf-8").replace(
        '"valueString": "no"', '"valueRange": {"low": {"value": 1}}'
    )
    path.write_text(text, encoding="utf-8")
    read = read_dataset(dataset, demo.CONTRACT, tmp_path)
    assert [p.message for p in read.problems] == [
        "Observation smoker (smoker) has a valueRange, which maps to no number"
    ]
    assert read.problems[0].column == "Observation/p3-1"


@pytest.mark.parametrize("fmt", ["fhir", "omop"])
def test_a_birth_date_after_the_index_date_is_a_problem(tmp_path: Path, fmt: str) -> None:
    dataset = demo.WRITERS[fmt](tmp_path)
    late = DatasetConfig.model_validate({**dataset.model_dump(), "index_date": "1985-01-01"})
    read = read_dataset(late, demo.CONTRACT, tmp_path)
    assert [p.message for p in read.problems] == [
        "birth date 1990-07-01 is after the index date 1985-01-01"
    ]


def test_an_age_from_birth_dates_needs_an_index_date() -> None:
    with pytest.raises(ValueError, match="index_date"):
        DatasetConfig.model_validate(
            {"name": "e", "format": "fhir", "paths": ["x.ndjson"],
             "numeric": {"age": {"patient": "age"}}}
        )  # fmt: skip


def test_the_docs_connector_table_names_everything_the_connectors_read() -> None:
    from medfed.sites.connectors import fhir, omop

    docs = (Path(__file__).parents[3] / "docs" / "site.md").read_text(encoding="utf-8")
    table = docs[docs.index("### What the FHIR and OMOP connectors read") :]
    table = table[: table.index("### One sample per patient")]
    read = [*fhir.RESOURCES, *fhir.VALUE_TYPES, *omop.TABLES]
    read += [c.replace("measurement_", "*_").replace("observation_", "*_") for c in omop.COLUMNS]
    missing = [name for name in read if name not in table]
    assert missing == []
