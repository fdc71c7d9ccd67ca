"""Fuzzing every connector: whatever a file holds, the result is records and problems, never
an exception; and every problem names a file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medfed.model.contract import MoleculeSpec, OmicsPanel, ProteinSpec
from medfed.sites.config import DatasetConfig
from medfed.sites.connectors import read_dataset
from medfed.sites.records import DatasetRead

from .cohort import CONTRACT as CLINICAL
from .cohort import LOINC

CONTRACT = CLINICAL.model_copy(
    update={
        "omics": OmicsPanel(genes=("TP53", "EGFR")),
        "molecule": MoleculeSpec(max_length=20),
        "protein": ProteinSpec(max_length=20),
    }
)
FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# (format, file name, extra dataset keys)
FILES = [
    ("csv", "t.csv", {"numeric": {"age": {}, "glucose": {"unit": "mg/dL"}},
                      "categorical": {"diagnoses": {}}, "targets": {"readmitted_30d": {}},
                      "patient_id": "id"}),
    ("csv", "t.tsv", {"numeric": {"age": {}}, "time_column": "t", "patient_id": "id"}),
    ("parquet", "t.parquet", {"numeric": {"age": {}}}),
    ("fhir", "b.json", {}),
    ("fhir", "e.ndjson", {"targets": {"readmitted_30d": {"code": "r"}}}),
    ("smiles", "m.smi", {}),
    ("smiles", "m.csv", {"patient_id": "id"}),
    ("fasta", "p.fasta", {"targets": {"readmitted_30d": {}}}),
    ("omics", "o.csv", {}),
    ("omics", "g.tsv", {"orientation": "genes_x_samples"}),
]  # fmt: skip


def _read(root: Path, index: int, content: bytes) -> DatasetRead:
    fmt, name, extra = FILES[index]
    (root / name).write_bytes(content)
    dataset = DatasetConfig.model_validate(
        {"name": "fuzz", "format": fmt, "paths": [name], **extra}
    )
    read = read_dataset(dataset, CONTRACT, root)
    for problem in read.problems:
        assert problem.file and problem.message
        assert problem.row is None or problem.row >= 0
    return read


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("index", range(len(FILES)), ids=[f"{f}:{n}" for f, n, _ in FILES])
@FUZZ
@given(content=st.binary(max_size=400))
def test_arbitrary_bytes(root: Path, index: int, content: bytes) -> None:
    _read(root, index, content)


_cell = st.one_of(
    st.sampled_from(
        ["", "NA", "60", "-1", "1e999", "nan", "E11", "p1", "C1CC", "ACDK", "2024-01-01"]
    ),
    st.text(alphabet=',;\t"\r\n =>#%[]()0123456789abcCNOZ.-', max_size=8),
)
_lines = st.lists(st.lists(_cell, min_size=1, max_size=6), max_size=6)


_headers = st.sampled_from(
    [
        "id,age,glucose,diagnoses,readmitted_30d,t,smiles",
        "id\tage\tt",
        "gene\tp1\tp2",
        "id,TP53,EGFR",
    ]
)


@pytest.mark.parametrize("index", [0, 1, 5, 6, 7, 8, 9], ids=lambda i: FILES[i][1])
@FUZZ
@given(lines=_lines, header=_headers)
def test_near_valid_text(root: Path, index: int, lines: list[list[str]], header: str) -> None:
    separator = "\t" if "\t" in header else ","
    body = "\n".join(separator.join(cells) for cells in lines)
    if FILES[index][0] == "fasta":
        body = "\n".join(
            ">" + " ".join(cells) if i % 2 == 0 else "".join(cells) for i, cells in enumerate(lines)
        )
    _read(root, index, f"{header}\n{body}\n".encode())


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
_resource = st.fixed_dictionaries(
    {"resourceType": st.sampled_from(["Patient", "Observation", "Condition", "MedicationRequest",
                                      "MedicationStatement", "Bundle", "Nope"])},
    optional={
        "id": st.text(max_size=5),
        "status": st.sampled_from(["final", "active", "x"]),
        "subject": st.one_of(_json, st.just({"reference": "Patient/p1"})),
        "code": st.one_of(_json, st.just({"coding": [{"system": LOINC, "code": "2345-7"}]})),
        "valueQuantity": st.one_of(_json, st.just({"value": 5, "unit": "mg/dL"})),
        "valueInteger": _json,
        "effectiveDateTime": st.one_of(_json, st.just("2024-01-01")),
        "medicationCodeableConcept": _json,
        "entry": _json,
    },
)  # fmt: skip


@FUZZ
@given(resources=st.lists(_resource, max_size=5), bundle=st.booleans())
def test_fhir_resources_of_any_shape(
    root: Path, resources: list[dict[str, object]], bundle: bool
) -> None:
    if bundle:
        content = json.dumps(
            {"resourceType": "Bundle", "entry": [{"resource": r} for r in resources]}
        )
        _read(root, 3, content.encode())
    else:
        _read(root, 4, "\n".join(json.dumps(r) for r in resources).encode())


@FUZZ
@given(content=st.binary(max_size=300), table=st.sampled_from(["person", "measurement"]))
def test_omop_tables_of_arbitrary_bytes(root: Path, content: bytes, table: str) -> None:
    folder = root / "omop"
    folder.mkdir(exist_ok=True)
    (folder / "person.csv").write_text("person_id\np1\n")
    (folder / "measurement.csv").write_text(
        "person_id,measurement_source_value,value_as_number,unit_source_value\n"
        "p1,2345-7,100,mg/dL\n"
    )
    (folder / f"{table}.csv").write_bytes(content)
    dataset = DatasetConfig.model_validate(
        {"name": "cdm", "format": "omop", "paths": ["omop"], "numeric": {"glucose": {}}}
    )
    read = read_dataset(dataset, CONTRACT, root)
    assert all(problem.file for problem in read.problems)


@FUZZ
@given(content=st.binary(max_size=300))
def test_an_omop_database_of_arbitrary_bytes(root: Path, content: bytes) -> None:
    (root / "cdm.sqlite").write_bytes(content)
    dataset = DatasetConfig.model_validate(
        {"name": "cdm", "format": "omop-sql", "connection": "sqlite:///cdm.sqlite"}
    )
    read = read_dataset(dataset, CONTRACT, root)
    assert read.records == {} and read.problems
