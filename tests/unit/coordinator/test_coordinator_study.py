"""StudySettings: strict parsing of Flower's run config and of study.toml, naming the bad key;
the study's digest (what an officer's approval names) and its run config."""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any

import pydantic
import pytest

from medfed.coordinator.errors import StudyConfigError
from medfed.coordinator.study import StudySettings, load_study_file
from medfed.model.contract import DEMO_CONTRACT, StudyContract

REPO_ROOT = Path(__file__).resolve().parents[3]

RUN_CONFIG: dict[str, Any] = {
    "study-name": "readmission-1",
    "num-server-rounds": 3,
    "local-steps": 20,
    "learning-rate": 0.1,
    "target-epsilon": 2.0,
    "max-grad-norm": 1.0,
    "delta": 1e-5,
    "sample-rate": 0.1,
    "min-sites": 2,
    "round-timeout-s": 600.0,
    "seed": 7,
    "results-path": "",
    "sites-root": "",
    "site-keys-dir": "",
}

FLOAT_KEYS = [
    "learning-rate",
    "target-epsilon",
    "max-grad-norm",
    "delta",
    "sample-rate",
    "round-timeout-s",
]
OPTIONAL_KEYS = ("results-path", "sites-root", "site-keys-dir")
STRATEGY_DEFAULTS: dict[str, Any] = {
    "strategy": "fedavg",
    "proximal-mu": 0.0,
    "server-learning-rate": 0.01,
    "server-beta1": 0.9,
    "server-beta2": 0.99,
    "server-tau": 1e-3,
    "update-norm-bound": 0.0,
    "deadline-s": 0.0,
    "run-dir": "",
    "resume": False,
    "app-signature": "",
    "secure-aggregation": True,
    "secagg-clip": 1.0,
    "secagg-threshold": 0,
    "coordinator-key": "",
    "site-nodes": "",
}
"""Optional keys (strategy, deadline, checkpoints) and their defaults."""
"""Where a run writes: not part of the study, so not required and not in its digest."""


def parse(**changes: Any) -> StudySettings:
    config = {**RUN_CONFIG, **{key.replace("_", "-"): value for key, value in changes.items()}}
    return StudySettings.from_run_config(config)


def refusal(config: dict[str, Any]) -> str:
    with pytest.raises(StudyConfigError) as caught:
        StudySettings.from_run_config(config)
    return str(caught.value)


def test_the_run_config_parses_into_typed_fields() -> None:
    study = StudySettings.from_run_config(RUN_CONFIG)

    assert study.name == "readmission-1"
    assert study.num_rounds == 3
    assert study.local_steps == 20
    assert study.learning_rate == 0.1
    assert study.target_epsilon == 2.0
    assert study.max_grad_norm == 1.0
    assert study.delta == 1e-5
    assert study.sample_rate == 0.1
    assert study.min_sites == 2
    assert study.round_timeout_s == 600.0
    assert study.seed == 7
    assert study.preset == "tiny"


def test_the_repositorys_app_defaults_parse() -> None:
    document = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    defaults = document["tool"]["flwr"]["app"]["config"]

    study = StudySettings.from_run_config(defaults)

    assert study.to_run_config().keys() == {*RUN_CONFIG, "preset", "contract", *STRATEGY_DEFAULTS}


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
    message = refusal({**RUN_CONFIG, "target-epsilonn": 1.0})
    assert "target-epsilonn" in message


def test_a_noise_multiplier_is_not_the_studys_to_choose() -> None:
    # Each site calibrates its own noise from the target epsilon: the old key is refused.
    message = refusal({**RUN_CONFIG, "noise-multiplier": 1.0})
    assert "run config: unknown key noise-multiplier" in message


@pytest.mark.parametrize("key", [k for k in RUN_CONFIG if k not in OPTIONAL_KEYS])
def test_a_missing_key_is_named(key: str) -> None:
    config = {name: value for name, value in RUN_CONFIG.items() if name != key}
    message = refusal(config)
    assert key in message


WRONG_TYPES = [
    ("study-name", 5),
    ("num-server-rounds", "3"),
    ("num-server-rounds", 3.0),
    ("num-server-rounds", True),
    ("local-steps", 2.5),
    ("min-sites", "2"),
    ("seed", 7.0),
    ("learning-rate", "0.1"),
    ("target-epsilon", True),
    ("target-epsilon", "2"),
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
    ("study-name", ""),
    ("study-name", "-leading-dash"),
    ("study-name", "has space"),
    ("study-name", "x" * 65),
    ("num-server-rounds", 0),
    ("num-server-rounds", 10_001),
    ("local-steps", 0),
    ("learning-rate", 0.0),
    ("learning-rate", -0.1),
    ("learning-rate", 101.0),
    ("learning-rate", math.nan),
    ("target-epsilon", 0.0),
    ("target-epsilon", -1),
    ("target-epsilon", 100.5),
    ("target-epsilon", math.inf),
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
    study = parse(
        sample_rate=1.0,
        num_server_rounds=1,
        min_sites=1,
        seed=0,
        learning_rate=100,
        target_epsilon=100,
        study_name="a" * 64,
    )
    assert (study.sample_rate, study.num_rounds, study.min_sites, study.seed) == (1.0, 1, 1, 0)
    assert study.learning_rate == 100.0
    assert study.target_epsilon == 100.0
    assert study.name == "a" * 64


def test_the_error_is_one_line_from_a_validation_error() -> None:
    with pytest.raises(StudyConfigError) as caught:
        StudySettings.from_run_config({**RUN_CONFIG, "min-sites": 0})
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value.__cause__, pydantic.ValidationError)


# --- the study's digest and run config ------------------------------------------------------


def test_the_digest_is_sha256_hex_and_stable() -> None:
    first, second = parse(), parse()
    assert re.fullmatch(r"[0-9a-f]{64}", first.sha256())
    assert first.sha256() == second.sha256()


def test_where_a_run_writes_is_not_part_of_the_study() -> None:
    plain = parse()
    elsewhere = parse(results_path="/tmp/results.json", sites_root="/srv/sites")
    assert elsewhere.sha256() == plain.sha256()


CHANGES = [
    ("study-name", "readmission-2"),
    ("num-server-rounds", 4),
    ("local-steps", 21),
    ("learning-rate", 0.2),
    ("target-epsilon", 2.5),
    ("max-grad-norm", 1.5),
    ("delta", 1e-6),
    ("sample-rate", 0.2),
    ("min-sites", 3),
    ("round-timeout-s", 60.0),
    ("seed", 8),
]


def test_every_study_key_is_covered_by_the_changes() -> None:
    # `preset` has one value only ("tiny"): nothing to change it to yet.
    assert {key for key, _ in CHANGES} == set(RUN_CONFIG) - set(OPTIONAL_KEYS)


@pytest.mark.parametrize(("key", "value"), CHANGES)
def test_any_change_to_the_study_changes_its_digest(key: str, value: Any) -> None:
    changed = StudySettings.from_run_config({**RUN_CONFIG, key: value})
    assert changed.sha256() != parse().sha256()


def test_the_run_config_carries_the_study_unchanged() -> None:
    study = parse(results_path="/tmp/r.json", sites_root="/srv/sites")

    config = study.to_run_config()

    assert config == {
        **RUN_CONFIG,
        "results-path": "/tmp/r.json",
        "sites-root": "/srv/sites",
        "preset": "tiny",
        "contract": DEMO_CONTRACT.canonical_json(),
        **STRATEGY_DEFAULTS,
    }
    again = StudySettings.from_run_config(config)
    assert again == study
    assert again.sha256() == study.sha256()


# --- study.toml ---------------------------------------------------------------------------


def study_toml(values: dict[str, Any]) -> str:
    def value(item: Any) -> str:
        if isinstance(item, str):
            return f'"{item}"'
        return repr(item)

    return "[study]\n" + "".join(f'"{key}" = {value(item)}\n' for key, item in values.items())


def test_a_study_file_holds_the_run_configs_keys(tmp_path: Path) -> None:
    path = tmp_path / "study.toml"
    # TOML writes 2 as an int: it means the same as 2.0 for a float key.
    path.write_text(study_toml({**RUN_CONFIG, "target-epsilon": 2}), encoding="utf-8")

    study = load_study_file(path)

    assert study == parse()
    assert type(study.target_epsilon) is float
    assert study.sha256() == parse().sha256()


def test_a_bad_key_in_a_study_file_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "study.toml"
    path.write_text(study_toml({**RUN_CONFIG, "target-epsilon": 0.0}), encoding="utf-8")

    with pytest.raises(StudyConfigError) as caught:
        load_study_file(path)

    assert str(caught.value).startswith(f"{path}: [study] key target-epsilon: ")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[study\n", "is not valid TOML"),
        ('"study-name" = "x"\n', "expected one [study] table, found ['study-name']"),
        (study_toml(RUN_CONFIG) + "[extra]\nx = 1\n", "expected one [study] table"),
        ("study = 3\n", "expected one [study] table, found ['study']"),
    ],
    ids=["not-toml", "no-table", "extra-table", "not-a-table"],
)
def test_a_malformed_study_file_is_refused_with_its_path(
    tmp_path: Path, text: str, reason: str
) -> None:
    path = tmp_path / "study.toml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(StudyConfigError) as caught:
        load_study_file(path)

    assert str(caught.value).startswith(f"{path}: ")
    assert reason in str(caught.value)


def test_a_missing_study_file_is_refused_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(StudyConfigError, match="cannot be read") as caught:
        load_study_file(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_a_study_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "study.toml"
    path.write_bytes(b'[study]\n"study-name" = "\xff"\n')
    with pytest.raises(StudyConfigError, match="is not UTF-8 text"):
        load_study_file(path)


def test_strategy_keys_default_to_plain_fedavg_without_a_bound() -> None:
    study = StudySettings.from_run_config(RUN_CONFIG)

    assert {key: study.model_dump(by_alias=True)[key] for key in STRATEGY_DEFAULTS} == (
        STRATEGY_DEFAULTS
    )
    assert study.round_deadline_s == 600.0
    assert parse(deadline_s=120).round_deadline_s == 120.0


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedyogi"])
def test_a_strategy_is_one_of_the_known_names(name: str) -> None:
    assert parse(strategy=name).strategy == name
    assert "key strategy:" in refusal({**RUN_CONFIG, "strategy": "fedmedian"})


def test_fedprox_needs_a_positive_mu_and_only_fedprox_takes_one() -> None:
    assert parse(strategy="fedprox", proximal_mu=0.01).proximal_mu == 0.01
    assert "fedprox needs proximal-mu > 0" in refusal({**RUN_CONFIG, "strategy": "fedprox"})
    message = refusal({**RUN_CONFIG, "strategy": "fedavg", "proximal-mu": 0.1})
    assert "proximal-mu is set but strategy is 'fedavg'" in message


def test_secure_aggregation_settings_are_checked_with_their_key() -> None:
    assert parse().secure_aggregation is True
    assert parse(secagg_threshold=3).secagg_threshold == 3
    assert "secagg-threshold must be 0" in refusal({**RUN_CONFIG, "secagg-threshold": 1})
    assert "key secagg-threshold" in refusal({**RUN_CONFIG, "secagg-threshold": -1})
    assert "key secagg-clip" in refusal({**RUN_CONFIG, "secagg-clip": 0.0})
    assert "key secure-aggregation" in refusal({**RUN_CONFIG, "secure-aggregation": "yes"})
    # Turning it off changes what the sites' officers approve.
    assert parse(secure_aggregation=False).sha256() != parse().sha256()
    assert parse(coordinator_key="/k").sha256() == parse().sha256()


def test_the_run_plumbing_is_not_part_of_the_studys_digest() -> None:
    assert parse(run_dir="/x", resume=True).sha256() == parse().sha256()
    assert parse(strategy="fedadam").sha256() != parse().sha256()


# --- the study's contract -----------------------------------------------------------------

EXAMPLE_STUDIES = sorted((REPO_ROOT / "examples" / "consortium" / "studies").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLE_STUDIES, ids=lambda path: path.stem)
def test_an_example_studys_contract_is_parsed_into_the_study(path: Path) -> None:
    document = tomllib.loads(path.read_text(encoding="utf-8"))
    expected = StudyContract.model_validate(document["contract"])

    study = load_study_file(path)

    assert study.contract == expected
    assert study.contract != DEMO_CONTRACT
    again = StudySettings.from_run_config(study.to_run_config())
    assert again.contract == expected
    assert again.sha256() == study.sha256()


def test_the_digest_covers_the_contract_but_not_the_app_signature() -> None:
    other = DEMO_CONTRACT.model_copy(update={"name": "other"})
    base = parse()

    assert (
        StudySettings.from_run_config({**RUN_CONFIG, "contract": other.canonical_json()}).sha256()
        != base.sha256()
    )
    assert (
        StudySettings.from_run_config({**RUN_CONFIG, "app-signature": "ab" * 32}).sha256()
        == base.sha256()
    )


def test_a_bad_contract_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "study.toml"
    path.write_text(
        study_toml(RUN_CONFIG)
        + '[contract]\nname = "x"\ntasks = [{ name = "t", kind = "nope", target = "y" }]\n'
        + '[[contract.numeric]]\nname = "age"\nunit = "a"\nminimum = 0.0\nmaximum = 1.0\n',
        encoding="utf-8",
    )

    with pytest.raises(StudyConfigError) as caught:
        load_study_file(path)

    assert str(caught.value).startswith(f"{path}: [contract] key ")
    assert "problems)" in str(caught.value)  # the kind and the numeric feature are both wrong


def test_site_check_and_the_coordinator_read_the_same_contract() -> None:
    from medfed.site_cli import load_study_contract

    for path in EXAMPLE_STUDIES:
        assert load_study_contract(path) == load_study_file(path).contract
