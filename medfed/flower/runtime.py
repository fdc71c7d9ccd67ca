# ruff: noqa: E402  (the flwr version is checked before any flwr internal is imported)
"""A SuperNode's Runtime API as medfed's warm executor uses it (Flower 1.42 internals).

With `flower-supernode --isolation process`, the SuperNode leaves ClientApp tasks to an
executor that acquires each one from its Runtime API with a token (Flower's SuperExec
does that, then starts `flwr-clientapp --token`). medfed's warm executor
(`medfed.client.executor`) runs them in-process instead, through this module: acquire a
token, pull the task's message, context, run and bundle (`flwr.supernode.runtime.
run_clientapp`'s steps, with shorter backoffs), install and load the bundle's ClientApp,
push the reply and the task's status. Importing this module checks the flwr version.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from flwr.app import Context, Message

from medfed.flower.version import require_supported_flwr

require_supported_flwr()

# The imports below are flwr 1.42 internals: this module is where they may appear.
from flwr.cli.install import install_from_fab
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    pull_and_inflate_object_from_tree,
)
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

__all__ = [
    "CLIENT_APP_RAISED_EXCEPTION",
    "Fab",
    "Run",
    "RuntimeTasks",
    "TaskIdentity",
    "TaskInput",
    "TaskSession",
    "load_client_app",
]

log = logging.getLogger(__name__)

CLIENT_APP_RAISED_EXCEPTION: Final[int] = int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
"""Flower's error code for a ClientApp that raised."""
OBJECT_BACKOFF_S: Final = (0.05, 0.5)
"""First and largest wait before asking again for a part of the message the SuperNode is
still fetching (Flower's `flwr-clientapp`: 1 s doubling to 10 s, most of a short round)."""


def _runtime_client(address: str, interceptors: list[Any]) -> Any:
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # the Runtime API listens on 127.0.0.1 only
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


class RuntimeTasks:
    """Acquires ClientApp task tokens from one SuperNode's Runtime API, as its SuperExec.

    The SuperNode's AcquireTask is protected by `secret` (HMAC), which only the site's
    user can read, so no other local process can take the site's tasks.
    """

    def __init__(self, address: str, secret: bytes | None) -> None:
        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if secret:
            interceptors.append(
                SuperExecAuthHttpInterceptor(
                    master_secret=secret,
                    protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}),
                )
            )
        self.address = address
        self._client = _runtime_client(address, interceptors)

    def acquire(self) -> str | None:
        """A token for the next ClientApp task, or None if there is none now."""
        response = self._client.AcquireTask(
            AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[])
        )
        if response.HasField("task") and response.token:
            return str(response.token)
        return None

    def close(self) -> None:
        self._client.close()


@dataclass(frozen=True)
class TaskInput:
    """One task's instruction, its context, and the run and app bundle it belongs to."""

    message: Message
    context: Context
    run: Run
    fab: Fab


class TaskSession:
    """One acquired task: pull its input, push its reply and status; beats its heartbeat
    while open. Use as a context manager."""

    def __init__(self, address: str, token: str) -> None:
        self._client = _runtime_client(
            address,
            [
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
        )
        self._heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(self._client))

    def __enter__(self) -> TaskSession:
        self._heartbeat.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._heartbeat.stop()
        self._client.close()

    def pull_input(self) -> TaskInput:
        """The task's message, context, run and bundle: Flower 1.42's `pull_task_input`
        (flwr.supernode.runtime.run_clientapp) with shorter backoffs for missing objects."""
        client = self._client
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
        return TaskInput(message, context, run_from_proto(task.run), fab_from_proto(task.fab))

    def push_reply(self, reply: Message, context: Context) -> None:
        push_message(self._client, reply, context)

    def finish(self, context: Context | None, *, completed: bool, details: str) -> None:
        """Tell the SuperNode the task completed, or failed with `details`."""
        status = SubStatus.COMPLETED if completed else SubStatus.FAILED
        push_task_output(client=self._client, context=context, sub_status=status, details=details)


def load_client_app(run: Run, fab: Fab) -> Any:
    """The bundle's ClientApp: Flower installs the bundle under `$FLWR_HOME` and loads the
    app its pyproject names (as `flwr-clientapp` does)."""
    install_from_fab(fab.content, skip_prompt=True)
    load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    return load(run.fab_id, run.fab_version, fab.hash_str)
