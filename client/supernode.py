"""`flower-supernode` with shorter idle polls: `python -m medfed.client.supernode POLL_S ARGS...`.

Flower 1.42's SuperNode sleeps 3 s between asks for work when idle, 0.5 s between checks
for a finished reply, and waits 1 s (doubling to 10 s) before asking the SuperLink again
for a part of a message that is not there yet; on a round of a few seconds that is most
of the wait. This runs the same SuperNode with those waits capped at POLL_S (the site's
`[coordinator] poll_interval_s`) and Flower's shortest heartbeat interval, so a killed
site rejoins within about 20 s. The patches themselves live in Flower's door,
`medfed.flower.patches`; everything else, TLS and SuperNode authentication included, is
Flower's own code.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Run Flower's `flower-supernode` with the remaining arguments."""
    try:
        cap_s = float(sys.argv[1])
    except (IndexError, ValueError):
        usage = "usage: python -m medfed.client.supernode POLL_S [flower-supernode ARGS]"
        raise SystemExit(usage) from None
    if not 0.01 <= cap_s <= 3.0:
        raise SystemExit(f"poll interval must be between 0.01 and 3 s, got {cap_s}")
    from medfed.flower import FlowerVersionError

    try:
        from medfed.flower.patches import run_supernode
    except FlowerVersionError as exc:
        raise SystemExit(f"medfed: error: {exc}") from None
    run_supernode(cap_s, sys.argv[2:])


if __name__ == "__main__":
    main()
