"""`medfed round start/status/list/resume/stop` against a stand-in `flwr` program that
records what it was asked (the SuperLink side is covered by the e2e tests): the run
folder, the run config the bundle carries, the Flower run ids, and the JSON documents."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed import round_cli
from medfed.cli import app
from medfed.coordinator.results import RoundRecord, RunResults, write_results
from medfed.privacy.bundle_signing import flower_verification, openssh_public_line
from medfed.privacy.signing import SigningKey
from medfed.provision import PkiLayout

APP_KEY = SigningKey.generate()

STUDY = """\
[study]
study-name = "readmission-1"
num-server-rounds = 3
local-steps = 20
learning-rate = 0.1
target-epsilon = 2.0
max-grad-norm = 1.0
delta = 1e-5
sample-rate = 0.1
min-sites = 2
round-timeout-s = 600.0
seed = 7
strategy = "fedadam"
"""


@pytest.fixture
def lead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A consortium whose SuperLink connection exists, and a fake flwr that logs its calls."""
    (tmp_path / "consortium.toml").write_text(
        '[consortium]\nname = "North"\nrun_dir = "run"\n\n[[sites]]\nid = "hospital-1"\n',
        encoding="utf-8",
    )
    (tmp_path / "run" / "flwr-home").mkdir(parents=True)
    (tmp_path / "run" / "flwr-home" / "config.toml").write_text("", encoding="utf-8")
    (tmp_path / "study.toml").write_text(STUDY, encoding="utf-8")
    kit = tmp_path / "pki" / "sites" / "hospital-1"
    kit.mkdir(parents=True)
    (kit / "site-signing.pub").write_text("PUBLIC", encoding="utf-8")
    APP_KEY.save(PkiLayout(tmp_path / "pki").app_signing_key)
    fake = tmp_path / "flwr"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$FLWR_HOME $*" >> {tmp_path / "flwr-calls.log"}\n'
        "n=$(wc -l < " + str(tmp_path / "flwr-calls.log") + ")\n"
        'echo "{\\"success\\": true, \\"run-id\\": 100$n}"\n',
        encoding="utf-8",
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(round_cli, "flwr_program", lambda: str(fake))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def calls(lead: Path) -> list[str]:
    return (lead / "flwr-calls.log").read_text(encoding="utf-8").splitlines()


def invoke(*args: str) -> tuple[int, dict[str, object], str]:
    result = CliRunner().invoke(app, [*args, "--json"])
    document = json.loads(result.stdout) if result.stdout.strip() else {}
    return result.exit_code, document, result.stderr


def bundle_config(folder: Path) -> dict[str, object]:
    document = tomllib.loads((folder / "app" / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(document["tool"]["flwr"]["app"]["config"])


def test_start_submits_the_study_with_its_run_folder(lead: Path) -> None:
    code, document, _ = invoke("round", "start", "study.toml", "--pki", "pki")

    assert code == 0
    folder = Path(str(document["folder"]))
    assert folder.parent == lead / "run" / "runs"
    assert document["status"] == "submitted" and document["flower_run_ids"] == ["1001"]
    (call,) = calls(lead)
    prefix = f"{lead / 'run' / 'flwr-home'} run {folder / 'app'} medfed-consortium --run-config "
    assert call.startswith(prefix) and call.endswith(" --format json")
    assert flower_accepts(folder / "app", call)
    config = bundle_config(folder)
    assert config["run-dir"] == str(folder)
    assert config["results-path"] == str(folder / "results.json")
    assert config["resume"] is False
    assert config["strategy"] == "fedadam"
    assert config["site-keys-dir"] == str(folder / "site-keys")
    assert (folder / "site-keys" / "hospital-1.pub").read_text() == "PUBLIC"


def flower_accepts(app_dir: Path, call: str) -> bool:
    """Whether Flower's own FAB check (`flower-supernode --trusted-entities`) accepts the
    bundle `flwr run app_dir` builds with the signature the call passed, from the key
    the consortium's sites trust."""
    import hashlib

    from medfed.flower.fab import build_fab
    from medfed.flower.testing import Fab, flower_verify_fab

    (override,) = [arg for arg in call.split() if arg.startswith("app-signature=")]
    value = override.removeprefix("app-signature=").strip('"')
    fab = build_fab(app_dir)
    record = Fab(hashlib.sha256(fab).hexdigest(), fab, flower_verification(value))
    return flower_verify_fab(record, {"medfed-consortium": openssh_public_line(APP_KEY.public)})


def test_resume_signs_the_resumed_bundle_with_the_key_the_run_started_with(lead: Path) -> None:
    _, started, _ = invoke("round", "start", "study.toml", "--pki", "pki")
    folder, name = Path(str(started["folder"])), str(started["run"])
    code, _, _ = invoke("round", "resume", name)
    assert code == 0
    first, second = calls(lead)
    assert "--run-config app-signature=" in second and second != first
    assert flower_accepts(folder / "app", second)  # the resumed bundle (resume = true)
    assert not flower_accepts(folder / "app", first)


def test_start_without_an_app_signing_key_is_one_line(lead: Path) -> None:
    PkiLayout(lead / "pki").app_signing_key.unlink()
    code, _, error = invoke("round", "start", "study.toml", "--pki", "pki")
    assert code == 1 and "cannot sign the app bundle" in error and "Traceback" not in error
    assert not (lead / "flwr-calls.log").exists() and not (lead / "run" / "runs").exists()


def test_status_and_list_read_what_the_server_app_wrote(lead: Path) -> None:
    _, started, _ = invoke("round", "start", "study.toml")
    folder, name = Path(str(started["folder"])), str(started["run"])
    results = RunResults(run_id="1001", status="running", num_rounds=3)
    results.per_round.append(RoundRecord(round=1, participants=["hospital-1"]))
    write_results(folder / "results.json", results)

    code, status, _ = invoke("round", "status", name)
    assert code == 0
    assert (status["status"], status["rounds_completed"], status["num_rounds"]) == ("running", 1, 3)

    code, listing, _ = invoke("round", "list")
    assert code == 0
    assert [(r["run"], r["status"]) for r in listing["runs"]] == [(name, "running")]  # type: ignore[index, union-attr]

    results.status, results.error = "failed", "round 2: 1 valid replies of 3 sites"
    write_results(folder / "results.json", results)
    code, status, _ = invoke("round", "status", name)
    assert code == 1 and status["error"] == "round 2: 1 valid replies of 3 sites"


def test_resume_resubmits_with_resume_and_stop_stops_the_latest_flower_run(lead: Path) -> None:
    _, started, _ = invoke("round", "start", "study.toml")
    folder, name = Path(str(started["folder"])), str(started["run"])

    code, resumed, _ = invoke("round", "resume", name)
    assert code == 0
    assert resumed["flower_run_ids"] == ["1001", "1002"]
    assert bundle_config(folder)["resume"] is True

    code, stopped, _ = invoke("round", "stop", name)
    assert code == 0 and stopped["stopped"] is True and stopped["status"] == "stopped"
    assert calls(lead)[-1].endswith("stop 1002 medfed-consortium")

    write_results(folder / "results.json", RunResults(run_id="1001", status="completed",
                                                      num_rounds=3))  # fmt: skip
    code, _, error = invoke("round", "resume", name)
    assert code == 1 and "has completed; there is nothing to resume" in error


def test_an_unknown_run_and_a_missing_superlink_are_one_line(lead: Path) -> None:
    code, _, error = invoke("round", "status", "nope")
    assert code == 1 and "no run 'nope'" in error and "Traceback" not in error

    os.remove(lead / "run" / "flwr-home" / "config.toml")
    code, _, error = invoke("round", "start", "study.toml")
    assert code == 1 and "medfed coordinator start" in error


def test_status_and_list_take_flowers_word_for_a_run_whose_app_died(
    lead: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, started, _ = invoke("round", "start", "study.toml")
    folder, name = Path(str(started["folder"])), str(started["run"])
    flower_id = str(started["flower_run_ids"][0])  # type: ignore[index]
    write_results(folder / "results.json", RunResults(run_id=flower_id, status="running",
                                                      num_rounds=3))  # fmt: skip
    # From now on Flower's `ls` says the run failed (its ServerApp exited).
    row = {"run-id": flower_id, "status": "finished:failed", "status-details": "exit code 1"}
    answer = json.dumps({"success": True, "runs": [row]})
    fake = lead / "flwr-ls"
    fake.write_text(f"#!/bin/sh\necho '{answer}'\n", encoding="utf-8")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(round_cli, "flwr_program", lambda: str(fake))

    code, status, _ = invoke("round", "status", name)
    assert code == 1
    assert status["status"] == "failed"
    assert status["flower_state"] == "finished:failed: exit code 1"
    _, listing, _ = invoke("round", "list")
    assert [(r["run"], r["status"]) for r in listing["runs"]] == [(name, "failed")]  # type: ignore[index, union-attr]
