"""The site API over gRPC on a Unix socket: the worker's server and the ClientApp's client.

One unary method, `/medfed.SiteWorker/Call`, carries `client.codec` frames both ways
(grpcio's generic handlers with bytes in and out: no protoc, no pickle). The socket
lives in the site's state dir and is created with mode 0600, so only the site's own
user can reach the worker. This module imports no torch: the thin ClientApp uses it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import grpc

from medfed.client import codec
from medfed.client.codec import CodecError, Frame
from medfed.client.errors import (
    BudgetRefusal,
    ClientError,
    OutsideWindow,
    RequestError,
    SiteRefusal,
    WorkerFailed,
    WorkerUnavailable,
    public_reason,
)
from medfed.client.protocol import (
    AskReply,
    AskRequest,
    EgressRules,
    EvaluateReply,
    EvaluateRequest,
    QueryReply,
    QueryRequest,
    SecAggReply,
    SecAggRequest,
    TrainReply,
    TrainRequest,
)

if TYPE_CHECKING:  # both import torch-heavy modules; this module must stay light
    from medfed.client.config import SiteConfig
    from medfed.client.site_api import SiteApi

log = logging.getLogger(__name__)

METHOD: Final = "/medfed.SiteWorker/Call"
SOCKET_NAME: Final = "worker.sock"
MAX_SOCKET_PATH: Final = 100
"""Unix socket paths are limited to about 107 bytes; leave room for the `unix:` prefix."""
DEFAULT_TIMEOUT_S: Final = 3600.0
_CHANNEL_OPTIONS: Final = [
    ("grpc.max_send_message_length", codec.MAX_FRAME_BYTES),
    ("grpc.max_receive_message_length", codec.MAX_FRAME_BYTES),
]
_REFUSALS: Final[dict[str, type[ClientError]]] = {
    "refused": SiteRefusal,
    "budget": BudgetRefusal,
    "window": OutsideWindow,
    "request": RequestError,
}


def worker_socket_path(config: SiteConfig) -> Path:
    """Where the site's worker listens: `<state_dir>/worker.sock`."""
    return config.state_dir / SOCKET_NAME


def _refusal_kind(error: ClientError) -> str:
    for kind in ("window", "budget", "refused", "request"):
        if isinstance(error, _REFUSALS[kind]):
            return kind
    return "refused"


def dispatch(api: SiteApi, data: bytes) -> bytes:
    """Decode one request frame, call `api`, and encode its reply or refusal.

    Declined requests (`ClientError`, and the privacy and site errors `refusals`
    names) come back as a `refusal` frame; anything unexpected as an `error` frame,
    logged here with its traceback, so the worker keeps serving.
    """
    from medfed.privacy.errors import PrivacyError
    from medfed.sites.errors import SiteError

    try:
        frame = codec.decode_frame(data)
        handlers: dict[str, Callable[[Frame], object]] = {
            "train": lambda f: api.train(codec.train_request(f)),
            "evaluate": lambda f: api.evaluate(codec.evaluate_request(f)),
            "query": lambda f: api.query(codec.query_request(f)),
            "secagg": lambda f: api.secagg(codec.secagg_request(f)),
            "ask": lambda f: api.ask(codec.ask_request(f)),
            "rules": lambda f: api.egress_rules(),
            "audit": lambda f: api.audit(*codec.audit_request(f)),
            "ping": lambda f: None,
        }
        if frame.kind not in handlers:
            raise CodecError(f"unknown request kind {frame.kind!r}")
        reply = handlers[frame.kind](frame)
        return codec.encode_frame(Frame("pong") if reply is None else codec.to_frame(reply))
    except CodecError as exc:
        return codec.encode_frame(Frame("refusal", {"kind": "request", "reason": str(exc)}))
    except ClientError as exc:
        _log_refusal(exc)
        return codec.encode_frame(
            Frame("refusal", {"kind": _refusal_kind(exc), "reason": public_reason(exc)})
        )
    except (PrivacyError, SiteError, ValueError) as exc:
        _log_refusal(exc)
        return codec.encode_frame(
            Frame("refusal", {"kind": "refused", "reason": public_reason(exc)})
        )
    except Exception as exc:  # the worker must answer and keep serving
        log.exception("the site worker failed on a request")
        return codec.encode_frame(Frame("error", {"reason": public_reason(exc)}))


def _log_refusal(error: Exception) -> None:
    """The whole reason, for the site's own log: only its public text leaves the worker
    (the executor, which runs the coordinator's app, never sees data values or paths)."""
    log.warning("the site refuses a request: %s", error)


def _identity(data: bytes) -> bytes:
    return data


def serve(api: SiteApi, socket_path: Path) -> grpc.Server:
    """Start serving `api` on `socket_path` (mode 0600, a stale file replaced); return the
    running server. One request at a time: the trainer is not built for concurrency."""
    if len(str(socket_path)) > MAX_SOCKET_PATH:
        raise WorkerUnavailable(
            f"{socket_path}: the worker's socket path is longer than {MAX_SOCKET_PATH}"
            " characters (a Unix socket limit); choose a shorter state_dir in site.toml"
        )
    socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    handler = grpc.method_handlers_generic_handler(
        "medfed.SiteWorker",
        {
            "Call": grpc.unary_unary_rpc_method_handler(
                lambda request, context: dispatch(api, request),
                request_deserializer=_identity,
                response_serializer=_identity,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=_CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    previous = os.umask(0o177)  # the socket is born owner-only: no window for others
    try:
        server.add_insecure_port(f"unix:{socket_path}")
        server.start()
    finally:
        os.umask(previous)
    os.chmod(socket_path, 0o600)
    return server


class WorkerClient:
    """The site API over the worker's socket; raises what the worker would have raised."""

    def __init__(
        self, socket_path: Path, *, timeout_s: float = DEFAULT_TIMEOUT_S, wait_s: float = 0.0
    ) -> None:
        """`wait_s`: how long a request waits for a worker that is not up (restarting)
        before it is refused. A request the worker took and then lost (it crashed
        mid-way) is never sent again: it may have been half done."""
        self._socket_path = socket_path
        self._timeout_s = timeout_s
        self._wait_s = wait_s

    def _await_worker(self) -> None:
        deadline = time.monotonic() + self._wait_s
        while time.monotonic() < deadline and not self.ping(timeout_s=1.0):
            time.sleep(0.2)

    def _call(self, frame: Frame, *, timeout_s: float | None = None) -> Frame:
        if self._wait_s > 0 and frame.kind != "ping":
            self._await_worker()
        if not self._socket_path.exists():
            raise WorkerUnavailable(
                f"the site worker is not running (no socket at {self._socket_path});"
                " start the site with `medfed site start`"
            )
        with grpc.insecure_channel(f"unix:{self._socket_path}", options=_CHANNEL_OPTIONS) as ch:
            call = ch.unary_unary(
                METHOD, request_serializer=_identity, response_deserializer=_identity
            )
            try:
                data = call(codec.encode_frame(frame), timeout=timeout_s or self._timeout_s)
            except grpc.RpcError as exc:
                raise WorkerUnavailable(
                    f"the site worker at {self._socket_path} did not answer"
                    f" ({exc.code().name}: {exc.details()})"
                ) from exc
        reply = codec.decode_frame(data)
        if reply.kind == "refusal":
            kind = str(reply.fields.get("kind"))
            raise _REFUSALS.get(kind, SiteRefusal)(str(reply.fields.get("reason", "")))
        if reply.kind == "error":
            raise WorkerFailed(f"the site worker failed: {reply.fields.get('reason', '')}")
        return reply

    def _expect(self, reply: Frame, kind: str) -> Frame:
        if reply.kind != kind:
            raise CodecError(f"the worker answered {reply.kind!r} where {kind!r} was expected")
        return reply

    def ping(self, *, timeout_s: float = 2.0) -> bool:
        """True if the worker answers within `timeout_s`."""
        try:
            return self._call(Frame("ping"), timeout_s=timeout_s).kind == "pong"
        except ClientError:
            return False

    def train(self, request: TrainRequest) -> TrainReply:
        return codec.train_reply(self._expect(self._call(codec.to_frame(request)), "train-reply"))

    def evaluate(self, request: EvaluateRequest) -> EvaluateReply:
        reply = self._call(codec.to_frame(request))
        return codec.evaluate_reply(self._expect(reply, "evaluate-reply"))

    def query(self, request: QueryRequest) -> QueryReply:
        return codec.query_reply(self._expect(self._call(codec.to_frame(request)), "query-reply"))

    def secagg(self, request: SecAggRequest) -> SecAggReply:
        reply = self._call(codec.to_frame(request))
        return codec.secagg_reply(self._expect(reply, "secagg-reply"))

    def ask(self, request: AskRequest) -> AskReply:
        return codec.ask_reply(self._expect(self._call(codec.to_frame(request)), "ask-reply"))

    def egress_rules(self) -> EgressRules:
        return codec.egress_rules(self._expect(self._call(Frame("rules")), "rules-reply"))

    def audit(self, event: str, details: Mapping[str, Any]) -> None:
        self._expect(self._call(codec.audit_frame(event, details), timeout_s=30.0), "pong")
