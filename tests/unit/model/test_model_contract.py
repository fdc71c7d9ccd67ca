"""The study contract: strict parsing and a stable digest."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from model.contract import DEMO_CONTRACT, NumericFeature, StudyContract


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


def contract(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "features": [feature("age"), feature("bmi", unit="kg/m2")],
        "outcome": "readmitted_30d",
    }
    values.update(overrides)
    return values


def test_parses_a_valid_contract() -> None:
    parsed = StudyContract.model_validate(contract())
    assert parsed.feature_names == ("age", "bmi")
    assert parsed.version == 1
    assert parsed.features[1].unit == "kg/m2"


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(ValidationError, match="colour"):
        StudyContract.model_validate(contract(colour="blue"))


def test_unknown_feature_key_is_rejected() -> None:
    with pytest.raises(ValidationError, match="units"):
        StudyContract.model_validate(contract(features=[feature(units="a")]))


def test_duplicate_feature_names_are_rejected() -> None:
    with pytest.raises(ValidationError, match=r"feature names repeat: \['age'\]"):
        StudyContract.model_validate(contract(features=[feature("age"), feature("age")]))


@pytest.mark.parametrize(
    "overrides",
    [
        {"outcome": "age"},
        {"patient_id": "age"},
    ],
)
def test_outcome_and_patient_id_must_not_be_features(overrides: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match="must not also be features"):
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
    ],
)
def test_implausible_features_are_rejected(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        NumericFeature.model_validate(feature(**overrides))


def test_a_contract_needs_a_feature() -> None:
    with pytest.raises(ValidationError):
        StudyContract.model_validate(contract(features=[]))


def test_contract_is_frozen() -> None:
    parsed = StudyContract.model_validate(contract())
    with pytest.raises(ValidationError):
        parsed.outcome = "died"  # type: ignore[misc]


def test_digest_is_stable_across_constructions() -> None:
    first = StudyContract.model_validate(contract())
    second = StudyContract.model_validate(json.loads(json.dumps(contract())))
    third = StudyContract(
        features=tuple(NumericFeature(**f) for f in contract()["features"]),
        outcome="readmitted_30d",
    )
    assert first.sha256() == second.sha256() == third.sha256()
    assert len(first.sha256()) == 64
    int(first.sha256(), 16)


def test_digest_does_not_depend_on_int_or_float_spelling() -> None:
    as_ints = StudyContract.model_validate(contract())
    as_floats = StudyContract.model_validate(
        contract(features=[feature("age", minimum=18.0), feature("bmi", unit="kg/m2")])
    )
    assert as_ints.sha256() == as_floats.sha256()


@pytest.mark.parametrize(
    "changed",
    [
        contract(features=[feature("age", reference_scale=14.5), feature("bmi", unit="kg/m2")]),
        contract(features=[feature("age", unit="d"), feature("bmi", unit="kg/m2")]),
        contract(features=[feature("bmi", unit="kg/m2"), feature("age")]),
        contract(features=[feature("age")]),
        contract(outcome="died_90d"),
        contract(version=2),
    ],
    ids=["scale", "unit", "order", "dropped", "outcome", "version"],
)
def test_digest_changes_with_the_contract(changed: dict[str, Any]) -> None:
    base = StudyContract.model_validate(contract())
    assert StudyContract.model_validate(changed).sha256() != base.sha256()


def test_demo_contract_round_trips_through_json() -> None:
    round_tripped = StudyContract.model_validate_json(DEMO_CONTRACT.model_dump_json())
    assert round_tripped == DEMO_CONTRACT
    assert round_tripped.sha256() == DEMO_CONTRACT.sha256()
    assert len(DEMO_CONTRACT.feature_names) == len(set(DEMO_CONTRACT.feature_names)) == 8
