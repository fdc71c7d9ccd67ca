"""`medfed coordinator start` from a provisioned PKI: it admits provisioned, registered sites
only, over TLS with the consortium's CA, refuses an expired certificate, and stops
everything it started on SIGTERM."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from medfed.common import write_atomic
from medfed.coordinator.consortium import load_consortium
from medfed.flower import SUPERNODE_CONNECTED_LINE as SUPERNODE_READY
from medfed.privacy.pki import (
    issue_server_certificate,
    load_certificate,
    load_ec_private_key,
    pem_certificate,
)
from medfed.processes import ManagedProcess, ProcessGroup, find_program, free_port, log_contains
from medfed.provision import PkiLayout, provision
from tests.conftest import TEST_TAG_VARIABLE, pids_with_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _consortium(tmp_path: Path, name: str, sites: tuple[str, ...], port: int) -> Path:
    lines = [
        "[consortium]",
        f'name = "{name}"',
        f'address = "127.0.0.1:{port}"',
        'hosts = ["127.0.0.1", "localhost"]',
        "cert_valid_days = 365",
        f'run_dir = "run-{name}"',
    ]
    for site in sites:
        lines += ["", "[[sites]]", f'id = "{site}"']
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _medfed(*args: str) -> list[str]:
    return [sys.executable, "-m", "medfed", *args]


def _wait_for(what: str, check: Callable[[], bool], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}; log:\n{log.read_text(errors='replace')}"
        time.sleep(0.2)


def _supernode(
    group: ProcessGroup, name: str, port: int, ca: Path, key: Path, home: Path
) -> ManagedProcess:
    return group.start(
        name,
        [
            find_program("flower-supernode", install_hint="flwr"),
            "--superlink", f"127.0.0.1:{port}",
            "--root-certificates", str(ca),
            "--auth-supernode-private-key", str(key),
            "--host", "127.0.0.1",
            "--port", str(free_port()),
        ],
        env={"FLWR_HOME": str(home / name)},
    )  # fmt: skip


def test_coordinator_admits_provisioned_sites_only_and_stops_on_sigterm(
    tmp_path: Path, process_tag: str
) -> None:
    port = free_port()
    path = _consortium(tmp_path, "north", ("hospital-1", "hospital-2"), port)
    provision(load_consortium(path), tmp_path / "pki")
    # A second consortium: its CA is a stranger's, its site's key was never provisioned here.
    other = _consortium(tmp_path, "other", ("stranger",), free_port())
    provision(load_consortium(other), tmp_path / "other-pki")
    layout, strangers = PkiLayout(tmp_path / "pki"), PkiLayout(tmp_path / "other-pki")

    env = {**os.environ, TEST_TAG_VARIABLE: process_tag, "PYTHONUNBUFFERED": "1"}
    out_path = tmp_path / "coordinator.out"
    with open(out_path, "wb") as out:
        coordinator = subprocess.Popen(
            _medfed("coordinator", "start", str(path), "--pki", str(layout.root)),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip
    try:
        _wait_for("coordinator not ready", lambda: b"ready: 2 sites" in out_path.read_bytes(),
                  60, out_path)  # fmt: skip
        output = out_path.read_text()
        assert "registered hospital-1 (node " in output
        assert "registered hospital-2 (node " in output

        with ProcessGroup(log_dir=tmp_path / "logs", env=env) as group:
            site = layout.site_dir("hospital-1")
            admitted = _supernode(group, "admitted", port, site / "ca.pem",
                                  site / "supernode.key", tmp_path)  # fmt: skip
            stranger = strangers.site_dir("stranger")
            unknown_key = _supernode(group, "unknown-key", port, site / "ca.pem",
                                     stranger / "supernode.key", tmp_path)  # fmt: skip
            registered_key = layout.site_dir("hospital-2") / "supernode.key"
            wrong_ca = _supernode(group, "wrong-ca", port, stranger / "ca.pem",
                                  registered_key, tmp_path)  # fmt: skip
            _wait_for("the provisioned SuperNode did not connect",
                      lambda: log_contains(admitted, SUPERNODE_READY), 60,
                      admitted.log_path)  # fmt: skip
            time.sleep(4)  # the others have tried by now, more than once
            assert not log_contains(unknown_key, SUPERNODE_READY)
            assert not log_contains(wrong_ca, SUPERNODE_READY)
            wrong_ca_log = wrong_ca.log_path.read_text(errors="replace").lower()
            assert "certificate" in wrong_ca_log or "ssl" in wrong_ca_log, wrong_ca_log
    finally:
        coordinator.send_signal(signal.SIGTERM)
        coordinator.wait(timeout=30)
    assert "stopped the SuperLink" in out_path.read_text()
    deadline = time.monotonic() + 10
    while pids_with_env(TEST_TAG_VARIABLE, process_tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pids_with_env(TEST_TAG_VARIABLE, process_tag) == []


def test_coordinator_refuses_an_expired_superlink_certificate(
    tmp_path: Path, process_tag: str
) -> None:
    path = _consortium(tmp_path, "north", ("hospital-1",), free_port())
    provision(load_consortium(path), tmp_path / "pki")
    layout = PkiLayout(tmp_path / "pki")
    _, expired = issue_server_certificate(
        load_ec_private_key(layout.ca_key), load_certificate(layout.ca_cert),
        hosts=("127.0.0.1",), not_valid_after=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
    )  # fmt: skip
    write_atomic(layout.server_cert, pem_certificate(expired))
    completed = subprocess.run(
        _medfed("coordinator", "start", str(path), "--pki", str(layout.root)),
        env={**os.environ, TEST_TAG_VARIABLE: process_tag}, capture_output=True, text=True,
        timeout=60, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert completed.returncode == 1
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert "refusing to start" in lines[0]
    assert "SuperLink certificate" in lines[0]
    assert "expired on" in lines[0]
    assert pids_with_env(TEST_TAG_VARIABLE, process_tag) == []


def test_a_revoked_site_is_unregistered_at_once_and_not_registered_after_a_restart(
    tmp_path: Path, process_tag: str
) -> None:
    port = free_port()
    path = _consortium(tmp_path, "north", ("hospital-1", "hospital-2"), port)
    provision(load_consortium(path), tmp_path / "pki")
    layout = PkiLayout(tmp_path / "pki")
    env = {**os.environ, TEST_TAG_VARIABLE: process_tag, "PYTHONUNBUFFERED": "1"}
    start = _medfed("coordinator", "start", str(path), "--pki", str(layout.root))
    site = layout.site_dir("hospital-1")

    def run_coordinator(out_path: Path, ready: bytes) -> subprocess.Popen[bytes]:
        with open(out_path, "wb") as out:
            process = subprocess.Popen(start, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env)  # fmt: skip
        _wait_for("coordinator not ready", lambda: ready in out_path.read_bytes(), 60, out_path)
        return process

    first = run_coordinator(tmp_path / "first.out", b"ready: 2 sites")
    try:
        revoked = subprocess.run(
            _medfed("coordinator", "revoke", str(path), "--pki", str(layout.root), "hospital-1",
                    "--json"),
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
        assert revoked.returncode == 0, revoked.stdout + revoked.stderr
        assert "unregistered from the SuperLink" in revoked.stdout
        with ProcessGroup(log_dir=tmp_path / "logs", env=env) as group:
            refused = _supernode(group, "revoked", port, site / "ca.pem", site / "supernode.key",
                                 tmp_path)  # fmt: skip
            time.sleep(8)  # it has tried by now, more than once
            assert not log_contains(refused, SUPERNODE_READY)
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)

    second = run_coordinator(tmp_path / "second.out", b"ready: 1 sites")
    try:
        output = (tmp_path / "second.out").read_text()
        assert "not registering hospital-1: it was revoked" in output
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)
