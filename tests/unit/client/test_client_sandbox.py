"""The executor's confinement (Landlock): a confined process reads code, writes only its
own folder and connects over TCP only to the Runtime API's port. Each check runs in a
fresh process, since confinement cannot be undone."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from medfed.client.sandbox import confine, exposed, landlock_abi

needs_landlock = pytest.mark.skipif(
    landlock_abi() == 0, reason="this kernel has no Landlock: the executor runs unconfined"
)


@pytest.fixture
def listeners() -> Iterator[tuple[int, int]]:
    """Two listening loopback ports: the one the confined process may reach, and another."""
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    try:
        yield sockets[0].getsockname()[1], sockets[1].getsockname()[1]
    finally:
        for server in sockets:
            server.close()


def _confined(tmp_path: Path, allowed_port: int, other_port: int) -> dict[str, str]:
    """What a process confined as the executor is could do, attempt by attempt."""
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    (site / "data" / "patients.csv").write_text("patient_id,age\np1,61\n")
    (site / "site-signing.key").write_text("-----BEGIN PRIVATE KEY-----\n")
    flwr_home = site / "state" / "flwr"
    flwr_home.mkdir(parents=True)
    script = textwrap.dedent(
        f"""
        import importlib.util, json, socket
        from pathlib import Path
        from medfed.client.sandbox import code_roots, confine

        site = Path({str(site)!r})
        done = confine(read=code_roots(), write=[site / "state" / "flwr"],
                       tcp_ports=[{allowed_port}])
        assert done.enforced, done.problem

        def attempt(action):
            try:
                action()
                return "ok"
            except OSError as exc:
                return type(exc).__name__

        print(json.dumps({{
            "read data": attempt(lambda: (site / "data" / "patients.csv").read_text()),
            "list site": attempt(lambda: list(site.iterdir())),
            "read key": attempt(lambda: (site / "site-signing.key").read_text()),
            "write beside": attempt(lambda: (site / "loot.csv").write_text("x")),
            "write own folder": attempt(
                lambda: (site / "state" / "flwr" / "app.py").write_text("x")),
            "read own folder": attempt(lambda: (site / "state" / "flwr" / "app.py").read_text()),
            "connect runtime": attempt(
                lambda: socket.create_connection(("127.0.0.1", {allowed_port})).close()),
            "connect other": attempt(
                lambda: socket.create_connection(("127.0.0.1", {other_port})).close()),
            "bind": attempt(lambda: socket.create_server(("127.0.0.1", 0)).close()),
            "import code": attempt(lambda: __import__("flwr.app")),
            # The bundle check compares every room a bundle ships with the installed one.
            "read every room": attempt(lambda: [
                Path(importlib.util.find_spec("medfed." + room).origin).read_bytes()
                for room in ("bench", "coordinator", "client", "sites")
            ]),
        }}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False,
        cwd=site,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@needs_landlock
def test_a_confined_process_reaches_only_code_its_folder_and_the_runtime_port(
    tmp_path: Path, listeners: tuple[int, int]
) -> None:
    result = _confined(tmp_path, *listeners)
    assert result == {
        "read data": "PermissionError",
        "list site": "PermissionError",
        "read key": "PermissionError",
        "write beside": "PermissionError",
        "write own folder": "ok",
        "read own folder": "ok",
        "connect runtime": "ok",
        "connect other": "PermissionError" if landlock_abi() >= 4 else "ok",
        "bind": "PermissionError" if landlock_abi() >= 4 else "ok",
        "import code": "ok",
        "read every room": "ok",
    }


def test_an_unconfined_process_can_read_what_the_confined_one_cannot(
    tmp_path: Path, listeners: tuple[int, int]
) -> None:
    # The reference for the test above: the same attempts, without `confine`, all pass.
    secret = tmp_path / "patients.csv"
    secret.write_text("p1,61\n")
    assert secret.read_text() == "p1,61\n"
    socket.create_connection(("127.0.0.1", listeners[1])).close()


def test_private_paths_under_a_readable_root_are_named(tmp_path: Path) -> None:
    code = tmp_path / "venv"
    (code / "data").mkdir(parents=True)
    elsewhere = tmp_path / "site" / "data"
    elsewhere.mkdir(parents=True)
    found = exposed([code / "data", elsewhere], [code])
    assert found == [f"{(code / 'data').resolve()} (under {code.resolve()})"]


def test_without_landlock_nothing_is_enforced_and_it_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("medfed.client.sandbox.landlock_abi", lambda: 0)
    result = confine(read=[tmp_path], write=[tmp_path], tcp_ports=[1])
    assert not result.enforced
    assert result.problem is not None and "Landlock" in result.problem


def test_an_executor_with_a_bad_runtime_address_stops_before_changing_anything() -> None:
    import os

    from medfed.client.executor import _confine

    before = os.environ.get("TMPDIR")
    with pytest.raises(ValueError, match=r"--runtime '127\.0\.0\.1': expected HOST:PORT"):
        _confine("127.0.0.1", ())
    assert os.environ.get("TMPDIR") == before
