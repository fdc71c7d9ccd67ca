"""The warm executor asks its SuperNode for a task fast while busy (a task within the busy
window); idle, it asks only when the SuperNode's message mark moves, or seldom: a daemon
that idles all year must not ask twenty times a second (the whole path, measured on real
site daemons: `medfed bench idle`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from medfed.client.egress import Handler
from medfed.client.executor import WarmExecutor
from medfed.common.pace import MessageMark, Pace


def _pass_through(app: Handler) -> Handler:
    return app


@contextmanager
def _serving(
    monkeypatch: pytest.MonkeyPatch, mark: MessageMark, pace: Pace, tasks: list[float]
) -> Iterator[tuple[list[float], list[str]]]:
    """An executor whose SuperNode hands out a task at each time in `tasks` (seconds from
    now, the first asked for at or after it gets it); yields its asks and the tasks run."""
    executor = WarmExecutor("127.0.0.1:1", None, _pass_through, bundles=None, audit=print)
    asks: list[float] = []
    ran: list[str] = []
    started = time.monotonic()

    def acquire() -> str | None:
        now = time.monotonic()
        asks.append(now - started)
        if tasks and now - started >= tasks[0]:
            tasks.pop(0)
            return "token"
        return None

    monkeypatch.setattr(executor, "acquire", acquire)
    monkeypatch.setattr(executor, "run_task", ran.append)
    stop = threading.Event()
    thread = threading.Thread(
        target=executor.serve, args=(stop,), kwargs={"pace": pace, "mark": mark}
    )
    thread.start()
    try:
        yield asks, ran
    finally:
        stop.set()
        thread.join(timeout=5)


def test_the_executor_asks_fast_after_a_task_and_seldom_once_idle(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pace = Pace(busy_s=0.01, idle_s=0.25, busy_window_s=0.5)
    with _serving(monkeypatch, MessageMark(tmp_path), pace, [0.0]) as (asks, ran):
        time.sleep(1.5)
    assert ran == ["token"]
    busy = [t for t in asks if t < 0.4]
    idle = [t for t in asks if t > 0.7]
    assert len(busy) >= 10  # every 10 ms for half a second after the task
    assert 2 <= len(idle) <= 4  # only its fallback asks, every 250 ms, over the last 0.8 s


def test_an_idle_executor_asks_as_soon_as_the_supernode_marks_a_message(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mark = MessageMark(tmp_path)
    pace = Pace(busy_s=0.01, idle_s=30.0, busy_window_s=0.2)
    with _serving(monkeypatch, mark, pace, [0.0, 1.0]) as (asks, ran):
        time.sleep(0.9)
        assert len([t for t in asks if t > 0.4]) == 0  # idle, nothing marked: no asks
        time.sleep(0.2)
        mark.touch()  # the SuperNode pulled a message: its task is there now
        marked = time.monotonic()
        while len(ran) < 2 and time.monotonic() - marked < 5:
            time.sleep(0.01)
        picked_up_s = time.monotonic() - marked
    assert ran == ["token", "token"]
    assert picked_up_s < 0.6  # the mark is looked at every 0.25 s, not the 30 s fallback


def test_a_mark_that_cannot_be_written_or_read_does_not_stop_anything(tmp_path: Path) -> None:
    mark = MessageMark(tmp_path / "missing")
    mark.touch()
    assert mark.stamp() == 0
    MessageMark(tmp_path).touch()
    assert MessageMark(tmp_path).stamp() > 0
