"""Shorter waits for a reply's parts still in transit, in the ServerApp's process.

Flower 1.42's `Grid.pull_messages` hands the ServerApp a reply as soon as the SuperLink
holds its message object, and then pulls the reply's parts (records, arrays, chunks);
a part the SuperNode is still pushing is asked for again after 1 s, doubling up to 10 s
(`flwr.supercore.inflatable.inflatable_utils.pull_objects`). On a round of a few seconds
that one backoff was most of the round: replies pushed at the site 5 to 13 s before the
coordinator saw them (medfed demo logs, 2026-11-29). This caps those waits, as
`client/supernode.py` does at the site. It patches a flwr 1.42 default: pyproject pins
flwr 1.42.x, and the e2e tests run rounds through it.
"""

from __future__ import annotations

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
