"""Every change medfed makes to Flower 1.42's behaviour, in one place.

- Object pulls (`flwr.supercore.inflatable.inflatable_utils.pull_objects`): a part of a
  message still in transit is asked for again after 1 s, doubling to 10 s. On a round of
  a few seconds that one backoff was most of the round (replies pushed 5 to 13 s before
  the coordinator saw them, medfed demo logs of 2026-11-29). `shorten_object_pull_backoff`
  caps those waits, in the ServerApp's process and in the site's SuperNode.
- The SuperNode's polls (`flwr.supernode.start_client_internal` sleeps 3 s between asks
  for work, 0.5 s between checks for a finished reply): `run_supernode` paces them
  (`medfed.common.pace`). For a minute after its last message it asks every
  `poll_interval_s` (and checks for a reply as often); idle longer, every
  `idle_poll_interval_s`, so a daemon that runs all year costs little while a new run's
  first message still waits at most that long. Each message it pulls touches a file in
  its `FLWR_HOME` (`MessageMark`) that tells the site's idle executor, which then does not
  ask it for tasks while none can be there.
- The SuperNode's heartbeat: it announces Flower's shortest interval (10 s) instead of
  its default (30 s). The SuperLink holds a SuperNode online for two intervals after its
  last heartbeat and refuses to activate it again meanwhile, so a site whose SuperNode
  was killed could not rejoin for up to a minute; with 10 s it is back within about 20 s.

Each patch only ever shortens a wait; everything else (TLS, SuperNode authentication,
the protocol) is Flower's own code. Importing this module checks the flwr version.
"""

from __future__ import annotations

import functools
import importlib
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from medfed.common.pace import MessageMark, Pace
from medfed.flower.version import require_supported_flwr

require_supported_flwr()

INITIAL_BACKOFF_S = 0.05
"""First wait before asking again for a part in transit (Flower: 1 s)."""
BACKOFF_CAP_S = 0.5
"""Longest wait between asks (Flower: 10 s)."""


def shorten_object_pull_backoff(
    *, initial_s: float = INITIAL_BACKOFF_S, cap_s: float = BACKOFF_CAP_S
) -> dict[str, float]:
    """Cap the default backoff of Flower's object pulls in this process; return the
    defaults now in force. Only ever shortens: a smaller default already set stays."""
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    defaults = pull_objects.__kwdefaults__ or {}
    defaults["initial_backoff"] = min(float(defaults.get("initial_backoff", 1.0)), initial_s)
    defaults["backoff_cap"] = min(float(defaults.get("backoff_cap", 10.0)), cap_s)
    pull_objects.__kwdefaults__ = defaults
    return {"initial_backoff": defaults["initial_backoff"], "backoff_cap": defaults["backoff_cap"]}


IDLE_SLEEP_S = 3.0
"""The one sleep of `start_client_internal` that waits for work (every other is shorter)."""


class PacedSleep(ModuleType):
    """The `time` module, with `sleep` paced: the wait for work lasts `pace.wait_s()`,
    every other wait at most `pace.busy_s`."""

    def __init__(self, pace: Pace) -> None:
        super().__init__("time")
        self.pace = pace

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds >= IDLE_SLEEP_S:
            time.sleep(self.pace.wait_s())
        else:
            time.sleep(min(seconds, self.pace.busy_s))


def paced_pulls(pull: Callable[..., Any], pace: Pace, mark: MessageMark) -> Callable[..., Any]:
    """`start_client_internal._pull_and_store_message`, telling `pace` (this process's
    polls) and `mark` (the executor's) of every message."""

    @functools.wraps(pull)
    def pull_and_note(*args: Any, **kwargs: Any) -> Any:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            pace.worked()
            mark.touch()
        return run_id

    return pull_and_note


def patch_supernode(busy_s: float, idle_s: float) -> Pace:
    """Pace the SuperNode's polls (`busy_s` for a minute after a message, then `idle_s`),
    cap its object-pull backoffs at `busy_s` and make it announce Flower's shortest
    heartbeat interval (in this process). Returns the pace."""
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as fleet
    import flwr.supernode.start_client_internal as internal
    from flwr.common.constant import HEARTBEAT_MIN_INTERVAL

    pace = Pace(busy_s=busy_s, idle_s=idle_s)
    internal.time = PacedSleep(pace)  # type: ignore[attr-defined]
    pulls = paced_pulls(internal._pull_and_store_message, pace, MessageMark())
    internal._pull_and_store_message = pulls
    # What the SuperNode announces, and how often it then sends (every ~4 s for 10 s).
    fleet.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_MIN_INTERVAL  # type: ignore[attr-defined]
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_MIN_INTERVAL  # type: ignore[attr-defined]
    shorten_object_pull_backoff(initial_s=busy_s / 4, cap_s=busy_s)
    return pace


def run_supernode(busy_s: float, idle_s: float, args: Sequence[str]) -> None:
    """Run Flower's `flower-supernode ARGS` in this process, patched (`patch_supernode`)."""
    # The module (its package re-exports the function under the same name).
    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")
    patch_supernode(busy_s, idle_s)
    sys.argv = ["flower-supernode", *args]
    cli.flower_supernode()
