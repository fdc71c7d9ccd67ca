"""`flower-supernode`, paced: `python -m medfed.client.supernode BUSY_S IDLE_S ARGS...`.

Flower 1.42's SuperNode sleeps 3 s between asks for work, 0.5 s between checks for a
finished reply, and waits 1 s (doubling to 10 s) before asking the SuperLink again for a
part of a message that is not there yet; on a round of a few seconds that is most of the
wait. This runs the same SuperNode asking every BUSY_S (the site's `[coordinator]
poll_interval_s`) for a minute after its last message and every IDLE_S
(`idle_poll_interval_s`) when idle, with object pulls capped at BUSY_S and Flower's
shortest heartbeat interval, so a killed site rejoins within about 20 s. The patches
themselves live in Flower's door, `medfed.flower.patches`; everything else, TLS and
SuperNode authentication included, is Flower's own code.
"""

from __future__ import annotations

import sys

USAGE = "usage: python -m medfed.client.supernode BUSY_S IDLE_S [flower-supernode ARGS]"


def main() -> None:
    """Run Flower's `flower-supernode` with the remaining arguments."""
    try:
        busy_s, idle_s = float(sys.argv[1]), float(sys.argv[2])
    except (IndexError, ValueError):
        raise SystemExit(USAGE) from None
    if not 0.01 <= busy_s <= 3.0:
        raise SystemExit(f"the busy poll interval must be between 0.01 and 3 s, got {busy_s}")
    if not busy_s <= idle_s <= 30.0:
        raise SystemExit(
            f"the idle poll interval must be between {busy_s} (the busy one) and 30 s, got {idle_s}"
        )
    from medfed.flower import FlowerVersionError

    try:
        from medfed.flower.patches import run_supernode
    except FlowerVersionError as exc:
        raise SystemExit(f"medfed: error: {exc}") from None
    run_supernode(busy_s, idle_s, sys.argv[3:])


if __name__ == "__main__":
    main()
