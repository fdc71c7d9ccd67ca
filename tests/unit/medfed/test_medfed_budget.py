"""`medfed budget approve`: the officer's command checks its key and the request first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import app
from medfed.consortium import demo_study, write_demo_consortium
from medfed.privacy.signing import SigningKey

runner = CliRunner()


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (only,) = write_demo_consortium(
        tmp_path / "sites", demo_study(rounds=2, sites=1, target_epsilon=2.0, seed=1), n_sites=1,
        seed=1,
    )  # fmt: skip
    return only.site_toml


def _study_toml(tmp_path: Path, **changes: object) -> Path:
    values = {**demo_study(rounds=2, sites=1, target_epsilon=2.0, seed=1).to_run_config()}
    values.update({"study-name": "new-study", **changes})
    del values["contract"]  # the demo contract: study.toml writes a contract as [contract]
    lines = ["[study]"] + [f'"{key}" = {json.dumps(value)}' for key, value in values.items()]
    path = tmp_path / "study.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _officer_key(site: Path) -> Path:
    return site.parent / "officer" / "officer.key"


def _approve(site: Path, study: Path, key: Path, epsilon: str = "2.5") -> object:
    return runner.invoke(
        app,
        ["budget", "approve", str(site), "--study", str(study), "--epsilon", epsilon,
         "--officer-key", str(key), "--json"],
    )  # fmt: skip


def test_the_officer_approves_and_the_approval_is_listed(site: Path, tmp_path: Path) -> None:
    result = _approve(site, _study_toml(tmp_path), _officer_key(site))
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    approved = json.loads(result.stdout)  # type: ignore[attr-defined]
    assert (approved["study"], approved["epsilon"], approved["site_id"]) == (
        "new-study", 2.5, "hospital-1"
    )  # fmt: skip
    shown = json.loads(runner.invoke(app, ["budget", "show", str(site), "--json"]).stdout)
    assert {a["study"] for a in shown["approvals"]} == {"readmission-demo", "new-study"}


def test_another_key_is_refused_in_one_line(site: Path, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.key"
    SigningKey.generate().save(stranger)
    result = _approve(site, _study_toml(tmp_path), stranger)
    assert result.exit_code == 1  # type: ignore[attr-defined]
    stderr = result.stderr  # type: ignore[attr-defined]
    assert "is not the officer key that" in stderr and stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("epsilon", "changes", "message"),
    [
        ("11", {}, "must be positive and at most the site's cap 10"),
        ("0", {}, "must be positive"),
        ("nan", {}, "must be positive"),
        ("2", {"delta": 1e-4}, "delta 0.0001 exceeds the site's maximum 1e-05"),
        ("2", {"num-server-rounds": 0}, "num-server-rounds"),
        ("2", {"surprise": 1}, "surprise"),
    ],
)
def test_bad_requests_are_refused_naming_what_is_wrong(
    site: Path, tmp_path: Path, epsilon: str, changes: dict[str, object], message: str
) -> None:
    result = _approve(site, _study_toml(tmp_path, **changes), _officer_key(site), epsilon)
    assert result.exit_code == 1  # type: ignore[attr-defined]
    assert message in result.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in result.stderr  # type: ignore[attr-defined]


def test_a_bad_site_toml_names_the_file_and_key(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('[site]\nid = "h1"\n[privacy]\nepsilon_cap = "lots"\n')
    result = runner.invoke(app, ["budget", "show", str(site)])
    assert result.exit_code == 1
    assert f"{site}: key privacy.epsilon_cap:" in result.stderr
    missing = runner.invoke(app, ["budget", "show", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 1 and "cannot be read" in missing.stderr


def test_keygen_makes_the_officers_key_that_approves_at_the_site(
    site: Path, tmp_path: Path
) -> None:
    """Red-team row "messages": no command made the officer's key (openssl was used)."""
    key = tmp_path / "officer-new" / "officer.key"
    key.parent.mkdir()
    made = runner.invoke(app, ["budget", "keygen", "--out", str(key), "--json"])
    assert made.exit_code == 0, made.output
    assert key.stat().st_mode & 0o777 == 0o600
    officer_pub = site.parent / "keys" / "officer.pub"
    officer_pub.unlink()
    officer_pub.write_bytes(key.with_suffix(".pub").read_bytes())
    result = _approve(site, _study_toml(tmp_path), key)
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    again = runner.invoke(app, ["budget", "keygen", "--out", str(key)])
    assert again.exit_code == 1 and "refusing to replace a key" in again.stderr
    assert SigningKey.load(key).public.key_id == json.loads(made.stdout)["key_id"]
