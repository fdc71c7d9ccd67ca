"""How long a poller waits before asking again: fast while busy, quiet when idle.

A site daemon runs all year and works minutes a day. Its SuperNode asks the SuperLink for
work, and its executor asks the SuperNode for a task; each ask costs CPU on both ends.
`Pace` keeps the short wait (`busy_s`) for `busy_window_s` after the last work seen (a
round's next message comes within seconds of its last), then waits `idle_s`: the longest
a new run's first message sits unseen.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

BUSY_WINDOW_S = 60.0
"""How long after its last work a poller stays fast: longer than any pause between one
run's messages (aggregation, a secure round's exchanges), short against a day of idling."""


class Pace:
    """The wait before a poller's next ask."""

    def __init__(
        self,
        *,
        busy_s: float,
        idle_s: float,
        busy_window_s: float = BUSY_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < busy_s <= idle_s:
            raise ValueError(f"need 0 < busy_s <= idle_s, got {busy_s} and {idle_s}")
        self.busy_s = busy_s
        self.idle_s = idle_s
        self.busy_window_s = busy_window_s
        self._clock = clock
        self._last_work = clock()

    def worked(self) -> None:
        """Work was seen just now: stay fast for the next `busy_window_s`."""
        self._last_work = self._clock()

    @property
    def idle(self) -> bool:
        return self._clock() - self._last_work > self.busy_window_s

    def wait_s(self) -> float:
        """The wait before the next ask."""
        return self.idle_s if self.idle else self.busy_s


MARK_NAME = "medfed-message-arrived"
"""The file in the site's `FLWR_HOME` its SuperNode touches at each message it pulls."""


def flwr_home() -> Path:
    """This process's `FLWR_HOME` (Flower's default: ~/.flwr)."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


class MessageMark:
    """A file the SuperNode touches at each message it pulls, and its executor watches: an
    idle executor looks at the file's time (no call to anyone) instead of asking the
    SuperNode for a task several times a second."""

    def __init__(self, folder: Path | None = None) -> None:
        self.path = (folder or flwr_home()) / MARK_NAME

    def touch(self) -> None:
        """A message arrived (never raises: a mark that cannot be written only slows the
        executor down to its fallback polls)."""
        with contextlib.suppress(OSError):
            self.path.touch()

    def stamp(self) -> int:
        """When the last message arrived (ns; 0 if none yet, or unreadable)."""
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return 0
