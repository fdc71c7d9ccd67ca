"""StudySettings.from_run_config: strict parsing of Flower's run config, naming the bad key."""

from __future__ import annotations

import math
from typing import Any

import pydantic
import pytest

from coordinator.errors import StudyConfigError
from coordinator.study import StudySettings

# The app's defaults, as pyproject.toml's [tool.flwr.app.config] writes them.
RUN_CONFIG: dict[str, Any] = {
    "num-server-rounds": 3,
    "local-steps": 20,
    "learning-rate": 0.1,
    "noise-multiplier": 1.0,
    "max-grad-norm": 1.0,
    "delta": 1e-5,
    "sample-rate": 0.1,
    "min-sites": 2,
    "round-timeout-s": 600.0,
    "seed": 7,
    "results-path": "",
    "sites-root": "",
}

FLOAT_KEYS = [
    "learning-rate",
    "noise-multiplier",
    "max-grad-norm",
    "delta",
    "sample-rate",
    "round-timeout-s",
]


def parse(**changes: Any) -> StudySettings:
    config = {**RUN_CONFIG, **{key.replace("_", "-"): value for key, value in changes.items()}}
    return StudySettings.from_run_config(config)


def refusal(config: dict[str, Any]) -> str:
    with pytest.raises(StudyConfigError) as caught:
        StudySettings.from_run_config(config)
    return str(caught.value)


def test_the_app_defaults_parse_into_typed_fields() -> None:
    study = StudySettings.from_run_config(RUN_CONFIG)

    assert study.num_rounds == 3
    assert study.local_steps == 20
    assert study.learning_rate == 0.1
    assert study.noise_multiplier == 1.0
    assert study.max_grad_norm == 1.0
    assert study.delta == 1e-5
    assert study.sample_rate == 0.1
    assert study.min_sites == 2
    assert study.round_timeout_s == 600.0
    assert study.seed == 7
    assert study.preset == "tiny"


# No integer lies in delta's open range (0, 1); every other float key takes 1.
@pytest.mark.parametrize("key", [key for key in FLOAT_KEYS if key != "delta"])
def test_an_int_is_taken_for_a_float_key(key: str) -> None:
    study = StudySettings.from_run_config({**RUN_CONFIG, key: 1})

    value = study.model_dump(by_alias=True)[key]
    assert type(value) is float
    assert value == 1.0


def test_settings_are_frozen() -> None:
    study = StudySettings.from_run_config(RUN_CONFIG)
    with pytest.raises(pydantic.ValidationError):
        study.num_rounds = 5  # type: ignore[misc]


def test_an_unknown_key_is_named() -> None:
    message = refusal({**RUN_CONFIG, "noise-multplier": 1.0})
    assert "noise-multplier" in message


@pytest.mark.parametrize("key", [k for k in RUN_CONFIG if k not in ("results-path", "sites-root")])
def test_a_missing_key_is_named(key: str) -> None:
    config = {name: value for name, value in RUN_CONFIG.items() if name != key}
    message = refusal(config)
    assert key in message


WRONG_TYPES = [
    ("num-server-rounds", "3"),
    ("num-server-rounds", 3.0),
    ("num-server-rounds", True),
    ("local-steps", 2.5),
    ("min-sites", "2"),
    ("seed", 7.0),
    ("learning-rate", "0.1"),
    ("noise-multiplier", True),
    ("delta", "1e-5"),
    ("sample-rate", None),
    ("round-timeout-s", [600.0]),
    ("results-path", 5),
    ("sites-root", False),
    ("preset", 3),
]


@pytest.mark.parametrize(("key", "value"), WRONG_TYPES)
def test_a_value_of_the_wrong_type_is_named(key: str, value: Any) -> None:
    message = refusal({**RUN_CONFIG, key: value})
    assert f"run config key {key}:" in message


OUT_OF_RANGE = [
    ("num-server-rounds", 0),
    ("num-server-rounds", 10_001),
    ("local-steps", 0),
    ("learning-rate", 0.0),
    ("learning-rate", -0.1),
    ("learning-rate", 101.0),
    ("learning-rate", math.nan),
    ("noise-multiplier", 0.0),
    ("noise-multiplier", -1),
    ("max-grad-norm", 0),
    ("delta", 0.0),
    ("delta", 1.0),
    ("delta", 1),
    ("sample-rate", 0.0),
    ("sample-rate", 1.5),
    ("min-sites", 0),
    ("round-timeout-s", 0),
    ("round-timeout-s", -5.0),
    ("seed", -1),
    ("preset", "huge"),
]


@pytest.mark.parametrize(("key", "value"), OUT_OF_RANGE)
def test_a_value_out_of_range_is_named(key: str, value: Any) -> None:
    message = refusal({**RUN_CONFIG, key: value})
    assert f"run config key {key}:" in message


def test_values_on_inclusive_bounds_are_accepted() -> None:
    study = parse(sample_rate=1.0, num_server_rounds=1, min_sites=1, seed=0, learning_rate=100)
    assert (study.sample_rate, study.num_rounds, study.min_sites, study.seed) == (1.0, 1, 1, 0)
    assert study.learning_rate == 100.0


def test_the_error_is_one_line_from_a_validation_error() -> None:
    with pytest.raises(StudyConfigError) as caught:
        StudySettings.from_run_config({**RUN_CONFIG, "min-sites": 0})
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value.__cause__, pydantic.ValidationError)
