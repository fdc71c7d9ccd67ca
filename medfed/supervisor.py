"""`medfed site start`: the site daemon that supervises the worker, the SuperNode and the
warm task executor.

Three children, each in its own session so it is stopped by PID with what it started:

- the site worker (`python -m medfed.client.worker SITE_TOML`): data, model, ledger, policy;
- `flower-supernode --isolation process`: outbound TLS to the coordinator's SuperLink
  with the site's SuperNode key; retries without limit when the coordinator restarts;
  its Runtime API listens on 127.0.0.1 only;
- the warm executor (`python -m medfed.client.executor`): runs the ClientApp tasks in one
  process, behind the egress guard, so no process starts per message, and only app
  bundles a key in site.toml's `[coordinator] trusted_entities` signed.

A child that exits is restarted with exponential backoff (1 s doubling to 60 s, reset
after 60 s of good health). The daemon logs to a rotating file in the state dir and
writes its state (children, PIDs, restarts, ports) atomically to `daemon.json` there,
which `medfed site status` reads. SIGTERM or SIGINT stops every child by PID.

One daemon per site: `daemon.lock` in the state dir is held (flock) with the daemon's
PID for its whole life, taken before anything else is written, so a second
`site start` on the same site.toml refuses, naming the first, and touches none of its
files (its worker socket, SuperExec secret or state).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import logging.handlers
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from medfed.client import UNSIGNED_WARNING, SiteConfig, SiteConfigError, bundle_gate_of
from medfed.client.worker_rpc import worker_socket_path
from medfed.common import write_atomic, write_text_atomic
from medfed.errors import MedfedError
from medfed.flower import (
    FLWR_HINT,
    require_supported_flwr,
    supernode_connected,
    supernode_unregistered,
)
from medfed.processes import ManagedProcess, ProcessGroup, find_program, free_port

log = logging.getLogger(__name__)

STATE_FILE: Final = "daemon.json"
LOCK_FILE: Final = "daemon.lock"
SECRET_FILE: Final = "superexec.secret"
LOG_DIR: Final = "logs"
LOG_MAX_BYTES: Final = 5 * 1024 * 1024
LOG_BACKUPS: Final = 5
BACKOFF_FIRST_S: Final = 1.0
BACKOFF_MAX_S: Final = 60.0
HEALTHY_AFTER_S: Final = 60.0
TICK_S: Final = 0.5
"""How often the daemon looks at its children (a crashed one restarts within this, past its
backoff); each look costs a little CPU all year."""


class DaemonError(MedfedError):
    """The site daemon cannot start: a missing section, file or program; names which."""


@dataclass
class Child:
    """One supervised process: how to start it, and its restart history."""

    name: str
    argv: Callable[[], Sequence[str]]
    env: dict[str, str] = field(default_factory=dict)
    process: ManagedProcess | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start_at: float = 0.0
    backoff_s: float = BACKOFF_FIRST_S
    last_exit: int | None = None
    log_offset: int = 0
    """Where this start's output begins in its log (earlier starts' output comes before)."""

    def to_json(self) -> dict[str, Any]:
        alive = self.process is not None and not self.process.died()
        return {
            "pid": self.process.pid if self.process is not None else None,
            "alive": alive,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "log": str(self.process.log_path) if self.process is not None else None,
        }


LOG_WATCH_TAIL: Final = 512
"""Characters of the SuperNode's log kept between reads: longer than any line watched for."""


@dataclass
class LogWatch:
    """What one start of the SuperNode has said so far (`SiteDaemon._supernode_said`)."""

    key: tuple[int, int] = (-1, -1)
    """The start (its pid, where its output begins) this was read for."""
    read_to: int = 0
    tail: str = ""
    connected: bool = False
    refused: bool = False
    """The SuperLink refused its key as unregistered (before it connected)."""


def _secret(path: Path) -> Path:
    """A fresh random SuperExec secret, readable by the site's user only."""
    write_atomic(path, secrets.token_bytes(32), mode=0o600)
    return path


def _rotate(path: Path) -> None:
    """Keep a child's log below `LOG_MAX_BYTES`: move it aside (`.1` ... `.5`) at restart."""
    try:
        if path.stat().st_size < LOG_MAX_BYTES:
            return
    except OSError:
        return
    for index in range(LOG_BACKUPS - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{index + 1}"))
    os.replace(path, path.with_name(f"{path.name}.1"))


def _daemon_log(log_dir: Path) -> logging.Handler:
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        log_dir / "site.log", maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def _check_files(config: SiteConfig) -> tuple[str, Path, Path]:
    coordinator = config.coordinator
    if coordinator is None:
        raise SiteConfigError(
            f'{config.source}: has no [coordinator] section: add superlink = "HOST:PORT",'
            " root_certificates and auth_private_key (from the site's startup kit)"
        )
    ca = config.resolve(coordinator.root_certificates)
    key = config.resolve(coordinator.auth_private_key)
    for what, path in (
        ("coordinator.root_certificates", ca),
        ("coordinator.auth_private_key", key),
    ):
        if not path.is_file():
            raise SiteConfigError(f"{config.source}: key {what}: {path} does not exist")
    if key.stat().st_mode & 0o077:
        raise SiteConfigError(
            f"{config.source}: key coordinator.auth_private_key: {key} is readable by others;"
            f" run: chmod 600 {key}"
        )
    return coordinator.superlink, ca, key


class SiteDaemon:
    """The supervisor of one site's processes."""

    def __init__(self, config: SiteConfig) -> None:
        superlink, ca, key = _check_files(config)
        bundle_gate_of(config)  # a site that cannot check bundles does not start
        self.config = config
        self.state_dir = config.state_dir
        self.log_dir = self.state_dir / LOG_DIR
        # before anything is written: a second daemon must not touch the first's files
        self._lock_fd = acquire_site_lock(config)
        self.runtime_port = free_port()
        self.superlink = superlink
        try:
            secret = _secret(self.state_dir / SECRET_FILE)
        except OSError as exc:
            raise DaemonError(
                f"site {config.site.id}: the state folder {self.state_dir} cannot be written"
                f" ({exc.strerror})"
            ) from exc
        find_program("flower-supernode", install_hint=FLWR_HINT)  # flwr is installed
        require_supported_flwr()  # and is the release medfed's Flower door supports
        coordinator = config.coordinator
        assert coordinator is not None  # _check_files refuses a site.toml without one
        poll_s = [str(coordinator.poll_interval_s), str(coordinator.idle_poll_interval_s)]
        socket_path = worker_socket_path(config)
        node_config = f'worker-socket="{socket_path}" site-config="{config.source.resolve()}"'
        flwr_home = {"FLWR_HOME": str(self.state_dir / "flwr")}
        python = sys.executable
        self._watch = LogWatch()
        self.children = [
            Child("worker", lambda: [python, "-m", "medfed.client.worker", str(config.source)]),
            Child(
                "supernode",
                lambda: [
                    python,
                    "-m",
                    "medfed.client.supernode",
                    *poll_s,
                    "--superlink",
                    superlink,
                    "--root-certificates",
                    str(ca),
                    "--auth-supernode-private-key",
                    str(key),
                    "--isolation",
                    "process",
                    "--superexec-auth-secret-file",
                    str(secret),
                    "--node-config",
                    node_config,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.runtime_port),
                ],
                env=flwr_home,
            ),
            Child(
                "executor",
                lambda: [
                    python,
                    "-m",
                    "medfed.client.executor",
                    "--runtime",
                    f"127.0.0.1:{self.runtime_port}",
                    "--secret-file",
                    str(secret),
                    "--site-config",
                    str(config.source.resolve()),
                ],
                env=flwr_home,
            ),
        ]
        self.group = ProcessGroup(log_dir=self.log_dir)
        self.started = dt.datetime.now(dt.UTC)

    def _start(self, child: Child) -> None:
        if child.process is not None and child.process in self.group.processes:
            self.group.processes.remove(child.process)
        log_path = self.log_dir / f"{child.name}.log"
        _rotate(log_path)
        try:
            child.log_offset = log_path.stat().st_size
        except OSError:
            child.log_offset = 0
        # Children die with the daemon, even a SIGKILLed one: a restarted daemon must not
        # find its old SuperNode, worker or executor still running beside the new ones.
        child.process = self.group.start(
            child.name, child.argv(), env=child.env, die_with_parent=True
        )
        child.started_at = time.monotonic()
        log.info("started %s (pid %d)", child.name, child.process.pid)

    def _tend(self, child: Child) -> None:
        """Restart `child` if it exited, once its backoff has passed."""
        now = time.monotonic()
        process = child.process
        if process is not None and not process.died():
            if now - child.started_at > HEALTHY_AFTER_S:
                child.backoff_s = BACKOFF_FIRST_S
            return
        if process is not None and child.next_start_at == 0.0:
            child.last_exit = process.popen.returncode
            child.next_start_at = now + child.backoff_s
            log.warning(
                "%s (pid %d) exited with code %s; restarting in %.0f s",
                child.name, process.pid, child.last_exit, child.backoff_s,
            )  # fmt: skip
            child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)
            return
        if now >= child.next_start_at:
            if process is not None:
                child.restarts += 1
            child.next_start_at = 0.0
            self._start(child)

    def _supernode_said(self) -> LogWatch:
        """What the SuperNode's log says since it last started, reading only what was
        written since the last look (an earlier start's words, before `log_offset`, never
        count; a daemon that runs all year must not reread its whole log every second)."""
        child = self.children[1]
        supernode = child.process
        if supernode is None:
            return LogWatch()
        key = (supernode.pid, child.log_offset)
        if self._watch.key != key:
            self._watch = LogWatch(key=key, read_to=child.log_offset)
        watch = self._watch
        try:
            with supernode.log_path.open("rb") as log_file:
                log_file.seek(watch.read_to)
                new = log_file.read(LOG_MAX_BYTES)
        except OSError:
            return watch
        watch.read_to += len(new)
        # the last line of the previous part, in case a marker was split across reads
        text = watch.tail + new.decode("utf-8", errors="replace")
        watch.connected = watch.connected or supernode_connected(text)
        watch.refused = watch.refused or supernode_unregistered(text)
        watch.tail = text[-LOG_WATCH_TAIL:]
        return watch

    def connected(self) -> bool:
        """Whether the SuperNode has authenticated with the SuperLink since it last started."""
        supernode = self.children[1].process
        if supernode is None or supernode.died():
            return False
        return self._supernode_said().connected

    def unregistered(self) -> bool:
        """Whether the SuperLink refused the SuperNode's key as unregistered (never
        registered, or revoked) at its last start."""
        said = self._supernode_said()
        return said.refused and not said.connected

    def state(self, *, running: bool) -> dict[str, Any]:
        return {
            "site_id": self.config.site.id,
            "running": running,
            "daemon_pid": os.getpid(),
            "started_at": self.started.isoformat(),
            "updated_at": dt.datetime.now(dt.UTC).isoformat(),
            "superlink": self.superlink,
            "runtime_port": self.runtime_port,
            "connected": self.connected() if running else False,
            "unregistered": self.unregistered() if running else False,
            "children": {child.name: child.to_json() for child in self.children},
        }

    def release(self) -> None:
        """Give up the site's lock (after `run`, or for a daemon that never ran)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __del__(self) -> None:
        if getattr(self, "_lock_fd", -1) >= 0:
            self.release()

    def write_state(self, *, running: bool = True) -> None:
        write_text_atomic(
            self.state_dir / STATE_FILE, json.dumps(self.state(running=running)) + "\n"
        )

    def run(self, stop: threading.Event) -> None:
        """Supervise until `stop` is set; then stop every child by PID."""
        handler = _daemon_log(self.log_dir)
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(min(root.level, logging.INFO) if root.level else logging.INFO)
        try:
            if self.config.trusted_entities_path is None:
                log.warning(UNSIGNED_WARNING)
            for child in self.children:
                self._start(child)
            last_write = 0.0
            while not stop.is_set():
                for child in self.children:
                    self._tend(child)
                if time.monotonic() - last_write > 1.0:
                    self.write_state()
                    last_write = time.monotonic()
                stop.wait(TICK_S)
        finally:
            log.info("stopping the site's processes")
            self.group.stop_all()
            self.write_state(running=False)
            root.removeHandler(handler)
            handler.close()
            self.release()


def acquire_site_lock(config: SiteConfig) -> int:
    """Hold `<state dir>/daemon.lock` (an flock, released when the process ends) with this
    PID in it; `DaemonError` naming the daemon that holds it, or an unwritable folder."""
    path = config.state_dir / LOCK_FILE
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise DaemonError(
            f"site {config.site.id}: the state folder {config.state_dir} cannot be written"
            f" ({exc.strerror})"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise DaemonError(
            f"site {config.site.id}: a daemon already runs for this site (PID {holder},"
            f" lock {path}); stop it first (`kill {holder}`), or use its `site status`"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        raise DaemonError(
            f"site {config.site.id}: {path} cannot be written ({exc.strerror})"
        ) from exc
    return fd


def lock_holder(config: SiteConfig) -> int | None:
    """The PID of the daemon holding the site's lock, or None if none holds it."""
    path = config.state_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else None
        return None
    finally:
        os.close(fd)


def read_state(config: SiteConfig) -> dict[str, Any] | None:
    """The daemon's last written state, or None if it never ran here."""
    try:
        document = json.loads((config.state_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def pid_alive(pid: object) -> bool:
    """Whether a process with this PID exists (and is not a zombie)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return status.rsplit(")", 1)[-1].split()[0] != "Z"
