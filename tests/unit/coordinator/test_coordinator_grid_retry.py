"""First time right: a busy SuperLink (HTTP 5xx, a locked database) is retried with
backoff and the run goes on; cold sites are waited for up to the round's deadline; a
site that does not answer is named, with why."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
from flwr.app import Message, MessageType

from medfed.coordinator.errors import RoundFailedError
from medfed.coordinator.grid_retry import Backoff, RetryingGrid, is_transient
from medfed.coordinator.scheduler import PlannedSite, RoundPlan
from medfed.coordinator.secure_rounds import run_secure_round
from medfed.coordinator.site_status import query_statuses
from medfed.coordinator.validate import Sender
from medfed.privacy.signing import SigningKey
from tests.fakesites import FakeGrid, consortium, run, study

pytestmark = pytest.mark.usefixtures("server_identity")


def _http_error(status: int, path: str = "/v1/runtime/pull-messages") -> httpx.HTTPStatusError:
    request = httpx.Request("POST", f"https://127.0.0.1:9093{path}")
    response = httpx.Response(status, request=request, text="database is locked")
    return httpx.HTTPStatusError(f"Server error '{status}'", request=request, response=response)


@dataclass
class BusyGrid(FakeGrid):
    """A FakeGrid whose SuperLink fails some calls: `failures` maps a method name to the
    errors its next calls raise, one per call, before it answers normally."""

    failures: dict[str, list[BaseException]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def _maybe_fail(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        queue = self.failures.get(name, [])
        if queue:
            raise queue.pop(0)

    def get_node_ids(self) -> Iterable[int]:
        self._maybe_fail("get_node_ids")
        return super().get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._maybe_fail("push_messages")
        return super().push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._maybe_fail("pull_messages")
        return super().pull_messages(message_ids)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (_http_error(500), True),
        (_http_error(503), True),
        (_http_error(400), False),
        (_http_error(403), False),
        (sqlite3.OperationalError("database is locked"), True),
        (sqlite3.OperationalError("no such table: run"), False),
        (httpx.ConnectError("connection refused"), True),
        (httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED]"), False),
        (ValueError("bad"), False),
    ],
)
def test_what_counts_as_a_busy_superlink(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_a_5xx_is_retried_with_doubling_backoff_until_it_answers() -> None:
    inner = BusyGrid(consortium(), failures={"get_node_ids": [_http_error(500)] * 3})
    sleeps: list[float] = []
    grid = RetryingGrid(inner, backoff=Backoff(initial_s=0.1, cap_s=0.3), sleep=sleeps.append)  # type: ignore[arg-type]

    assert sorted(grid.get_node_ids()) == [9001, 9002, 9003]
    assert sleeps == [0.1, 0.2, 0.3]
    assert grid.retries == 3 and inner.calls["get_node_ids"] == 4


def test_a_request_error_is_not_retried() -> None:
    inner = BusyGrid(consortium(), failures={"pull_messages": [_http_error(400)]})
    grid = RetryingGrid(inner, sleep=lambda s: pytest.fail("slept"))  # type: ignore[arg-type]
    with pytest.raises(httpx.HTTPStatusError):
        grid.pull_messages(["x"])
    assert inner.calls["pull_messages"] == 1


def test_a_superlink_busy_past_the_limit_gives_up_with_its_error() -> None:
    now = [0.0]
    inner = BusyGrid(consortium(), failures={"push_messages": [_http_error(500)] * 100})
    grid = RetryingGrid(
        inner,  # type: ignore[arg-type]
        backoff=Backoff(initial_s=1.0, cap_s=4.0, max_time_s=10.0),
        sleep=lambda s: now.__setitem__(0, now[0] + s),
        clock=lambda: now[0],
    )
    with pytest.raises(httpx.HTTPStatusError):
        grid.push_messages([])
    assert inner.calls["push_messages"] == 4  # waits 1 + 2 + 4 = 7 s; another 4 s is past 10


def test_a_run_goes_on_through_a_busy_superlink() -> None:
    failures: dict[str, list[BaseException]] = {
        "pull_messages": [_http_error(500), sqlite3.OperationalError("database is locked")] * 3,
        "push_messages": [_http_error(502)],
        "get_node_ids": [_http_error(503)],
    }
    busy = BusyGrid(consortium(), failures=failures)
    results = run(busy, study(None, num_server_rounds=2))
    assert results.status == "completed" and results.rounds_completed == 2
    assert all(not queue for queue in failures.values())  # every failure was met, and survived

    # ... to the same model as a run over a SuperLink that never failed
    calm = FakeGrid(consortium())
    run(calm, study(None, num_server_rounds=2))
    for name, array in calm.final_model().items():
        np.testing.assert_array_equal(busy.final_model()[name], array)


@dataclass
class ColdGrid(FakeGrid):
    """A FakeGrid where each site in `cold_s` answers its first query only that many
    seconds after it was sent (a site whose worker is still loading)."""

    cold_s: dict[int, float] = field(default_factory=dict)
    _held: dict[str, tuple[float, Message]] = field(default_factory=dict)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        batch = list(messages)
        ids = list(super().push_messages(batch))
        for message_id, message in zip(ids, batch, strict=True):
            node = message.metadata.dst_node_id
            if message.metadata.message_type == MessageType.QUERY and node in self.cold_s:
                reply = self._replies.pop(message_id)
                self._held[message_id] = (time.monotonic() + self.cold_s.pop(node), reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        ids = list(message_ids)
        for message_id in ids:
            due, reply = self._held.get(message_id, (None, None))
            if due is not None and reply is not None and time.monotonic() >= due:
                self._replies[message_id] = reply
                del self._held[message_id]
        return super().pull_messages(ids)


def test_a_cold_site_is_waited_for_up_to_the_round_deadline() -> None:
    grid = ColdGrid(consortium(), cold_s={9002: 0.6})
    settings = study(None, round_timeout_s=3.0)
    known: dict[int, str] = {}
    started = time.monotonic()
    statuses = query_statuses(grid, [9001, 9002, 9003], settings, "run", 1, known, set())  # type: ignore[arg-type]

    # hospital-1's software answers queries with an error; the cold hospital-2 is known
    assert [(s.site_id, s.known) for s in statuses] == [
        ("node-9001", False), ("hospital-2", True), ("hospital-3", True),
    ]  # fmt: skip
    assert statuses[0].unknown_reason == (
        "answered the status query with an error: no query function"
    )
    assert time.monotonic() - started < 3.0  # it stopped waiting once all had answered


def test_a_site_that_never_answers_is_named_with_why() -> None:
    grid = ColdGrid(consortium(), cold_s={9002: 60.0})
    settings = study(None, round_timeout_s=0.5)
    statuses = query_statuses(grid, [9001, 9002, 9003], settings, "run", 1, {}, set())  # type: ignore[arg-type]

    (silent,) = [s for s in statuses if not s.known and s.node_id == 9002]
    assert silent.unknown_reason == "did not answer the status query within 0.5 s"


def test_a_secure_round_without_known_sites_names_them_and_why() -> None:
    plan = RoundPlan(
        action="train",
        planned=(
            PlannedSite(9001, "hospital-1", 6, 0.5, None),
            PlannedSite(9002, "node-9002", 6, 0.5, None),
        ),
    )
    with pytest.raises(RoundFailedError) as failed:
        run_secure_round(
            FakeGrid(consortium()),  # type: ignore[arg-type]
            study(None, secure_aggregation=True),
            run_id="run",
            round_number=1,
            global_arrays={"w": np.zeros(2, np.float32)},
            model_sha256="0" * 64,
            plan=plan,
            senders={9001: Sender("hospital-1", 120)},
            contents={},
            signer=SigningKey.generate(),
            site_keys=None,
            unknown_reasons={9002: "node-9002 did not answer the status query within 600 s"},
        )
    assert str(failed.value) == (
        "round 1: secure aggregation needs at least 2 sites of known identity; known:"
        " hospital-1; not known: node-9002 did not answer the status query within 600 s"
    )
