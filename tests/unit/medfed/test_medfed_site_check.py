"""`medfed site check`: exit 0 on good data, 1 with every problem located, one JSON document."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from medfed.cli import app
from medfed.model.contract import DEMO_CONTRACT
from medfed.sites.synthetic import write_synthetic_consortium

runner = CliRunner()

SITE_TOML = """
[site]
id = "h1"
signing_key = "keys/site.key"
officer_public_key = "keys/officer.pub"

[privacy]
epsilon_cap = 5.0

[[datasets]]
name = "clinic"
format = "csv"
paths = ["clinic.csv"]
patient_id = "mrn"
[datasets.numeric]
age = {}
glucose = { column = "glu", unit = "mg/dL" }
[datasets.targets]
readmitted_30d = { column = "readmit" }
"""

STUDY_TOML = """
[study]
study-name = "cohort"
num-server-rounds = 3
local-steps = 5
learning-rate = 0.1
target-epsilon = 2.0
max-grad-norm = 1.0
delta = 1e-5
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
name = "glucose"
unit = "mmol/L"
minimum = 1.5
maximum = 40
reference_mean = 6
reference_scale = 2
[[contract.tasks]]
name = "readmission"
kind = "binary"
target = "readmitted_30d"
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "site.key").write_text("k")
    (tmp_path / "keys" / "officer.pub").write_text("k")
    (tmp_path / "site.toml").write_text(SITE_TOML)
    (tmp_path / "study.toml").write_text(STUDY_TOML)
    rows = [f"p{i},{40 + i},{90 + i},{i % 2}" for i in range(30)]
    (tmp_path / "clinic.csv").write_text("mrn,age,glu,readmit\n" + "\n".join(rows) + "\n")
    return tmp_path


def _check(site: Path, *extra: str) -> tuple[int, dict[str, object]]:
    result = runner.invoke(
        app,
        [
            "site",
            "check",
            str(site / "site.toml"),
            "--study",
            str(site / "study.toml"),
            "--json",
            *extra,
        ],
    )
    return result.exit_code, json.loads(result.stdout)


def test_a_good_site_passes_with_counts(site: Path) -> None:
    code, document = _check(site)
    assert code == 0, document
    assert document["ok"] is True and document["problems"] == []
    manifest = document["manifest"]
    assert isinstance(manifest, dict) and manifest["patients"] == 30
    (dataset,) = document["datasets"]  # type: ignore[misc]
    assert dataset["patients"] == 30 and dataset["coverage"] == {"clinical": 30}
    assert dataset["missing"] == {"age": 0, "glucose": 0, "readmitted_30d": 0}
    assert document["accelerator"] == {"name": "cpu", "available": True, "problem": None}


def test_the_table_report_ends_in_all_checks_passed(site: Path) -> None:
    result = runner.invoke(
        app, ["site", "check", str(site / "site.toml"), "--study", str(site / "study.toml")]
    )
    assert result.exit_code == 0, result.output
    assert "all checks passed" in result.stdout
    assert "30 patients" in result.stdout


def test_bad_rows_fail_with_every_problem_located(site: Path) -> None:
    text = (
        (site / "clinic.csv")
        .read_text()
        .replace("p3,43,93", "p3,-43,93")
        .replace("p7,47,97", "p7,47,lots")
    )
    (site / "clinic.csv").write_text(text)
    code, document = _check(site)
    assert code == 1
    problems = document["problems"]
    assert isinstance(problems, list)
    assert [(Path(p["file"]).name, p["row"], p["column"]) for p in problems] == [
        ("clinic.csv", 5, "age"),
        ("clinic.csv", 9, "glu"),
    ]
    assert problems[1]["message"] == "'lots' is not a number"


def test_missing_credentials_and_accelerator_are_problems(site: Path) -> None:
    if importlib.util.find_spec("torch_rbln") is not None:
        pytest.skip("torch-rbln is installed here: the rbln accelerator may be available")
    (site / "keys" / "officer.pub").unlink()
    # accelerator is a top-level key: it must come before the first table
    toml = 'accelerator = "rbln"\n' + (site / "site.toml").read_text()
    (site / "site.toml").write_text(toml)
    code, document = _check(site)
    assert code == 1
    messages = [p["message"] for p in document["problems"]]  # type: ignore[union-attr, index]
    assert "credential file named in site.toml is missing" in messages
    assert any("torch-rbln" in m for m in messages)


def test_a_config_with_an_unknown_key_is_one_line(site: Path) -> None:
    (site / "site.toml").write_text(
        SITE_TOML.replace('format = "csv"', 'format = "csv"\ncolour = 1')
    )
    result = runner.invoke(app, ["site", "check", str(site / "site.toml")])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "unknown key datasets.0.colour" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_contract_in_study_toml_is_one_line(site: Path) -> None:
    (site / "study.toml").write_text(
        STUDY_TOML.replace("reference_scale = 2", "reference_scale = -2")
    )
    result = runner.invoke(
        app, ["site", "check", str(site / "site.toml"), "--study", str(site / "study.toml")]
    )
    assert result.exit_code == 1
    assert "[contract] key numeric.1.reference_scale" in result.stderr


def test_a_legacy_demo_site_without_datasets_reads_data_dir(tmp_path: Path) -> None:
    write_synthetic_consortium(tmp_path / "data", DEMO_CONTRACT, n_sites=1, seed=2)
    (tmp_path / "keys").mkdir()
    for name in ("site-signing.key", "officer.pub"):
        (tmp_path / "keys" / name).write_text("k")
    (tmp_path / "site.toml").write_text(
        '[site]\nid = "h1"\ndata_dir = "data/hospital-1"\n[privacy]\nepsilon_cap = 5.0\n'
    )
    result = runner.invoke(app, ["site", "check", str(tmp_path / "site.toml"), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    csv_rows = (tmp_path / "data" / "hospital-1" / "patients.csv").read_text().count("\n") - 1
    assert document["manifest"]["patients"] == csv_rows


def test_usage_errors_exit_2(site: Path) -> None:
    assert runner.invoke(app, ["site", "check"]).exit_code == 2
    assert runner.invoke(app, ["site", "check", str(site / "site.toml"), "--bogus"]).exit_code == 2


def test_a_copy_of_a_good_site_with_a_deleted_table_fails(site: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(site, copy)
    (copy / "clinic.csv").unlink()
    code, document = _check(copy)
    assert code == 1
    (problem,) = document["problems"]  # type: ignore[misc]
    assert problem["file"].endswith("clinic.csv") and "cannot be read" in problem["message"]


def _with_coordinator(site: Path, bundles: str) -> None:
    """Add a `[coordinator]` whose credential files exist, with `bundles` lines."""
    for name in ("ca.pem", "supernode.key"):
        (site / "keys" / name).write_text("k")
    with (site / "site.toml").open("a") as out:
        out.write(
            '\n[coordinator]\nsuperlink = "127.0.0.1:9092"\nroot_certificates = "keys/ca.pem"\n'
            f'auth_private_key = "keys/supernode.key"\n{bundles}'
        )


def test_the_trusted_entities_file_is_checked_and_its_keys_named(site: Path) -> None:
    from medfed.privacy.bundle_signing import trusted_entities_yaml
    from medfed.privacy.signing import SigningKey

    trusted = site / "keys" / "trusted-entities.yaml"
    trusted.write_text(trusted_entities_yaml({"medfed-consortium": SigningKey.generate().public}))
    _with_coordinator(site, 'trusted_entities = "keys/trusted-entities.yaml"\n')
    code, document = _check(site)
    assert code == 0, document
    assert document["bundles"] == {
        "trusted_entities": str(trusted),
        "trusted_ids": ["medfed-consortium"],
        "unsigned_allowed": False,
        "approved_apps": [],
        "problem": None,
    }

    trusted.write_text("# a comment\nmedfed consortium: ssh-ed25519 AAAA\n")
    code, document = _check(site)
    assert code == 1
    (problem,) = document["problems"]  # type: ignore[misc]
    assert f"{trusted}, line 2: bad key id" in problem["message"]


def test_a_site_with_a_coordinator_but_no_trusted_entities_fails_the_check(site: Path) -> None:
    _with_coordinator(site, "")
    code, document = _check(site)
    assert code == 1
    messages = [problem["message"] for problem in document["problems"]]  # type: ignore[attr-defined]
    assert any("coordinator.trusted_entities: not set" in message for message in messages)


def _with_identity(site: Path, *, site_id: str, own_key: bool, days: int = 60) -> None:
    """Give the site a signing key and an identity certificate from a fresh CA."""
    from cryptography.hazmat.primitives import serialization

    from medfed.privacy.identity import issue_identity_certificate
    from medfed.privacy.pki import create_ca
    from medfed.privacy.signing import SigningKey

    ca_key, ca_cert = create_ca("test CA", valid_days=90)
    signing = SigningKey.generate()
    (site / "keys" / "site.key").unlink()
    signing.save(site / "keys" / "site.key")
    certified = signing.public if own_key else SigningKey.generate().public
    pem = issue_identity_certificate(ca_key, ca_cert, site_id, certified, valid_days=days)
    (site / "keys" / "identity.pem").write_bytes(pem)
    (site / "keys" / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    text = (site / "site.toml").read_text()
    text = text.replace(
        "[site]\n",
        '[site]\nidentity_certificate = "keys/identity.pem"\nconsortium_ca = "keys/ca.pem"\n',
        1,
    )
    (site / "site.toml").write_text(text)


def test_secure_aggregation_readiness_is_reported(site: Path) -> None:
    code, document = _check(site)
    # Not set up: a warning in the report, not a failure (a study may run without it).
    assert code == 0
    readiness = document["secure_aggregation"]
    assert isinstance(readiness, dict) and readiness["ready"] is False
    assert "identity_certificate" in str(readiness["problem"])


@pytest.mark.parametrize(
    ("site_id", "own_key", "days", "expected"),
    [
        ("h1", True, 60, None),
        ("h2", True, 60, "names another site"),
        ("h1", False, 60, "another key than the site's signing key"),
        ("h1", True, 10, "expires within 30 days"),
    ],
)
def test_a_bad_identity_certificate_is_a_problem(
    site: Path, site_id: str, own_key: bool, days: int, expected: str | None
) -> None:
    _with_identity(site, site_id=site_id, own_key=own_key, days=days)
    code, document = _check(site)
    readiness = document["secure_aggregation"]
    assert isinstance(readiness, dict)
    if expected is None:
        assert code == 0 and readiness == {"ready": True, "problem": None}
    else:
        assert code == 1
        assert expected in str(readiness["problem"])
        assert any(expected in str(p) for p in document["problems"])  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda text: text.replace("local-steps = 5", "local-stepz = 5"),
         "unknown key local-stepz; did you mean local-steps?"),
        (lambda text: text.replace("local-steps = 5", 'local-steps = "five"'), "key local-steps"),
        (lambda text: "", "expected one [study] table"),
    ],
)  # fmt: skip
def test_the_study_file_is_checked_as_strictly_as_round_start(
    site: Path, edit: Any, expected: str
) -> None:
    """Red-team row "messages": site check --study said "all checks passed" for these."""
    (site / "study.toml").write_text(edit(STUDY_TOML))
    result = runner.invoke(
        app, ["site", "check", str(site / "site.toml"), "--study", str(site / "study.toml")]
    )
    assert result.exit_code == 1
    assert expected in result.stderr
    assert "Traceback" not in result.output


def test_a_relative_site_toml_in_a_folder_finds_its_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`site check sites/h1/site.toml` from the consortium's folder: data_dir is taken
    from site.toml's folder once, not twice (it looked in sites/h1/sites/h1/)."""
    folder = tmp_path / "sites" / "h1"
    write_synthetic_consortium(folder / "data", DEMO_CONTRACT, n_sites=1, seed=2)
    (folder / "keys").mkdir()
    for name in ("site-signing.key", "officer.pub"):
        (folder / "keys" / name).write_text("k")
    (folder / "site.toml").write_text(
        '[site]\nid = "hospital-1"\ndata_dir = "data/hospital-1"\n\n[privacy]\nepsilon_cap = 5.0\n'
    )
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["site", "check", "sites/h1/site.toml", "--json"])
    document = json.loads(result.stdout)
    assert document["manifest"]["patients"] > 0, document
