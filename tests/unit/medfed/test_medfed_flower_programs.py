"""The one runner of `flwr` CLI commands and the readiness signals, against real
programs (small scripts standing in for `flwr`, run as subprocesses)."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest

from medfed.flower import (
    FlwrCommandError,
    check_flwr,
    run_flwr,
    supernode_connected,
    supernodes_online,
)
from medfed.processes import port_taken


def _program(tmp_path: Path, body: str) -> str:
    path = tmp_path / "flwr"
    path.write_text("#!/bin/sh\n" + body + "\n", encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_a_failed_command_names_what_and_ends_with_its_last_lines(tmp_path: Path) -> None:
    flwr = _program(
        tmp_path, 'echo "line 1"; echo "line 2"; echo "refused: no such run" >&2; exit 3'
    )
    output = run_flwr(flwr, ["stop", "7"], env=os.environ)
    assert (output.returncode, output.document()) == (3, {})
    with pytest.raises(FlwrCommandError) as caught:
        check_flwr(flwr, ["stop", "7"], env=os.environ, what="stopping run r1", tail_lines=2)
    assert str(caught.value) == "stopping run r1 failed (flwr exit 3): line 2 refused: no such run"


def test_the_environment_reaches_the_command_and_json_is_read(tmp_path: Path) -> None:
    flwr = _program(tmp_path, 'printf \'{"success": true, "home": "%s"}\' "$FLWR_HOME"')
    output = run_flwr(flwr, ["ls"], env={**os.environ, "FLWR_HOME": "/x/flwr-home"})
    assert output.document() == {"success": True, "home": "/x/flwr-home"}
    assert check_flwr(flwr, ["ls"], env=os.environ, what="listing").startswith("{")


def test_a_program_that_cannot_start_or_hangs_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(FlwrCommandError, match="could not be run"):
        run_flwr(str(tmp_path / "missing"), ["run"], env=os.environ)
    sleeper = _program(tmp_path, "exec sleep 30")  # killed at the timeout, no orphan
    with pytest.raises(FlwrCommandError, match="registering h1: flwr supernode register"):
        check_flwr(sleeper, ["supernode", "register"], env=os.environ, what="registering h1",
                   timeout_s=0.5)  # fmt: skip


def test_the_superlink_lists_which_nodes_are_online(tmp_path: Path) -> None:
    listing = {"success": True, "nodes": [
        {"node-id": "11", "status": "online"}, {"node-id": "12", "status": "registered"},
        {"node-id": "13", "status": "offline"}, {"node-id": "14", "status": "online"},
    ]}  # fmt: skip
    flwr = _program(tmp_path, f"echo '{json.dumps(listing)}'")
    assert supernodes_online(flwr, env=os.environ, connection="c") == {"11", "14"}
    garbled = _program(tmp_path, "echo 'not json'")
    with pytest.raises(FlwrCommandError, match="answered no JSON"):
        supernodes_online(garbled, env=os.environ, connection="c")


def test_the_supernode_line_is_read_only_from_a_log_that_has_it() -> None:
    assert supernode_connected("INFO : Starting\nINFO : SuperNode ID: 4471\n")
    assert not supernode_connected("ERROR : the SuperLink refused the SuperNode's key\n")


def test_a_port_held_by_another_socket_is_taken() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        assert port_taken(port)
    finally:
        holder.close()
    assert not port_taken(port)
