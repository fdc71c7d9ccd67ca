"""`flower-supernode` with shorter idle polls: `python -m client.supernode POLL_S ARGS...`.

Flower 1.42's SuperNode sleeps 3 s between asks for work when idle, 0.5 s between checks
for a finished reply, and waits 1 s (doubling to 10 s) before asking the SuperLink again
for a part of a message that is not there yet; on a round of a few seconds that is most
of the wait. This wrapper runs the same SuperNode with those waits capped at POLL_S (the
site's `[coordinator] poll_interval_s`). It patches flwr 1.42 internals (the `time`
module that `flwr.supernode.start_client_internal` sleeps with, and the default backoff
of `flwr.supercore.inflatable.inflatable_utils.pull_objects`): pyproject pins flwr 1.42.x
and the e2e tests cover it. Everything else, TLS and SuperNode authentication included, is
Flower's own code.

It also announces Flower's shortest heartbeat interval (10 s) instead of its default
(30 s). The SuperLink holds a SuperNode online for two intervals after its last heartbeat
and refuses to activate it again meanwhile, so a site whose SuperNode was killed (a
crashed daemon, a lost machine) could not rejoin for up to a minute, and rounds planned
it in vain; with 10 s it is back within about 20 s.
"""

from __future__ import annotations

import sys
import time
from types import ModuleType
from typing import Any


class _CappedSleep(ModuleType):
    """The `time` module, with `sleep` capped at `cap_s` seconds."""

    def __init__(self, cap_s: float) -> None:
        super().__init__("time")
        self._cap_s = cap_s

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._cap_s))


def main() -> None:
    """Run Flower's `flower-supernode` with the remaining arguments."""
    cap_s = float(sys.argv[1])
    if not 0.01 <= cap_s <= 3.0:
        raise SystemExit(f"poll interval must be between 0.01 and 3 s, got {cap_s}")
    import flwr.supernode.start_client_internal as internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    internal.time = _CappedSleep(cap_s)  # type: ignore[attr-defined]
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as fleet
    from flwr.common.constant import HEARTBEAT_MIN_INTERVAL

    # What the SuperNode announces, and how often it then sends (every ~4 s for 10 s).
    fleet.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_MIN_INTERVAL  # type: ignore[attr-defined]
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_MIN_INTERVAL  # type: ignore[attr-defined]
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    defaults = pull_objects.__kwdefaults__ or {}
    defaults["initial_backoff"] = min(float(defaults.get("initial_backoff", 1.0)), cap_s / 4)
    defaults["backoff_cap"] = min(float(defaults.get("backoff_cap", 10.0)), cap_s)
    pull_objects.__kwdefaults__ = defaults
    sys.argv = ["flower-supernode", *sys.argv[2:]]
    flower_supernode()


if __name__ == "__main__":
    main()
