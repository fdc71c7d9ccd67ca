"""The coordinator's Flower calls, retried with backoff when the SuperLink is busy.

With many sites, Flower 1.42's SuperLink answers some Runtime API calls with HTTP 500
while its SQLite state is locked (`sqlite3.OperationalError: database is locked` in its
log); Flower's own HTTP retry covers 502, 503 and 504 only, so one such answer ended a
13-site run in round 2. `RetryingGrid` wraps the run's `Grid` (as Flower's strategies
are wrapped, never subclassed per use) and retries `get_node_ids`, `push_messages` and
`pull_messages` on transient failures: HTTP 500, 502, 503, 504, 429, a dropped
connection, and a locked SQLite database (the in-process grids). A retried push sends
the same messages again (their ids are content digests, so the SuperLink sees the same
messages); a retried pull asks for the same ids (a reply is confirmed only after it was
read whole). Anything else, or a failure that outlasts `max_time_s`, propagates.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import httpx
from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # Flower's own type of get_nodes
from flwr.serverapp import Grid
from flwr.supercore.run import Run

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
"""HTTP statuses of a SuperLink that is busy or restarting, not of a wrong request."""


@dataclass(frozen=True)
class Backoff:
    """Waits between tries: `initial_s`, doubling up to `cap_s`, for at most `max_time_s`."""

    initial_s: float = 0.2
    cap_s: float = 5.0
    max_time_s: float = 120.0


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is a busy or restarting SuperLink (worth another try)."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in TRANSIENT_STATUS
    if isinstance(exc, httpx.TransportError):
        return not any(word in str(exc).lower() for word in ("certificate", "ssl", "tls"))
    if isinstance(exc, sqlite3.OperationalError):
        return "locked" in str(exc) or "busy" in str(exc)
    return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code} from {exc.request.url.path}"
    return f"{type(exc).__name__}: {exc}"


class RetryingGrid(Grid):
    """A `Grid` whose calls to the SuperLink are retried on transient failures."""

    def __init__(
        self,
        grid: Grid,
        *,
        backoff: Backoff = Backoff(),
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = grid
        self.backoff = backoff
        self._sleep = sleep
        self._clock = clock
        self.retries = 0
        """How many calls were retried so far (the run reports it)."""

    def _call(self, what: str, action: Callable[[], T]) -> T:
        started = self._clock()
        wait = self.backoff.initial_s
        tries = 0
        while True:
            tries += 1
            try:
                return action()
            except Exception as exc:
                elapsed = self._clock() - started
                if not is_transient(exc) or elapsed + wait > self.backoff.max_time_s:
                    if tries > 1:
                        log.error("%s failed %d times over %.1f s; giving up", what, tries, elapsed)
                    raise
                self.retries += 1
                log.warning(
                    "%s: the SuperLink is busy (%s); try %d again in %.2f s",
                    what, _describe(exc), tries + 1, wait,
                )  # fmt: skip
                self._sleep(wait)
                wait = min(wait * 2, self.backoff.cap_s)

    def get_node_ids(self) -> Iterable[int]:
        return self._call("get_node_ids", lambda: list(self.inner.get_node_ids()))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        batch = list(messages)
        return self._call("push_messages", lambda: list(self.inner.push_messages(batch)))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        ids = list(message_ids)
        return self._call("pull_messages", lambda: list(self.inner.pull_messages(ids)))

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._call("get_nodes", lambda: list(self.inner.get_nodes()))

    # The rest is the wrapped grid's, unchanged.
    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)


def retrying(grid: Grid, *, backoff: Backoff = Backoff()) -> Grid:
    """`grid` wrapped in `RetryingGrid` (once: an already wrapped grid is returned)."""
    return grid if isinstance(grid, RetryingGrid) else RetryingGrid(grid, backoff=backoff)
