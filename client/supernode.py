"""`flower-supernode` with shorter idle polls: `python -m client.supernode POLL_S ARGS...`.

Flower 1.42's SuperNode sleeps 3 s between asks for work when idle and 0.5 s between
checks for a finished reply; on a round of a few seconds that is most of the wait. This
wrapper runs the same SuperNode with those sleeps capped at POLL_S (the site's
`[coordinator] poll_interval_s`). It patches flwr 1.42 internals (the `time` module
that `flwr.supernode.start_client_internal` sleeps with): pyproject pins flwr 1.42.x and
the e2e tests cover it. Everything else, TLS and SuperNode authentication included, is
Flower's own code.
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
    sys.argv = ["flower-supernode", *sys.argv[2:]]
    flower_supernode()


if __name__ == "__main__":
    main()
