"""ProcessGroup: starting, watching and stopping processes by PID, never by name."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from medfed.errors import MissingDependencyError, ProcessDiedError
from medfed.privacy.pki import provision_loopback
from medfed.processes import (
    TAG_VARIABLE,
    ProcessGroup,
    find_program,
    log_contains,
    tagged_pids,
    tls_health_ok,
)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_a_missing_program_names_what_to_install() -> None:
    with pytest.raises(MissingDependencyError) as caught:
        find_program("medfed-no-such-program", install_hint="pip install 'flwr==1.42.*'")
    assert str(caught.value) == (
        "'medfed-no-such-program' was not found; install it with: pip install 'flwr==1.42.*'"
    )


def test_a_program_beside_this_python_is_found_first() -> None:
    assert find_program("python", install_hint="-") == str(Path(sys.executable).parent / "python")


def test_stop_all_stops_detached_grandchildren_by_tag(tmp_path: Path) -> None:
    # The child starts a grandchild in a session of its own (as Flower starts its
    # SuperExec), so stopping the child's process group alone would miss it.
    pid_file = tmp_path / "grandchild.pid"
    child = _python(
        f"""
        import subprocess, sys, time
        grandchild = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
        )
        open({str(pid_file)!r}, "w").write(str(grandchild.pid))
        time.sleep(120)
        """
    )
    with ProcessGroup(log_dir=tmp_path) as group:
        process = group.start("child", child)
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        grandchild = int(pid_file.read_text())
        assert sorted(tagged_pids(group.tag)) == sorted([process.pid, grandchild])
    assert list(tagged_pids(group.tag)) == []
    assert process.popen.returncode is not None


def test_stop_all_stops_a_helper_whose_environment_no_longer_shows_the_tag(
    tmp_path: Path,
) -> None:
    # As Flower's simulation starts Ray: a detached, tagged helper starts a process in its
    # session whose environment block no longer reads the tag (Ray's agents overwrite it
    # when they rename themselves); that process must be stopped too.
    pid_file = tmp_path / "untagged.pid"
    helper = textwrap.dedent(
        f"""
        import subprocess, sys, time
        sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
        untagged = subprocess.Popen(sleeper, env={{}})
        open({str(pid_file)!r}, "w").write(str(untagged.pid))
        time.sleep(120)
        """
    )
    child = _python(
        f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {helper!r}], start_new_session=True)
        time.sleep(120)
        """
    )
    with ProcessGroup(log_dir=tmp_path) as group:
        group.start("child", child)
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        untagged = int(pid_file.read_text())
        assert untagged not in tagged_pids(group.tag), "the helper's child must not read tagged"
    assert not Path(f"/proc/{untagged}").exists() or _is_zombie(untagged)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


def test_a_dead_process_is_named_with_its_exit_code_and_last_lines(tmp_path: Path) -> None:
    with ProcessGroup(log_dir=tmp_path) as group:
        process = group.start(
            "hospital-2", _python("import sys; print('line one'); print('disk full'); sys.exit(3)")
        )
        process.popen.wait(timeout=30)
        with pytest.raises(ProcessDiedError) as caught:
            group.check_alive()
    message = str(caught.value)
    assert message.startswith(f"hospital-2 (pid {process.pid}) exited with code 3;")
    assert message.rstrip().endswith("line one\ndisk full")


def test_started_processes_get_the_tag_and_this_pythons_scripts_first(tmp_path: Path) -> None:
    with ProcessGroup(log_dir=tmp_path) as group:
        process = group.start(
            "env",
            _python(f"import os; print(os.environ[{TAG_VARIABLE!r}]); print(os.environ['PATH'])"),
        )
        process.popen.wait(timeout=30)
    tag, path = process.log_path.read_text().splitlines()[:2]
    assert tag == group.tag
    assert path.split(os.pathsep)[0] == str(Path(sys.executable).parent)


_SERVER = """
import socket, sys, time
port = int(sys.argv[1])
server = socket.socket()
try:
    server.bind(("127.0.0.1", port))
except OSError as exc:
    print(f"error while attempting to bind: {exc}".replace("Address", "address"), flush=True)
    sys.exit(1)
server.listen()
print("listening", flush=True)
time.sleep(120)
"""


def test_a_port_taken_meanwhile_is_replaced_by_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stranger = socket.socket()
    stranger.bind(("127.0.0.1", 0))
    stranger.listen()
    busy = stranger.getsockname()[1]
    real_free_port = __import__("medfed.processes", fromlist=["free_port"]).free_port
    ports = iter([busy])
    monkeypatch.setattr("medfed.processes.free_port", lambda: next(ports, None) or real_free_port())
    try:
        with ProcessGroup(log_dir=tmp_path) as group:
            process, port = group.start_on_free_port(
                "server",
                lambda port: [sys.executable, "-c", _SERVER, str(port)],
                lambda _port, process: log_contains(process, "listening"),
                timeout_s=30,
            )
            assert port != busy
            assert not process.died()
            assert "address already in use" in (tmp_path / "server.log").read_text().lower()
    finally:
        stranger.close()


def test_a_process_that_fails_for_another_reason_is_not_retried(tmp_path: Path) -> None:
    with ProcessGroup(log_dir=tmp_path) as group, pytest.raises(ProcessDiedError, match="boom"):
        group.start_on_free_port(
            "server",
            lambda port: _python("raise SystemExit('boom')"),
            lambda _port, _process: False,
            timeout_s=30,
        )
    assert not (tmp_path / "server-try2.log").exists()


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """An HTTPS server on 127.0.0.1 with a certificate from a fresh CA; answers GET /health."""
    pki = provision_loopback(tmp_path / "pki", ())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(connection, server_side=True) as tls:
                    tls.recv(4096)
                    tls.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], pki.ca_cert
    stop.set()
    thread.join(timeout=5)
    listener.close()


def test_tls_health_needs_a_certificate_from_our_ca(
    tls_server: tuple[int, Path], tmp_path: Path
) -> None:
    port, ca_cert = tls_server
    assert tls_health_ok(port, ca_cert)
    other_ca = provision_loopback(tmp_path / "other", ()).ca_cert
    assert not tls_health_ok(port, other_ca)


def test_a_plain_listener_is_not_taken_for_a_tls_server(tmp_path: Path) -> None:
    ca_cert = provision_loopback(tmp_path / "pki", ()).ca_cert
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        assert not tls_health_ok(plain.getsockname()[1], ca_cert)


def _alive(pid: int) -> bool:
    """A live process, not a zombie (the parent's children are reaped by init)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def test_a_child_started_to_die_with_its_parent_dies_when_the_parent_is_sigkilled(
    tmp_path: Path,
) -> None:
    # The parent starts two sleepers, one with die_with_parent; SIGKILL gives the parent
    # no chance to stop either: only the kernel can end the first one.
    pids = tmp_path / "pids"
    parent = _python(
        f"""
        import sys, time
        from pathlib import Path
        from medfed.processes import ProcessGroup
        group = ProcessGroup(log_dir=Path({str(tmp_path)!r}))
        sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
        bound = group.start("bound", sleep, die_with_parent=True)
        free = group.start("free", sleep)
        Path({str(pids)!r}).write_text(f"{{bound.pid}} {{free.pid}}")
        time.sleep(120)
        """
    )
    with ProcessGroup(log_dir=tmp_path) as group:
        process = group.start("parent", parent, env={"PYTHONPATH": os.getcwd()})
        deadline = time.monotonic() + 30
        while not pids.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        bound, free = (int(pid) for pid in pids.read_text().split())
        try:
            os.kill(process.pid, signal.SIGKILL)
            process.popen.wait(timeout=10)
            deadline = time.monotonic() + 10
            while _alive(bound) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(bound)
            assert _alive(free)  # the contrast: without it, a child outlives its parent
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(free, signal.SIGKILL)


def test_a_port_is_taken_while_listened_on_not_by_a_killed_servers_time_wait() -> None:
    from medfed.processes import port_taken

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    assert port_taken(port)
    # The server side closes first (as a killed SuperLink does): its connection on the
    # port waits in TIME_WAIT, and the listening socket goes.
    accepted.close()
    server.close()
    client.close()
    assert not port_taken(port)
