"""The site daemon's supervision (restart with backoff, state file, stop by PID), its
refusals of a misconfigured site, and `medfed site status`."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.config import SITE_TOML, load_site_config
from medfed.cli import app
from medfed.supervisor import Child, SiteDaemon, pid_alive, read_state
from tests.conftest import TEST_TAG_VARIABLE
from tests.sitekit import make_study, write_sites

STUDY = make_study(rounds=2, sites=1)


@pytest.fixture
def site_toml(tmp_path: Path) -> Path:
    write_sites(tmp_path, STUDY, n_sites=1, seed=5)
    return tmp_path / "hospital-1" / SITE_TOML


def _add_coordinator(site_toml: Path, *, key_mode: int = 0o600) -> None:
    kit = site_toml.parent / "kit"
    kit.mkdir()
    (kit / "ca.pem").write_text("not checked here\n")
    (kit / "supernode.key").write_text("not checked here\n")
    os.chmod(kit / "supernode.key", key_mode)
    with site_toml.open("a") as out:
        out.write('\n[coordinator]\nsuperlink = "127.0.0.1:9092"\n')


def test_a_site_without_a_coordinator_section_is_refused_by_name(site_toml: Path) -> None:
    result = CliRunner().invoke(app, ["site", "start", str(site_toml)])
    assert result.exit_code == 1
    assert "has no [coordinator] section" in result.output


def test_a_supernode_key_others_can_read_is_refused(site_toml: Path) -> None:
    _add_coordinator(site_toml, key_mode=0o644)
    result = CliRunner().invoke(app, ["site", "start", str(site_toml)])
    assert result.exit_code == 1
    assert "coordinator.auth_private_key" in result.output and "chmod 600" in result.output


def test_a_bad_window_in_site_toml_names_the_key(site_toml: Path) -> None:
    with site_toml.open("a") as out:
        out.write('\n[[windows]]\ndays = ["mon"]\nstart = "22:00"\nend = "06:00"\n'
                  'timezone = "Mars/Olympus"\n')  # fmt: skip
    result = CliRunner().invoke(app, ["site", "status", str(site_toml)])
    assert result.exit_code == 1
    assert "windows.0.timezone" in result.output


def test_status_of_a_site_that_never_ran(site_toml: Path) -> None:
    result = CliRunner().invoke(app, ["site", "status", str(site_toml), "--json"])
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["running"] is False and document["processes"] == {}
    assert document["last_round"] is None
    assert document["budget"] == [] or all(b["epsilon_spent"] == 0 for b in document["budget"])


def test_a_crashing_child_is_restarted_with_backoff_and_all_stop_by_pid(
    site_toml: Path, process_tag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TEST_TAG_VARIABLE, process_tag)
    _add_coordinator(site_toml)
    daemon = SiteDaemon(load_site_config(site_toml))
    python = sys.executable
    daemon.children = [
        Child("crasher", lambda: [python, "-c", "import sys; sys.exit(3)"]),
        Child("steady", lambda: [python, "-c", "import time; time.sleep(60)"]),
        Child("supernode", lambda: [python, "-c", "import time; time.sleep(60)"]),
    ]
    stop = threading.Event()
    runner = threading.Thread(target=daemon.run, args=(stop,))
    runner.start()
    try:
        time.sleep(4.5)  # exits at ~0 s; restarts after 1 s, then after 2 s more
        state = read_state(daemon.config)
        assert state is not None and state["running"] is True
        crasher, steady = state["children"]["crasher"], state["children"]["steady"]
        assert crasher["restarts"] == 2 and crasher["last_exit"] == 3
        assert steady["restarts"] == 0 and steady["alive"] is True
        steady_pid = steady["pid"]
    finally:
        stop.set()
        runner.join(timeout=30)
    assert not runner.is_alive()
    assert not pid_alive(steady_pid)
    final = read_state(daemon.config)
    assert final is not None and final["running"] is False
    log = (daemon.log_dir / "site.log").read_text()
    assert "crasher" in log and "exited with code 3" in log
