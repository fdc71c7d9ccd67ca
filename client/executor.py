"""The warm task executor: runs the SuperNode's ClientApp tasks in one long-lived process.

Stock Flower starts a fresh `flwr-clientapp` process for every message (3 s or more of
imports each). With `flower-supernode --isolation process`, the SuperNode leaves that to
an executor that acquires each task from its Runtime API with a token. This one acquires
tasks in a loop and runs them in-process: it pulls the task's message, context and app
bundle, loads the ClientApp once per bundle, runs it behind the site's egress guard, and
pushes the reply and the task's status back.

It leans on flwr 1.42 internals (`flwr.supernode.runtime.run_clientapp`'s helpers and
the Runtime API's protobufs): pyproject pins flwr 1.42.x and the e2e tests cover it.
The SuperNode's AcquireTask is protected by a shared secret (HMAC) that only the
site's user can read, so no other local process can take the site's tasks.

Modules this process imported already (medfed's own `client`, `model`, ... packages)
are the site's installed ones: a bundle whose ClientApp is medfed's runs the site's
installed copy of it. Whatever runs, the guard wraps it.

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
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
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
from medfed.client.egress import Handler, ReplyMod, chain

AuditAppend = Callable[[str, Mapping[str, Any]], object]
"""Appends one event to the site's audit log (`privacy.audit.AuditLog.append`)."""

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05
"""How often an idle executor asks the SuperNode for a task (Flower's SuperExec: 1 s)."""
OBJECT_BACKOFF_S = (0.05, 0.5)
"""First and largest wait before asking again for a part of the message the SuperNode is
still fetching (Flower's `flwr-clientapp`: 1 s doubling to 10 s, most of a short round)."""


def pull_task_input(client: Any) -> tuple[Message, Context, Any, Any]:
    """The task's message, context, run and app bundle: Flower 1.42's `pull_task_input`
    (flwr.supernode.runtime.run_clientapp) with shorter backoffs for missing objects."""
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    started = time.monotonic()
    task = client.PullTaskInput(PullTaskInputRequest())
    took_task = time.monotonic() - started
    TaskIdentity.task_id = task.task_id
    TaskIdentity.run_id = task.run.run_id
    TaskIdentity.node_id = task.context.node_id
    context = context_from_proto(task.context)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode handed over a task without a message")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message: Message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        initial_backoff=OBJECT_BACKOFF_S[0],
        backoff_cap=OBJECT_BACKOFF_S[1],
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower does
    log.info(
        "pulled the task input in %.2f s (%.2f s for context, run and bundle)",
        time.monotonic() - started, took_task,
    )  # fmt: skip
    return message, context, run_from_proto(task.run), fab_from_proto(task.fab)


def _runtime_client(address: str, interceptors: list[Any]) -> Any:
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # the Runtime API listens on 127.0.0.1 only
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


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
    ) -> None:
        """`bundles` None runs unsigned bundles (weaker: warned at every task); `audit`
        records each refused bundle."""
        from flwr.supercore.interceptors import (
            RuntimeVersionHttpInterceptor,
            SuperExecAuthHttpInterceptor,
        )

        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if secret:
            interceptors.append(
                SuperExecAuthHttpInterceptor(
                    master_secret=secret,
                    protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}),
                )
            )
        self._address = runtime_address
        self._client = _runtime_client(runtime_address, interceptors)
        self._guard = guard
        self._bundles = bundles
        self._audit = audit
        self._apps: dict[str, Handler] = {}
        self.tasks_run = 0

    def acquire(self) -> str | None:
        """A token for the next ClientApp task, or None if there is none now."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        response = self._client.AcquireTask(
            AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[])
        )
        if response.HasField("task") and response.token:
            return str(response.token)
        return None

    def check_bundle(self, run: Any, fab: Any) -> None:
        """Refuse (`UntrustedBundleError`) a bundle no trusted key signed, before anything
        of it is installed or imported; record the refusal in the site's audit log."""
        if self._bundles is None:
            log.warning("%s (bundle %s, run %s)", UNSIGNED_WARNING, fab.hash_str[:12], run.run_id)
            return
        try:
            self._bundles.check(fab.hash_str, fab.content, run.override_config)
        except UntrustedBundleError as exc:
            details = {"fab_hash": fab.hash_str, "run_id": str(run.run_id), "reason": str(exc)}
            try:
                self._audit(BUNDLE_REFUSED, details)
            except Exception:  # the refusal stands; the log says the audit entry is missing
                log.exception("could not write %s to the audit log: %s", BUNDLE_REFUSED, details)
            raise

    def _app(self, run: Any, fab: Any) -> Handler:
        """The bundle's ClientApp, installed and loaded once per bundle hash."""
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn

        if fab.hash_str not in self._apps:
            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self._apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
        return self._apps[fab.hash_str]

    def run_task(self, token: str) -> None:
        """Run one task end to end; every failure becomes an error reply, never a crash."""
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        client = _runtime_client(
            self._address,
            [
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        status, details = SubStatus.FAILED, "the task failed"
        marks = [time.monotonic()]
        try:
            message, context, run, fab = pull_task_input(client)
            marks.append(time.monotonic())
            self.check_bundle(run, fab)
            reply = chain(self._app(run, fab), [self._guard])(message, context)
            marks.append(time.monotonic())
            status, details = SubStatus.COMPLETED, ""
        except UntrustedBundleError as exc:
            details = f"the site refused the app bundle: {exc}"[:400]
            if message is not None:
                error = Error(code=ERROR_CODE_BUNDLE_REFUSED, reason=details)
                reply = Message(error, reply_to=message)
        except Exception as exc:
            log.exception("a ClientApp task failed")
            details = f"{type(exc).__name__}: {exc}"[:400]
            if message is not None:
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details)
                reply = Message(error, reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception:
                log.exception("could not push the reply to the SuperNode")
            push_task_output(client=client, context=context, sub_status=status, details=details)
            marks.append(time.monotonic())
            heartbeat.stop()
            client.close()
            self.tasks_run += 1
            phases = ", ".join(f"{b - a:.2f}" for a, b in itertools.pairwise(marks))
            log.info("task phases (pull, app, push) in s: %s", phases)

    def serve(self, stop: threading.Event, *, poll_interval_s: float = POLL_INTERVAL_S) -> None:
        """Acquire and run tasks until `stop` is set; a SuperNode that is away (restarting)
        is waited for, not given up on."""
        while not stop.is_set():
            try:
                token = self.acquire()
            except Exception as exc:  # the SuperNode restarts: keep asking
                log.warning("the SuperNode's Runtime API does not answer (%s); retrying", exc)
                stop.wait(1.0)
                continue
            if token is None:
                stop.wait(poll_interval_s)
            else:
                started = time.monotonic()
                self.run_task(token)
                log.info("ran a ClientApp task in %.2f s", time.monotonic() - started)
        self._client.close()


def _site_bundles_and_audit(site_toml: Path) -> tuple[BundleGate | None, AuditAppend]:
    """The site's bundle gate (None: unsigned allowed, warned) and its audit log."""
    from medfed.client.bundle_check import bundle_gate_of
    from medfed.client.config import load_site_config
    from medfed.client.records import site_audit_log
    from medfed.privacy.signing import SigningKey

    config = load_site_config(site_toml)
    gate = bundle_gate_of(config)
    audit = site_audit_log(config, SigningKey.load(config.signing_key_path))
    if gate is not None:
        log.info("running only app bundles signed by: %s", ", ".join(gate.trusted_ids))
    return gate, audit.append


def main(argv: list[str] | None = None) -> int:
    """`python -m client.executor --runtime 127.0.0.1:PORT --secret-file FILE
    --site-config SITE_TOML`."""
    parser = argparse.ArgumentParser(prog="python -m client.executor")
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
    from medfed.privacy.errors import PrivacyError

    try:
        bundles, audit = _site_bundles_and_audit(args.site_config)
    except (ClientError, PrivacyError) as exc:
        log.error("the executor cannot start: %s", exc)
        return 2
    secret = args.secret_file.read_bytes() if args.secret_file else None
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    WarmExecutor(args.runtime, secret, GUARD, bundles=bundles, audit=audit).serve(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
