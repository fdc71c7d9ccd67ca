"""Start, watch and stop the processes of a federation on loopback.

Every process is started in a session of its own, so stopping it by its process
group also stops what it started (a SuperNode's ClientApps, a SuperLink's
ServerApp). Processes are stopped by PID, never by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType

from medfed.errors import MissingDependencyError, ProcessDiedError

STOP_GRACE_S = 5.0
TAG_VARIABLE = "MEDFED_PROCESS_TAG"
"""Set in the environment of every process a group starts, and inherited by their children.

Flower detaches some helpers into sessions of their own (the SuperLink's and SuperNode's
SuperExec); the tag finds them, and any orphan, so they can be stopped by PID."""
_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> Callable[[], None]:
    """A `preexec_fn` that has the kernel SIGKILL the child when `parent` dies (Linux's
    `PR_SET_PDEATHSIG`), so a SIGKILLed supervisor leaves no orphan to run beside the
    children its restart starts; if `parent` died during the fork, the child ends at once."""

    def arrange() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return arrange


def find_program(name: str, *, install_hint: str) -> str:
    """The path of an installed command: next to this Python first, then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise MissingDependencyError(f"'{name}' was not found; install it with: {install_hint}")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_holders(port: int) -> list[tuple[int, str]]:
    """(PID, command line) of each process listening on TCP `port` that this user may
    see (Linux /proc); empty if none is visible."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            listening = len(fields) > 9 and fields[3] == "0A"  # TCP_LISTEN
            if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    holders: list[tuple[int, str]] = []
    if not inodes:
        return holders
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not _holds_any(entry, inodes):
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        holders.append((int(entry.name), command.decode("utf-8", "replace").strip()[:200]))
    return holders


def _holds_any(process: Path, links: set[str]) -> bool:
    """Whether the process at /proc/<pid> has an open file descriptor naming one of `links`."""
    try:
        descriptors = list((process / "fd").iterdir())
    except OSError:
        return False
    for descriptor in descriptors:
        try:
            if os.readlink(descriptor) in links:
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def tagged_pids(tag: str, sessions: Set[int] = frozenset()) -> Iterator[int]:
    """PIDs of live processes whose environment carries `TAG_VARIABLE=tag`, or that run in
    one of `sessions` (see `sessions_of`)."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        # A zombie has exited already; its parent reaps it.
        if fields[0] != "Z" and (int(fields[3]) in sessions or needle in environ.split(b"\0")):
            yield int(entry.name)


def sessions_of(pids: Iterable[int]) -> set[int]:
    """The sessions `pids` run in, other than this process's own.

    Searching them finds a process that renamed itself over its own environment block,
    so that the tag no longer reads in /proc (Ray's agents do, with setproctitle): it
    inherited the session of a tagged parent, and stays in it unless it detaches itself."""
    found = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            found.add(os.getsid(pid))
    return found - {0, os.getsid(0)}


def tls_health_ok(port: int, ca_cert: Path, *, host: str = "127.0.0.1") -> bool:
    """True if a server on `host`:`port` proves a certificate from our CA and is healthy.

    Checking the certificate, not only the port, means a stranger already listening
    on that port is never taken for our SuperLink.
    """
    context = ssl.create_default_context(cafile=str(ca_cert))
    connection = http.client.HTTPSConnection(host, port, timeout=2, context=context)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    """Whether another socket holds `host:port`, so a server started on it cannot bind.

    Asked of the operating system (a bind attempt), not read from a server's log. The
    probe sets SO_REUSEADDR, as the SuperLink's gRPC server does: the connections a
    killed server leaves in TIME_WAIT do not hold the port (on Linux a listening socket
    still does), so a restart after a crash is not refused for them."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def log_contains(process: ManagedProcess, needle: str) -> bool:
    """True once `needle` appears in the process's log."""
    try:
        return needle in process.log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def tail(path: Path, lines: int = 12) -> str:
    """The last `lines` lines of a log file (empty if it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


@dataclass
class ManagedProcess:
    """A process this group started, with where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def died(self) -> bool:
        return self.popen.poll() is not None


@dataclass
class ProcessGroup:
    """The processes of one federation; a context manager that stops them all on exit."""

    log_dir: Path
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    processes: list[ManagedProcess] = field(default_factory=list)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        # Flower's processes start helpers (flower-superexec, flwr-clientapp) by name from
        # PATH: put this Python's scripts first, so they are the same installation.
        scripts = str(Path(sys.executable).parent)
        path = self.env.get("PATH", "")
        self.env = {**self.env, "PATH": f"{scripts}{os.pathsep}{path}", TAG_VARIABLE: self.tag}

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        die_with_parent: bool = False,
    ) -> ManagedProcess:
        """Start `argv` in a new session with its output in `<log_dir>/<name>.log`; with
        `die_with_parent`, the kernel kills it if this process dies (even by SIGKILL)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log_file:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**self.env, **(env or {})},
                start_new_session=True,
                preexec_fn=_die_with(os.getpid()) if die_with_parent else None,
            )
        process = ManagedProcess(name, popen, log_path)
        self.processes.append(process)
        return process

    def check_alive(self) -> None:
        """Raise `ProcessDiedError` naming the first process that exited, with its last lines."""
        for process in self.processes:
            if process.died():
                raise ProcessDiedError(
                    f"{process.name} (pid {process.pid}) exited with code"
                    f" {process.popen.returncode}; last lines of {process.log_path}:\n"
                    f"{tail(process.log_path)}"
                )

    def wait_until_ready(
        self, process: ManagedProcess, ready: Callable[[], bool], *, timeout_s: float
    ) -> None:
        """Wait until `ready()` is true; fail early, with its last lines, if `process` exits."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            if process.died():
                self.check_alive()
            if time.monotonic() > deadline:
                raise ProcessDiedError(
                    f"{process.name} was not ready within {timeout_s:g} s; last lines of"
                    f" {process.log_path}:\n{tail(process.log_path)}"
                )
            time.sleep(0.2)

    def start_on_free_port(
        self,
        name: str,
        argv_for: Callable[[int], Sequence[str]],
        ready: Callable[[int, ManagedProcess], bool],
        *,
        env: Mapping[str, str] | None = None,
        timeout_s: float,
        attempts: int = 3,
    ) -> tuple[ManagedProcess, int]:
        """Start a server on a free loopback port and wait until `ready(port, process)`.

        If the port was taken between choosing and binding it, try another one.
        """
        for attempt in range(1, attempts + 1):
            port = free_port()
            process = self.start(
                name if attempt == 1 else f"{name}-try{attempt}", argv_for(port), env=env
            )
            try:
                self.wait_until_ready(process, partial(ready, port, process), timeout_s=timeout_s)
                return process, port
            except ProcessDiedError:
                if not port_taken(port) or attempt == attempts:
                    raise
                self.processes.remove(process)
        raise AssertionError("unreachable")

    def stop(self, process: ManagedProcess) -> None:
        """Stop one process and everything in its session: SIGTERM, then SIGKILL after a grace."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)
            try:
                process.popen.wait(timeout=STOP_GRACE_S)
                break
            except subprocess.TimeoutExpired:
                continue
        # Children that outlived their leader are still in its process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        """Stop every process, newest first (sites before the SuperLink), then any helper
        or orphan that still carries this group's tag."""
        # Each live process was started in a session of its own (its PID names it); the
        # helpers Flower detached carry the tag, and their sessions are searched too. (A
        # dead process's PID is left out: it may name someone else's session by now.)
        live = [process.pid for process in self.processes if not process.died()]
        sessions = sessions_of([*live, *tagged_pids(self.tag)])
        for process in reversed(self.processes):
            self.stop(process)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            leftovers = list(tagged_pids(self.tag, sessions))
            if not leftovers:
                return
            sessions |= sessions_of(leftovers)
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + STOP_GRACE_S
            while time.monotonic() < deadline and any(
                True for _ in tagged_pids(self.tag, sessions)
            ):
                time.sleep(0.1)
