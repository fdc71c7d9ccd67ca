"""The study contract: strict parsing, each validator, and a stable, sensitive digest."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from medfed.model.contract import (
    DEMO_CONTRACT,
    CategoricalFeature,
    MoleculeSpec,
    NumericFeature,
    OmicsPanel,
    ProteinSpec,
    StudyContract,
    TaskSpec,
)


def feature(name: str = "age", **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "name": name,
        "unit": "a",
        "minimum": 18,
        "maximum": 110,
        "reference_mean": 62,
        "reference_scale": 14,
    }
    values.update(overrides)
    return values


def task(name: str = "readmission", **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"name": name, "kind": "binary", "target": "readmitted_30d"}
    values.update(overrides)
    return values


def contract(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "numeric": [feature("age"), feature("bmi", unit="kg/m2")],
        "tasks": [task()],
    }
    values.update(overrides)
    return values


def full_contract(**overrides: Any) -> dict[str, Any]:
    values = contract(
        categorical=[{"name": "diagnoses", "system": "icd10", "vocabulary": ["I10", "E11.9"]}],
        omics={"genes": ["TP53", "BRCA1", "EGFR"]},
        molecule={"max_length": 40},
        protein={"max_length": 50},
        tasks=[
            task(),
            task("survival", kind="survival", target="time_d", event="died"),
            task("stage", kind="multiclass", target="stage", classes=["i", "ii", "iii"]),
            task("ldl", kind="regression", target="ldl"),
        ],
    )
    values.update(overrides)
    return values


def test_parses_a_valid_contract() -> None:
    parsed = StudyContract.model_validate(contract())
    assert parsed.feature_names == ("age", "bmi")
    assert parsed.version == 2
    assert parsed.numeric[1].unit == "kg/m2"
    assert parsed.numeric[0].reduce == "latest"
    assert parsed.modalities == ("clinical",)


def test_modalities_follow_the_fixed_order() -> None:
    parsed = StudyContract.model_validate(full_contract())
    assert parsed.modalities == ("clinical", "omics", "molecule", "protein")
    only_protein = StudyContract.model_validate(full_contract(numeric=[], categorical=[]))
    assert only_protein.modalities == ("omics", "molecule", "protein")
    codes_only = StudyContract.model_validate(full_contract(numeric=[], omics=None))
    assert codes_only.modalities == ("clinical", "molecule", "protein")


def test_from_toml_table_is_model_validate() -> None:
    assert StudyContract.from_toml_table(full_contract()) == StudyContract.model_validate(
        full_contract()
    )


def test_a_contract_needs_a_modality() -> None:
    with pytest.raises(ValidationError, match="at least one modality"):
        StudyContract.model_validate(contract(numeric=[]))


def test_a_contract_needs_a_task() -> None:
    with pytest.raises(ValidationError, match="tasks"):
        StudyContract.model_validate(contract(tasks=[]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"colour": "blue"}, "colour"),
        ({"numeric": [feature(units="a")]}, "units"),
        ({"numeric": [feature("age"), feature("age")]}, r"feature names repeat: \['age'\]"),
        (
            {"categorical": [{"name": "age", "system": "icd10", "vocabulary": ["I10"]}]},
            r"feature names repeat: \['age'\]",
        ),
        ({"tasks": [task(), task()]}, "task names repeat"),
        ({"tasks": [task(target="age")]}, "targets must not also be features"),
        ({"patient_id": "age"}, "must not also be a feature"),
        ({"patient_id": "readmitted_30d"}, "must not also be a feature"),
    ],
)
def test_inconsistent_contracts_are_rejected(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        StudyContract.model_validate(contract(**overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        {"minimum": 110, "maximum": 18},
        {"minimum": 5, "maximum": 5},
        {"reference_scale": 0},
        {"reference_scale": -1},
        {"name": "Age"},
        {"name": "1age"},
        {"name": "heart rate"},
        {"unit": ""},
        {"reduce": "median"},
    ],
)
def test_implausible_features_are_rejected(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        NumericFeature.model_validate(feature(**overrides))


@pytest.mark.parametrize(
    "values",
    [
        {"name": "dx", "system": "icd9", "vocabulary": ["I10"]},
        {"name": "dx", "system": "icd10", "vocabulary": []},
        {"name": "dx", "system": "icd10", "vocabulary": ["I10", "I10"]},
        {"name": "dx", "system": "icd10", "vocabulary": [" I10"]},
        {"name": "dx", "system": "icd10", "vocabulary": [""]},
    ],
)
def test_bad_categorical_features_are_rejected(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CategoricalFeature.model_validate(values)


@pytest.mark.parametrize(
    "values",
    [
        {"genes": []},
        {"genes": ["TP53", "TP53"]},
        {"genes": ["TP53", ""]},
        {"genes": ["TP53"], "transform": "log2"},
        {"genes": ["TP53"], "reference_scale": 0},
    ],
)
def test_bad_omics_panels_are_rejected(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        OmicsPanel.model_validate(values)


@pytest.mark.parametrize(
    "values",
    [
        {"max_length": 0},
        {"max_length": 10, "vocabulary": ["C", "C"]},
        {"max_length": 10, "vocabulary": []},
    ],
)
def test_bad_molecule_specs_are_rejected(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        MoleculeSpec.model_validate(values)


@pytest.mark.parametrize(
    "values",
    [{"max_length": 0}, {"max_length": 5, "alphabet": "AAC"}, {"max_length": 5, "alphabet": "ac"}],
)
def test_bad_protein_specs_are_rejected(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ProteinSpec.model_validate(values)


def test_default_vocabularies_hold_the_usual_tokens() -> None:
    vocabulary = MoleculeSpec(max_length=5).vocabulary
    assert {"C", "Cl", "Br", "c", "n", "[nH]", "[O-]", "[C@@H]", "=", "#", "(", ")"} <= set(
        vocabulary
    )
    assert ProteinSpec(max_length=5).alphabet == "ACDEFGHIKLMNPQRSTVWY"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (task(kind="survival"), "needs an event"),
        (task(kind="survival", event="readmitted_30d"), "must differ"),
        (task(event="died"), "only a survival task"),
        (task(kind="multiclass", classes=["a"]), "at least 2 classes"),
        (task(kind="multiclass", classes=["a", "a"]), "classes repeat"),
        (task(classes=["a", "b"]), "only a multiclass task"),
        (task(kind="ordinal"), "kind"),
        (task(name="Readmission"), "name"),
        (task(target="readmitted 30d"), "target"),
        (task(target=""), "target"),
    ],
)
def test_tasks_are_checked_per_kind(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TaskSpec.model_validate(values)


def test_task_outputs_and_label_fields() -> None:
    parsed = StudyContract.model_validate(full_contract())
    assert [t.outputs for t in parsed.tasks] == [1, 1, 3, 1]
    assert parsed.task("survival").label_fields == ("time_d", "died")
    with pytest.raises(KeyError):
        parsed.task("nothing")


def test_contract_is_frozen() -> None:
    parsed = StudyContract.model_validate(contract())
    with pytest.raises(ValidationError):
        parsed.name = "other"  # type: ignore[misc]


def test_digest_is_stable_across_constructions() -> None:
    first = StudyContract.model_validate(full_contract())
    second = StudyContract.model_validate(json.loads(json.dumps(full_contract())))
    third = StudyContract.model_validate_json(first.model_dump_json())
    assert first.sha256() == second.sha256() == third.sha256()
    assert len(first.sha256()) == 64
    int(first.sha256(), 16)


def test_digest_does_not_depend_on_int_or_float_spelling() -> None:
    as_ints = StudyContract.model_validate(contract())
    as_floats = StudyContract.model_validate(
        contract(numeric=[feature("age", minimum=18.0), feature("bmi", unit="kg/m2")])
    )
    assert as_ints.sha256() == as_floats.sha256()


@pytest.mark.parametrize(
    "changed",
    [
        full_contract(numeric=[feature("age", reference_scale=14.5), feature("bmi", unit="kg/m2")]),
        full_contract(numeric=[feature("age", unit="d"), feature("bmi", unit="kg/m2")]),
        full_contract(numeric=[feature("bmi", unit="kg/m2"), feature("age")]),
        full_contract(numeric=[feature("age")]),
        full_contract(omics={"genes": ["BRCA1", "TP53", "EGFR"]}),
        full_contract(omics={"genes": ["TP53", "BRCA1", "EGFR"], "transform": "none"}),
        full_contract(molecule={"max_length": 41}),
        full_contract(protein={"max_length": 50, "alphabet": "ACDEFGHIKLMNPQRSTVWYX"}),
        full_contract(categorical=[{"name": "dx", "system": "icd10", "vocabulary": ["I10"]}]),
        full_contract(tasks=[task()]),
        full_contract(name="other"),
        full_contract(version=3),
    ],
    ids=[
        "scale", "unit", "order", "dropped", "gene-order", "transform", "molecule-length",
        "alphabet", "codes", "tasks", "name", "version",
    ],
)  # fmt: skip
def test_digest_changes_with_the_contract(changed: dict[str, Any]) -> None:
    base = StudyContract.model_validate(full_contract())
    assert StudyContract.model_validate(changed).sha256() != base.sha256()


def test_demo_contract_round_trips_through_json() -> None:
    round_tripped = StudyContract.model_validate_json(DEMO_CONTRACT.model_dump_json())
    assert round_tripped == DEMO_CONTRACT
    assert round_tripped.sha256() == DEMO_CONTRACT.sha256()
    assert len(DEMO_CONTRACT.feature_names) == len(set(DEMO_CONTRACT.feature_names)) == 8
    assert DEMO_CONTRACT.tasks == (
        TaskSpec(name="readmission", kind="binary", target="readmitted_30d"),
    )


def test_a_target_field_may_keep_its_source_spelling() -> None:
    spec = TaskSpec.model_validate(task(kind="survival", target="t.tdm", event="e.tdm"))
    assert spec.label_fields == ("t.tdm", "e.tdm")
