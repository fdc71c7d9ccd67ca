"""Red-team row "orphaned coordinator": `coordinator start` never starts (or says ready)
while another process holds its port, and names that process; processes a killed
`coordinator start` left behind are stopped by PID at the next start."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from medfed.cli import app
from medfed.coordinator.consortium import load_consortium
from medfed.coordinator_cli import OWNER_NAME
from medfed.processes import TAG_VARIABLE, free_port, port_holders
from medfed.provision import provision


def _consortium(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "consortium.toml"
    path.write_text(
        '[consortium]\nname = "c"\n'
        f'address = "127.0.0.1:{port}"\nhosts = ["127.0.0.1", "localhost"]\n'
        'run_dir = "run"\n\n[[sites]]\nid = "hospital-1"\n',
        encoding="utf-8",
    )
    provision(load_consortium(path), tmp_path / "pki")
    return path


def test_a_foreign_process_on_the_port_is_named_and_nothing_starts(tmp_path: Path) -> None:
    port = free_port()
    toml = _consortium(tmp_path, port)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        assert os.getpid() in [pid for pid, _ in port_holders(port)]
        result = CliRunner().invoke(
            app, ["coordinator", "start", str(toml), "--pki", str(tmp_path / "pki")]
        )
    assert result.exit_code == 1
    assert f"port {port} is already in use by PID {os.getpid()}" in result.output
    assert "ready:" not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "logs" / "superlink.log").exists()


def test_what_a_killed_coordinator_left_running_is_stopped_by_pid(tmp_path: Path) -> None:
    port = free_port()
    toml = _consortium(tmp_path, port)
    tag = "orphan-of-a-killed-coordinator"
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"],
        env={**os.environ, TAG_VARIABLE: tag},
        start_new_session=True,
    )
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / OWNER_NAME).write_text(json.dumps({"pid": dead.pid, "tag": tag}))
    try:
        with socket.socket() as squatter:  # stop right after the reaping: the port is held
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
            result = CliRunner().invoke(
                app, ["coordinator", "start", str(toml), "--pki", str(tmp_path / "pki")]
            )
        assert f"stopping PID {orphan.pid}" in result.output
        deadline = time.monotonic() + 10
        while orphan.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert orphan.returncode == -signal.SIGKILL
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
