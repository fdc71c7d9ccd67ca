"""`[[datasets]]` in site.toml: strict parsing, a round trip through `datasets_toml`, and
fuzzing: any text or document gives a parsed config or the package's own error."""

from __future__ import annotations

import contextlib
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from medfed.client.config import SiteConfigError, load_site_config
from medfed.sites.config import DatasetConfig, SiteDataConfig
from medfed.sites.export import datasets_toml

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
GOOD = """
accelerator = "cpu"
[site]
id = "h1"
[privacy]
epsilon_cap = 4.0
[[datasets]]
name = "labs"
format = "csv"
paths = ["labs.csv"]
patient_id = "mrn"
[datasets.numeric]
glucose = { column = "glu", unit = "mg/dL" }
[datasets.categorical]
diagnoses = { column = "icd", separator = "|", recode = { "250.00" = "E11" } }
[datasets.targets]
readmitted_30d = { column = "readmit", recode = { yes = 1, no = 0 } }
[[datasets]]
name = "cdm"
format = "omop-sql"
connection = "sqlite:///cdm.sqlite"
"""


def test_a_full_site_toml_parses(tmp_path: Path) -> None:
    (tmp_path / "site.toml").write_text(GOOD)
    config = load_site_config(tmp_path / "site.toml")
    labs, cdm = config.datasets
    assert labs.numeric["glucose"].unit == "mg/dL"
    assert labs.categorical["diagnoses"].recode == {"250.00": "E11"}
    assert labs.targets["readmitted_30d"].recode == {"yes": 1.0, "no": 0.0}
    assert cdm.sqlite_path == Path("cdm.sqlite")
    assert config.accelerator == "cpu"


def test_datasets_toml_round_trips(tmp_path: Path) -> None:
    (tmp_path / "site.toml").write_text(GOOD)
    datasets = load_site_config(tmp_path / "site.toml").datasets
    again = SiteDataConfig.model_validate(tomllib.loads(datasets_toml(datasets))).datasets
    assert again == datasets


def test_datasets_are_frozen() -> None:
    dataset = DatasetConfig(name="a", format="csv", paths=(Path("x.csv"),))
    with pytest.raises(ValidationError):
        dataset.name = "b"  # type: ignore[misc]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config")


@FUZZ
@given(text=st.text(max_size=300))
def test_any_text_is_a_config_or_one_error(folder: Path, text: str) -> None:
    (folder / "site.toml").write_text(GOOD + text, encoding="utf-8")
    try:
        load_site_config(folder / "site.toml")
    except SiteConfigError as exc:
        assert str(exc).startswith(str(folder / "site.toml"))


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
_keys = st.sampled_from(
    [
        "name",
        "format",
        "paths",
        "connection",
        "patient_id",
        "numeric",
        "categorical",
        "targets",
        "delimiter",
        "orientation",
        "time_column",
        "encoding",
        "bogus",
    ]
)


@FUZZ
@given(
    dataset=st.dictionaries(_keys, _values | st.sampled_from(["csv", "omop-sql", "a"]), max_size=6)
)
def test_any_dataset_document_parses_or_raises_validation_error(dataset: dict[str, object]) -> None:
    with contextlib.suppress(ValidationError):  # the one error a bad document may raise
        SiteDataConfig.model_validate({"datasets": [dataset]})
