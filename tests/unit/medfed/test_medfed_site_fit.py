"""`medfed site check` tells the truth about a site against a study: a feature the study
needs that the site barely holds fails the check; a site too small for the study's
epsilon is warned with the noise it would get; `min_cohort_k` is set against its size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import app
from medfed.privacy.accountant import epsilon_of
from medfed.privacy.calibration import calibrate_noise
from medfed.privacy.events import DpSgdEvent

runner = CliRunner()

STUDY = """
[study]
study-name = "cohort"
num-server-rounds = 5
local-steps = 10
learning-rate = 0.05
target-epsilon = 2.0
max-grad-norm = 1.0
delta = 1e-05
sample-rate = 0.1
min-sites = 2
round-timeout-s = 60.0
seed = 1

[contract]
name = "cohort"
[[contract.numeric]]
name = "age"
unit = "a"
minimum = 0
maximum = 120
reference_mean = 60
reference_scale = 15
[[contract.numeric]]
name = "sex"
unit = "1"
minimum = 0
maximum = 1
reference_mean = 0.5
reference_scale = 0.5
[[contract.numeric]]
name = "glucose"
unit = "mmol/L"
minimum = 1.5
maximum = 40
reference_mean = 6
reference_scale = 2
optional = true
[[contract.tasks]]
name = "readmission"
kind = "binary"
target = "readmitted_30d"
"""

SITE = """
[site]
id = "h1"
signing_key = "keys/site.key"
officer_public_key = "keys/officer.pub"

[privacy]
epsilon_cap = 5.0
min_cohort_k = {k}

[[datasets]]
name = "cdm"
format = "omop"
paths = ["omop"]
index_date = "2024-01-01"
[datasets.numeric]
{numeric}
[datasets.targets]
readmitted_30d = {{ code = "4000001" }}
"""

FULL = """age = { patient = "age" }
sex = { patient = "sex", recode = { male = 1, female = 0 } }"""


def _site(root: Path, patients: int, *, numeric: str = FULL, k: int = 5) -> Path:
    (root / "keys").mkdir()
    (root / "keys" / "site.key").write_text("k")
    (root / "keys" / "officer.pub").write_text("k")
    (root / "site.toml").write_text(SITE.format(numeric=numeric, k=k))
    (root / "study.toml").write_text(STUDY)
    omop = root / "omop"
    omop.mkdir()
    person = ["person_id,gender_concept_id,year_of_birth"]
    person += [f"{i},{8507 if i % 2 else 8532},{1950 + i % 40}" for i in range(patients)]
    (omop / "person.csv").write_text("\n".join(person) + "\n")
    observation = ["person_id,observation_concept_id,value_as_number"]
    observation += [f"{i},4000001,{i % 2}" for i in range(patients)]
    (omop / "observation.csv").write_text("\n".join(observation) + "\n")
    return root


def _check(root: Path, *extra: str) -> tuple[int, dict[str, object]]:
    result = runner.invoke(
        app,
        ["site", "check", str(root / "site.toml"), "--study", str(root / "study.toml"),
         "--json", *extra],
    )  # fmt: skip
    return result.exit_code, json.loads(result.stdout)


def test_an_omop_site_that_maps_no_demographics_fails(tmp_path: Path) -> None:
    code, document = _check(_site(tmp_path, 200, numeric=""))

    assert code == 1
    messages = [p["message"] for p in document["problems"]]  # type: ignore[attr-defined]
    assert messages == [
        "the study's numeric feature age is held by 0 of 200 patients (0%; at least 50%"
        " needed): map it in [[datasets]]",
        "the study's numeric feature sex is held by 0 of 200 patients (0%; at least 50%"
        " needed): map it in [[datasets]]",
    ]  # glucose is optional in the contract: its 0% is shown, not a problem
    coverage = {c["name"]: c["fraction"] for c in document["feature_coverage"]}  # type: ignore[attr-defined]
    assert coverage == {"age": 0.0, "sex": 0.0, "glucose": 0.0, "readmitted_30d": 1.0}


def test_the_same_site_with_its_person_table_mapped_passes(tmp_path: Path) -> None:
    code, document = _check(_site(tmp_path, 200))
    assert code == 0, document["problems"]
    coverage = {c["name"]: c["covered"] for c in document["feature_coverage"]}  # type: ignore[attr-defined]
    assert coverage["age"] == coverage["sex"] == 200


def test_the_coverage_threshold_is_the_operators(tmp_path: Path) -> None:
    code, _ = _check(_site(tmp_path, 200, numeric=FULL.splitlines()[0]), "--min-coverage", "0")
    assert code == 0


def test_a_tiny_site_is_warned_with_the_noise_it_would_train_with(tmp_path: Path) -> None:
    code, document = _check(_site(tmp_path, 6, k=5))

    fit = document["study_fit"]
    assert isinstance(fit, dict)
    train = fit["train_patients"]
    assert train + fit["held_out_patients"] == 6
    # By hand: a batch of max(1, round(0.1 * n)) = 1 patient, so the rate is 1 / n.
    rate = 1 / train
    expected = calibrate_noise(
        target_epsilon=2.0, delta=1e-5, sample_rate=rate, steps=50, n_patients=train
    )
    assert fit["noise_multiplier"] == pytest.approx(expected)
    # ... which is the least noise that keeps the 50 steps within epsilon 2
    assert epsilon_of([DpSgdEvent(expected, rate, 50)], delta=1e-5) <= 2.0
    assert fit["expected_batch"] == pytest.approx(1.0)
    warnings = document["warnings"]
    assert isinstance(warnings, list)
    assert any(
        w.startswith("too small to train usefully under epsilon 2:")
        and f"would get noise multiplier {expected:.3g}" in w
        for w in warnings
    )
    assert code == 0  # a warning, not a data problem


def test_min_cohort_k_is_set_against_the_sites_counts(tmp_path: Path) -> None:
    _, document = _check(_site(tmp_path, 40, k=30))

    fit = document["study_fit"]
    assert isinstance(fit, dict) and fit["min_cohort_k"] == 30
    held = fit["held_out_patients"]
    assert held < 30
    assert f"min_cohort_k 30 > {held} held-out patients" in " ".join(document["warnings"])  # type: ignore[arg-type]
    assert math.isfinite(fit["noise_multiplier"])


def test_the_text_report_shows_the_fit(tmp_path: Path) -> None:
    root = _site(tmp_path, 6, k=5)
    result = runner.invoke(
        app, ["site", "check", str(root / "site.toml"), "--study", str(root / "study.toml")]
    )
    assert "feature coverage: age 100%, sex 100%, glucose 0%" in result.stdout
    assert "noise multiplier" in result.stdout and "min_cohort_k 5" in result.stdout
    assert "WARNING: too small to train usefully" in result.stdout
