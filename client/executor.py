"""The warm task executor: runs the SuperNode's ClientApp tasks in one long-lived process.

Stock Flower starts a fresh `flwr-clientapp` process for every message (3 s or more of
imports each). With `flower-supernode --isolation process`, the SuperNode leaves that to
an executor that acquires each task from its Runtime API with a token. This one acquires
tasks in a loop and runs them in-process: it pulls the task's message, context and app
bundle, loads the ClientApp once per bundle, runs it behind the site's egress guard, and
pushes the reply and the task's status back.

Flower's internals it needs (the Runtime API, the steps of Flower's `run_clientapp`)
are behind Flower's door, `medfed.flower.runtime`, which checks the flwr version;
the e2e tests cover it. The SuperNode's AcquireTask is protected by a shared secret
(HMAC) that only the site's user can read, so no other local process can take the site's
tasks.

Modules this process imported already (medfed's own `client`, `model`, ... packages)
are the site's installed ones: a bundle whose ClientApp is medfed's runs the site's
installed copy of it, so the executor first checks that the bundle's medfed code is
byte for byte that installed code (`medfed.client.bundle_code`) and refuses it otherwise,
like an unsigned bundle. Whatever runs, the guard wraps it.

Before a bundle is installed or loaded, `client.bundle_check.BundleGate` checks that a key
the site trusts signed its exact bytes (the signature travels in the run's override
config, `flwr run --run-config`): a refused bundle gets an error reply naming why, a
`bundle.refused` entry in the site's audit log, and nothing of it is imported.

This module imports no torch: with a worker socket configured, neither does the ClientApp.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from flwr.app import Context, Error, Message

from medfed.client.bundle_check import (
    BUNDLE_REFUSED,
    ERROR_CODE_BUNDLE_REFUSED,
    UNSIGNED_WARNING,
    BundleGate,
    UntrustedBundleError,
)
from medfed.client.bundle_code import MEDFED_CLIENT_APP, client_app_of, installed_code_mismatch
from medfed.client.egress import Handler, ReplyMod, chain
from medfed.client.errors import public_reason
from medfed.common.pace import MessageMark, Pace
from medfed.flower.runtime import (
    CLIENT_APP_RAISED_EXCEPTION,
    RuntimeTasks,
    TaskSession,
    load_client_app,
)

AuditAppend = Callable[[str, Mapping[str, Any]], object]
"""Appends one event to the site's audit log (`privacy.audit.AuditLog.append`)."""

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05
"""How often a busy executor (a task within the last minute) asks the SuperNode for a
task (Flower's SuperExec: 1 s)."""
IDLE_POLL_INTERVAL_S = 5.0
"""How often an idle one asks anyway. Between asks it watches the SuperNode's message
mark (`medfed.common.pace.MessageMark`) and asks as soon as a message arrived."""
MARK_CHECK_S = 0.25
"""How often an idle executor looks at the mark (the file's time: no call to anyone)."""


class WarmExecutor:
    """Acquires ClientApp tasks from one SuperNode and runs them here, guarded."""

    def __init__(
        self,
        runtime_address: str,
        secret: bytes | None,
        guard: ReplyMod,
        *,
        bundles: BundleGate | None,
        audit: AuditAppend,
        installed: Path | None = None,
        approved_apps: frozenset[str] = frozenset(),
    ) -> None:
        """`bundles` None runs unsigned bundles (weaker: warned at every task); `audit`
        records each refused bundle; `installed` is the medfed package folder a bundle's
        code must equal (default: the one this process imports); `approved_apps` are the
        SHA-256 digests of bundles whose ClientApp is not medfed's that the site runs."""
        self._address = runtime_address
        self._tasks = RuntimeTasks(runtime_address, secret)
        self._guard = guard
        self._bundles = bundles
        self._audit = audit
        self._apps: dict[str, Handler] = {}
        self._code_checked: set[str] = set()
        self._installed = installed
        self._approved_apps = approved_apps
        self.tasks_run = 0

    def acquire(self) -> str | None:
        """A token for the next ClientApp task, or None if there is none now."""
        return self._tasks.acquire()

    def check_bundle(self, run: Any, fab: Any) -> None:
        """Refuse (`UntrustedBundleError`) a bundle no trusted key signed, or one whose
        medfed code is not byte for byte the installed medfed this process would run
        (`medfed.client.bundle_code`), before anything of it is installed or imported;
        record the refusal in the site's audit log."""
        try:
            if self._bundles is None:
                log.warning(
                    "%s (bundle %s, run %s)", UNSIGNED_WARNING, fab.hash_str[:12], run.run_id
                )
            else:
                self._bundles.check(fab.hash_str, fab.content, run.override_config)
            self._check_code(fab)
        except UntrustedBundleError as exc:
            details = {"fab_hash": fab.hash_str, "run_id": str(run.run_id), "reason": str(exc)}
            try:
                self._audit(BUNDLE_REFUSED, details)
            except Exception:  # the refusal stands; the log says the audit entry is missing
                log.exception("could not write %s to the audit log: %s", BUNDLE_REFUSED, details)
            raise

    def _check_code(self, fab: Any) -> None:
        """The bundle runs medfed's own ClientApp as the installed code, or is one the site
        approved by its SHA-256 (checked once per bundle hash)."""
        if fab.hash_str in self._code_checked:
            return
        client_app = client_app_of(fab.content)
        if client_app != MEDFED_CLIENT_APP and fab.hash_str not in self._approved_apps:
            raise UntrustedBundleError(
                f"its ClientApp {client_app or '(none named)'} is not medfed's own"
                f" ({MEDFED_CLIENT_APP}), and this site approved no other app with its SHA-256"
                f" {fab.hash_str[:16]}... (approved_apps in site.toml)"
            )
        mismatch = installed_code_mismatch(fab.content, self._installed)
        if mismatch is not None:
            raise UntrustedBundleError(f"the app bundle is not the code this site runs: {mismatch}")
        self._code_checked.add(fab.hash_str)

    def _app(self, run: Any, fab: Any) -> Handler:
        """The bundle's ClientApp, installed and loaded once per bundle hash."""
        if fab.hash_str not in self._apps:
            self._apps[fab.hash_str] = load_client_app(run, fab)
        return self._apps[fab.hash_str]

    def run_task(self, token: str) -> None:
        """Run one task end to end; every failure becomes an error reply, never a crash."""
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        completed, details = False, "the task failed"
        marks = [time.monotonic()]
        with TaskSession(self._address, token) as session:
            try:
                task = session.pull_input()
                message, context = task.message, task.context
                marks.append(time.monotonic())
                self.check_bundle(task.run, task.fab)
                reply = chain(self._app(task.run, task.fab), [self._guard])(message, context)
                marks.append(time.monotonic())
                completed, details = True, ""
            except UntrustedBundleError as exc:
                details = f"the site refused the app bundle: {exc}"[:400]
                if message is not None:
                    error = Error(code=ERROR_CODE_BUNDLE_REFUSED, reason=details)
                    reply = Message(error, reply_to=message)
            except Exception as exc:
                # The whole error stays in this log; the reply says only that it failed.
                log.exception("a ClientApp task failed")
                details = f"{public_reason(exc)} ({type(exc).__name__})"
                if message is not None:
                    error = Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=details)
                    reply = Message(error, reply_to=message)
            finally:
                try:
                    if reply is not None and context is not None:
                        session.push_reply(reply, context)
                except Exception:
                    log.exception("could not push the reply to the SuperNode")
                session.finish(context, completed=completed, details=details)
                marks.append(time.monotonic())
                self.tasks_run += 1
                phases = ", ".join(f"{b - a:.2f}" for a, b in itertools.pairwise(marks))
                log.info("task phases (pull, app, push) in s: %s", phases)

    def serve(
        self, stop: threading.Event, *, pace: Pace | None = None, mark: MessageMark | None = None
    ) -> None:
        """Acquire and run tasks until `stop` is set: asking every `pace.busy_s` for a
        minute after a task; when idle, as soon as the SuperNode's `mark` says a message
        arrived, or every `pace.idle_s`. A SuperNode that is away (restarting) is waited
        for, not given up on."""
        pace = pace or Pace(busy_s=POLL_INTERVAL_S, idle_s=IDLE_POLL_INTERVAL_S)
        mark = mark or MessageMark()
        while not stop.is_set():
            seen = mark.stamp()
            try:
                token = self.acquire()
            except Exception as exc:  # the SuperNode restarts: keep asking
                log.warning("the SuperNode's Runtime API does not answer (%s); retrying", exc)
                stop.wait(1.0)
                continue
            if token is None:
                if pace.idle:
                    _wait_for_a_message(stop, mark, seen, pace)
                else:
                    stop.wait(pace.busy_s)
            else:
                pace.worked()
                started = time.monotonic()
                self.run_task(token)
                log.info("ran a ClientApp task in %.2f s", time.monotonic() - started)
        self._tasks.close()


def _wait_for_a_message(stop: threading.Event, mark: MessageMark, seen: int, pace: Pace) -> None:
    """Wait until `mark` moves past `seen` (then stay busy), `pace.idle_s` passes or `stop`."""
    deadline = time.monotonic() + pace.idle_s
    while not stop.wait(min(MARK_CHECK_S, pace.idle_s)):
        if mark.stamp() != seen:
            pace.worked()
            return
        if time.monotonic() >= deadline:
            return


@dataclass(frozen=True)
class _Site:
    """What the executor reads of its site once, before it confines itself."""

    bundles: BundleGate | None
    audit: AuditAppend
    approved_apps: frozenset[str]
    private: tuple[Path, ...]
    """The site's data, keys and records: what the confinement must keep out of reach."""


def _site(site_toml: Path) -> _Site:
    """The site's bundle gate (None: unsigned allowed, warned), its audit log (through
    the worker, which holds the site's signing key: this process never reads it) and the
    bundles of other apps than medfed's that it approved (warned)."""
    from medfed.client.bundle_check import bundle_gate_of
    from medfed.client.config import load_site_config
    from medfed.client.worker_rpc import WorkerClient, worker_socket_path

    config = load_site_config(site_toml)
    gate = bundle_gate_of(config)
    if gate is not None:
        log.info("running only app bundles signed by: %s", ", ".join(gate.trusted_ids))
    approved = frozenset(config.coordinator.approved_apps) if config.coordinator else frozenset()
    for digest in sorted(approved):
        log.warning(
            "WARNING: this site runs the app bundle %s, whose ClientApp is not medfed's own:"
            " its code runs in this confined process, limited by the egress guard",
            digest,
        )
    private = (
        config.source,
        config.data_dir,
        config.ledger_path,
        config.audit_path,
        config.signing_key_path,
        *(p for p in (config.trusted_entities_path,) if p is not None),
    )
    audit = WorkerClient(worker_socket_path(config)).audit
    return _Site(gate, audit, approved, private)


def _confine(runtime_address: str, private: tuple[Path, ...]) -> None:
    """Confine this process (`medfed.client.sandbox`) before it starts any thread: read
    only code, write only its FLWR_HOME, connect over TCP only to the SuperNode's Runtime
    API. Says loudly what is not enforced."""
    import tempfile

    from medfed.client.sandbox import code_roots, confine, exposed

    host, _, port_text = runtime_address.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"--runtime {runtime_address!r}: expected HOST:PORT")
    port = int(port_text)
    flwr_home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").resolve()
    scratch = flwr_home / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(scratch)  # Flower unpacks bundles in a temporary folder
    tempfile.tempdir = str(scratch)
    roots = code_roots()
    for line in exposed(private, [*roots, flwr_home]):
        log.warning("WARNING: the executor's confinement cannot hide %s: move it", line)
    result = confine(read=roots, write=[flwr_home], tcp_ports=[port])
    if not result.enforced:
        log.warning("WARNING: the executor runs UNCONFINED: %s", result.problem)
        return
    tcp = "any port (Landlock ABI < 4)" if result.tcp_ports is None else result.tcp_ports
    log.info(
        "confined (Landlock ABI %d): reads code only, writes %s, TCP to %s",
        result.abi, flwr_home, tcp,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """`python -m medfed.client.executor --runtime 127.0.0.1:PORT --secret-file FILE
    --site-config SITE_TOML`."""
    parser = argparse.ArgumentParser(prog="python -m medfed.client.executor")
    parser.add_argument("--runtime", required=True, help="The SuperNode's Runtime API address.")
    parser.add_argument("--secret-file", type=Path, help="The SuperExec auth secret (raw bytes).")
    parser.add_argument(
        "--site-config", type=Path, required=True,
        help="The site's site.toml: the keys whose bundles it runs, its audit log.",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    from medfed.client.client_app import GUARD
    from medfed.client.errors import ClientError
    from medfed.privacy import PrivacyError

    try:
        site = _site(args.site_config)
        secret = args.secret_file.read_bytes() if args.secret_file else None
        _confine(args.runtime, site.private)
    except (ClientError, PrivacyError, OSError, ValueError) as exc:
        log.error("the executor cannot start: %s", exc)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    executor = WarmExecutor(
        args.runtime, secret, GUARD, bundles=site.bundles, audit=site.audit,
        approved_apps=site.approved_apps,
    )  # fmt: skip
    executor.serve(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
