"""Every change medfed makes to Flower 1.42's behaviour, in one place.

- Object pulls (`flwr.supercore.inflatable.inflatable_utils.pull_objects`): a part of a
  message still in transit is asked for again after 1 s, doubling to 10 s. On a round of
  a few seconds that one backoff was most of the round (replies pushed 5 to 13 s before
  the coordinator saw them, medfed demo logs of 2026-11-29). `shorten_object_pull_backoff`
  caps those waits, in the ServerApp's process and in the site's SuperNode.
- The SuperNode's idle polls (`flwr.supernode.start_client_internal` sleeps 3 s between
  asks for work, 0.5 s between checks for a finished reply): `run_supernode` caps every
  sleep of that module at the site's `poll_interval_s`.
- The SuperNode's heartbeat: it announces Flower's shortest interval (10 s) instead of
  its default (30 s). The SuperLink holds a SuperNode online for two intervals after its
  last heartbeat and refuses to activate it again meanwhile, so a site whose SuperNode
  was killed could not rejoin for up to a minute; with 10 s it is back within about 20 s.

Each patch only ever shortens a wait; everything else (TLS, SuperNode authentication,
the protocol) is Flower's own code. Importing this module checks the flwr version.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

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


class CappedSleep(ModuleType):
    """The `time` module, with `sleep` capped at `cap_s` seconds."""

    def __init__(self, cap_s: float) -> None:
        super().__init__("time")
        self._cap_s = cap_s

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._cap_s))


def patch_supernode(poll_cap_s: float) -> None:
    """Cap the SuperNode's idle polls and object-pull backoffs at `poll_cap_s` and make it
    announce Flower's shortest heartbeat interval (in this process)."""
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as fleet
    import flwr.supernode.start_client_internal as internal
    from flwr.common.constant import HEARTBEAT_MIN_INTERVAL

    internal.time = CappedSleep(poll_cap_s)  # type: ignore[attr-defined]
    # What the SuperNode announces, and how often it then sends (every ~4 s for 10 s).
    fleet.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_MIN_INTERVAL  # type: ignore[attr-defined]
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_MIN_INTERVAL  # type: ignore[attr-defined]
    shorten_object_pull_backoff(initial_s=poll_cap_s / 4, cap_s=poll_cap_s)


def run_supernode(poll_cap_s: float, args: Sequence[str]) -> None:
    """Run Flower's `flower-supernode ARGS` in this process, patched (`patch_supernode`)."""
    # The module (its package re-exports the function under the same name).
    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")
    patch_supernode(poll_cap_s)
    sys.argv = ["flower-supernode", *args]
    cli.flower_supernode()
