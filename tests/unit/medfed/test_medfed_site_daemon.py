"""The site daemon's supervision (restart with backoff, state file, stop by PID), its
refusals of a misconfigured site, and `medfed site status`."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import app
from medfed.client.config import SITE_TOML, load_site_config
from medfed.privacy.bundle_signing import trusted_entities_yaml
from medfed.privacy.signing import SigningKey
from medfed.supervisor import Child, SiteDaemon, pid_alive, read_state
from tests.conftest import TEST_TAG_VARIABLE
from tests.sitekit import make_study, write_sites

STUDY = make_study(rounds=2, sites=1)


@pytest.fixture
def site_toml(tmp_path: Path) -> Path:
    write_sites(tmp_path, STUDY, n_sites=1, seed=5)
    return tmp_path / "hospital-1" / SITE_TOML


def _add_coordinator(site_toml: Path, *, key_mode: int = 0o600, bundles: str = "trusted") -> None:
    """A `[coordinator]` section; `bundles`: "trusted" (the kit's trusted-entities file),
    "unsigned" (allow_unsigned_bundles) or "none" (neither)."""
    kit = site_toml.parent / "kit"
    kit.mkdir()
    (kit / "ca.pem").write_text("not checked here\n")
    (kit / "supernode.key").write_text("not checked here\n")
    os.chmod(kit / "supernode.key", key_mode)
    (kit / "trusted-entities.yaml").write_text(
        trusted_entities_yaml({"medfed-consortium": SigningKey.generate().public})
    )
    lines = {
        "trusted": 'trusted_entities = "kit/trusted-entities.yaml"\n',
        "unsigned": "allow_unsigned_bundles = true\n",
        "none": "",
    }[bundles]
    with site_toml.open("a") as out:
        out.write('\n[coordinator]\nsuperlink = "127.0.0.1:9092"\n' + lines)


def test_a_site_without_a_coordinator_section_is_refused_by_name(site_toml: Path) -> None:
    result = CliRunner().invoke(app, ["site", "start", str(site_toml)])
    assert result.exit_code == 1
    assert "has no [coordinator] section" in result.output


def test_a_supernode_key_others_can_read_is_refused(site_toml: Path) -> None:
    _add_coordinator(site_toml, key_mode=0o644)
    result = CliRunner().invoke(app, ["site", "start", str(site_toml)])
    assert result.exit_code == 1
    assert "coordinator.auth_private_key" in result.output and "chmod 600" in result.output


def test_a_site_that_names_no_trusted_entities_does_not_start(site_toml: Path) -> None:
    _add_coordinator(site_toml, bundles="none")
    result = CliRunner().invoke(app, ["site", "start", str(site_toml)])
    assert result.exit_code == 1
    assert "key coordinator.trusted_entities: not set" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_a_trusted_entities_file_that_does_not_parse_stops_the_start_by_name(
    site_toml: Path,
) -> None:
    _add_coordinator(site_toml)
    trusted = site_toml.parent / "kit" / "trusted-entities.yaml"
    trusted.write_text('medfed-consortium: "ssh-rsa AAAAB3NzaC1yc2E"\n')
    result = CliRunner().invoke(app, ["site", "start", str(site_toml)])
    assert result.exit_code == 1
    assert f"{trusted}, line 1:" in result.output and "Traceback" not in result.output


def test_allowing_unsigned_bundles_is_warned_at_start_and_reported(
    site_toml: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from medfed.client.bundle_check import UNSIGNED_WARNING, bundle_gate_of

    _add_coordinator(site_toml, bundles="unsigned")
    config = load_site_config(site_toml)
    with caplog.at_level("WARNING"):
        assert bundle_gate_of(config) is None
    assert UNSIGNED_WARNING in caplog.text
    SiteDaemon(config)  # starts (with the warning), unlike a site that names nothing
    status = json.loads(
        CliRunner().invoke(app, ["site", "status", str(site_toml), "--json"]).stdout
    )
    assert status["bundles"] == {
        "trusted_entities": None,
        "unsigned_allowed": True,
        "approved_apps": [],
    }
    check = CliRunner().invoke(app, ["site", "check", str(site_toml), "--json"])
    assert json.loads(check.stdout)["bundles"]["unsigned_allowed"] is True


def test_an_approved_app_is_named_in_status_and_a_bad_digest_names_the_key(
    site_toml: Path,
) -> None:
    digest = "ab" * 32
    _add_coordinator(site_toml)
    text = site_toml.read_text()
    site_toml.write_text(text + f'approved_apps = ["{digest}"]\n')
    result = CliRunner().invoke(app, ["site", "status", str(site_toml)])
    assert f"WARNING: this site runs the app bundle {digest}, not medfed's own code" in (
        " ".join(result.output.split())
    )
    status = CliRunner().invoke(app, ["site", "status", str(site_toml), "--json"]).stdout
    assert json.loads(status)["bundles"]["approved_apps"] == [digest]
    site_toml.write_text(text + 'approved_apps = ["not-a-digest"]\n')
    result = CliRunner().invoke(app, ["site", "status", str(site_toml)])
    assert result.exit_code == 1
    assert "coordinator.approved_apps.0" in result.output and "Traceback" not in result.output


def test_an_idle_poll_faster_than_the_busy_one_is_refused_by_key(site_toml: Path) -> None:
    _add_coordinator(site_toml)
    with site_toml.open("a") as out:
        out.write("poll_interval_s = 1.0\nidle_poll_interval_s = 0.5\n")
    result = CliRunner().invoke(app, ["site", "status", str(site_toml)])
    assert result.exit_code == 1
    assert "idle_poll_interval_s (0.5) must not be shorter than poll_interval_s (1)" in (
        " ".join(result.output.split())
    )
    assert "Traceback" not in result.output


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
    started = time.monotonic()
    runner.start()
    try:
        # It exits at once; restarts after 1 s, then after 2 s more: the second restart
        # comes no sooner than 3 s (later on a loaded machine: polled, not slept for).
        deadline = started + 30
        while True:
            state = read_state(daemon.config)
            if state is not None and state["children"]["crasher"]["restarts"] >= 2:
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.05)
        assert time.monotonic() - started >= 3.0
        assert state["running"] is True
        crasher, steady = state["children"]["crasher"], state["children"]["steady"]
        assert crasher["last_exit"] == 3
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
    assert log.index("restarting in 1 s") < log.index("restarting in 2 s")


def test_a_restarted_supernode_is_not_connected_on_the_strength_of_an_earlier_start(
    site_toml: Path, process_tag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The SuperNode's log is appended to across restarts: the earlier start's line that it
    # connected must not count for the new one (a restarted site would look connected
    # while its SuperNode cannot yet reach the SuperLink).
    monkeypatch.setenv(TEST_TAG_VARIABLE, process_tag)
    _add_coordinator(site_toml)
    daemon = SiteDaemon(load_site_config(site_toml))
    python = sys.executable
    sleeper = Child("supernode", lambda: [python, "-c", "import time; time.sleep(60)"])
    daemon.children = [Child("worker", lambda: [python, "-c", "pass"]), sleeper]
    log = daemon.log_dir / "supernode.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("INFO: Starting Flower SuperNode\nINFO: SuperNode ID: 123\n")
    try:
        daemon._start(sleeper)
        assert daemon.connected() is False
        with log.open("a") as out:  # what the SuperNode logs once the SuperLink admits it
            out.write("INFO: Starting Flower SuperNode\nINFO: SuperNode I")
        assert daemon.connected() is False
        with log.open("a") as out:  # the line's end, read on the next look: still found
            out.write("D: 123\n")
        assert daemon.connected() is True
    finally:
        daemon.group.stop_all()


def test_a_second_daemon_on_the_same_site_refuses_naming_the_first(site_toml: Path) -> None:
    """Red-team row "second daemon": the second start deleted the first's worker.sock."""
    _add_coordinator(site_toml)
    config = load_site_config(site_toml)
    first = SiteDaemon(config)
    socket = config.state_dir / "worker.sock"
    socket.write_text("the first daemon's socket")
    secret = (config.state_dir / "superexec.secret").read_bytes()

    result = CliRunner().invoke(app, ["site", "start", str(site_toml)])

    assert result.exit_code == 1
    assert f"a daemon already runs for this site (PID {os.getpid()}" in result.output
    assert "Traceback" not in result.output
    assert socket.read_text() == "the first daemon's socket"
    assert (config.state_dir / "superexec.secret").read_bytes() == secret
    first.release()
    SiteDaemon(config).release()  # once the first is gone, a daemon starts


def test_a_read_only_state_folder_is_one_line(site_toml: Path) -> None:
    _add_coordinator(site_toml)
    state = load_site_config(site_toml).state_dir
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o500)
    try:
        if os.access(state, os.W_OK):
            pytest.skip("running as a user that may write anywhere (root)")
        result = CliRunner().invoke(app, ["site", "start", str(site_toml)])
    finally:
        os.chmod(state, 0o700)
    assert result.exit_code == 1
    assert "cannot be written (Permission denied)" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_a_state_folder_that_cannot_be_made_is_one_line(site_toml: Path) -> None:
    """As a read-only folder for root: the state path is taken by a plain file."""
    _add_coordinator(site_toml)
    state = load_site_config(site_toml).state_dir
    if state.exists():
        shutil.rmtree(state)
    state.write_text("not a folder")
    result = CliRunner().invoke(app, ["site", "start", str(site_toml)])
    assert result.exit_code == 1
    assert "cannot be written" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def _future_certificate(path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "consortium CA")])
    start = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)  # this machine is a day behind
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(start).not_valid_after(start + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def test_site_status_names_clock_skew_and_an_unreachable_worker(site_toml: Path) -> None:
    """Red-team row "clock skew": a clock a day behind showed only in supernode.log."""
    from medfed.site_daemon import link_state

    _add_coordinator(site_toml)
    config = load_site_config(site_toml)
    assert link_state(config, running=True, connected=False).startswith("worker unreachable")
    _future_certificate(site_toml.parent / "kit" / "ca.pem")
    state = link_state(config, running=True, connected=False)
    assert state.startswith("clock skew:") and "ca.pem is valid from" in state


# What flwr 1.42's SuperNode printed when the SuperLink knew no node for its key (from
# tests/e2e/test_e2e_coordinator.py's revoked site; a never-registered key reads the same).
UNREGISTERED_OUTPUT = """\
ERROR :     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[code: 2004] Failed to activate SuperNode.
The SuperNode could not establish a connection to the SuperLink.
"""


def test_site_status_names_an_unregistered_or_revoked_key(site_toml: Path) -> None:
    """Red-team row "site status": a revoked site's daemon said only "not connected"."""
    import subprocess

    from medfed.processes import ManagedProcess
    from medfed.site_daemon import UNREGISTERED, link_state

    _add_coordinator(site_toml)
    config = load_site_config(site_toml)
    daemon = SiteDaemon(config)
    log_path = site_toml.parent / "supernode.log"
    # An earlier start that connected, then this start's refusal: only this start counts.
    log_path.write_text("INFO : SuperNode ID: 42\n" + UNREGISTERED_OUTPUT)
    popen = subprocess.Popen([sys.executable, "-c", "pass"])
    popen.wait(timeout=30)
    daemon.children[1].process = ManagedProcess("supernode", popen, log_path)
    daemon.children[1].log_offset = len("INFO : SuperNode ID: 42\n")
    assert daemon.unregistered() and not daemon.connected()
    assert daemon.state(running=True)["unregistered"] is True
    state = link_state(config, running=True, connected=False, unregistered=True)
    assert state == UNREGISTERED and "revoked" in state
    # A start that connected is not unregistered, whatever an earlier start said.
    daemon.children[1].log_offset = 0
    log_path.write_text(UNREGISTERED_OUTPUT + "INFO : SuperNode ID: 42\n")
    assert not daemon.unregistered()
