"""The round scheduler: a pure function of the sites' statuses, the study and the clock.

`plan_round` decides which sites train this round and how many local steps each does,
so that every site finishes inside the round deadline at its measured throughput (a
GPU or NPU site does more steps than a CPU site), or, when fewer sites than the study's
minimum can train, returns a plan to wait, with the earliest time enough sites are in
their training windows. It reads no clock and does no I/O, so it is tested with a fake
clock and Hypothesis; `coordinator.rounds` feeds it the answers to Flower `query`
messages.

A site that could not answer (its software predates the query, or the query timed
out) has an *unknown* status: it is scheduled with the study's local steps, since it
enforces its own windows and budget and refuses a round it may not train.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

COMPUTE_FRACTION = 0.8
"""Share of the round deadline a site may compute for: the rest covers transfer and start-up."""


@dataclass(frozen=True)
class SiteStatus:
    """What a site said about itself before a round (all times in epoch seconds).

    `known` is False when the site could not answer; the other fields are then unused.
    `window_ends` 0 means the window has no end; `next_window_start` 0 means none is
    known. `throughput_sps` is DP-SGD samples per second on the study's model;
    `budget_left` the epsilon its approval and cap still allow.
    """

    node_id: int
    site_id: str
    known: bool = True
    in_window: bool = True
    window_ends: float = 0.0
    next_window_start: float = 0.0
    accelerator: str = "cpu"
    throughput_sps: float = 0.0
    budget_left: float = math.inf
    patients: int = 0
    approved: bool = True
    unknown_reason: str = ""
    """Why the status is unknown (no reply in time, an error reply, a malformed one)."""


@dataclass(frozen=True)
class SchedulePolicy:
    """The parts of a study the scheduler reads."""

    min_sites: int
    deadline_s: float
    local_steps: int
    """The most local steps any site does; also what a site of unknown status does."""
    sample_rate: float
    """Poisson sampling rate: a step draws `sample_rate * patients` samples on average."""


@dataclass(frozen=True)
class PlannedSite:
    """A site that trains this round: its local steps and provisional aggregation weight."""

    node_id: int
    site_id: str
    local_steps: int
    weight: float
    expected_s: float | None
    """Seconds its steps take at its measured throughput; None when its status is unknown."""


@dataclass(frozen=True)
class RoundPlan:
    """Either `train` with the planned sites, or `wait` until `eta` (None: no time known)."""

    action: Literal["train", "wait"]
    planned: tuple[PlannedSite, ...] = ()
    refused: dict[str, str] = field(default_factory=dict)
    eta: float | None = None

    def to_json(self) -> dict[str, object]:
        """The plan as the audit chain and the run results record it."""
        return {
            "action": self.action,
            "planned": [
                {
                    "site": site.site_id,
                    "local_steps": site.local_steps,
                    "weight": site.weight,
                    "expected_s": site.expected_s,
                }
                for site in self.planned
            ],
            "refused": dict(sorted(self.refused.items())),
            "eta": self.eta,
        }


def _refusal(status: SiteStatus, policy: SchedulePolicy) -> str | None:
    """Why the site may not train in any window with its current status, or None."""
    if not status.known:
        return None
    if not status.approved:
        return "the study is not approved at the site"
    if not status.budget_left > 0:
        return f"out of privacy budget (epsilon left {status.budget_left:g})"
    if status.patients < 1:
        return "reports no training patients"
    if not (math.isfinite(status.throughput_sps) and status.throughput_sps > 0):
        return "reports no measured throughput"
    if _step_s(status, policy) > policy.deadline_s * COMPUTE_FRACTION:
        return (
            f"too slow: one step takes {_step_s(status, policy):.3g} s at"
            f" {status.throughput_sps:.3g} samples/s, the deadline allows"
            f" {policy.deadline_s * COMPUTE_FRACTION:.3g} s"
        )
    return None


def _step_s(status: SiteStatus, policy: SchedulePolicy) -> float:
    """Seconds one DP-SGD step takes at the site: its expected batch over its throughput."""
    return max(1.0, policy.sample_rate * status.patients) / status.throughput_sps


def _usable_s(status: SiteStatus, policy: SchedulePolicy, now: float) -> float:
    """Seconds the site may compute this round: within the deadline and its window."""
    usable = policy.deadline_s * COMPUTE_FRACTION
    if status.window_ends > 0:
        usable = min(usable, status.window_ends - now)
    return usable


def _sized(status: SiteStatus, policy: SchedulePolicy, now: float) -> tuple[int, float] | None:
    """(local steps, seconds they take) for a known site, or None if not even one fits."""
    step_s = _step_s(status, policy)
    steps = min(policy.local_steps, math.floor(_usable_s(status, policy, now) / step_s))
    if steps < 1:
        return None
    return steps, steps * step_s


def _weights(sites: Sequence[SiteStatus]) -> list[float]:
    """Patient counts normalised to 1; a site of unknown status counts as the known mean."""
    known = [site.patients for site in sites if site.known and site.patients > 0]
    stand_in = sum(known) / len(known) if known else 1.0
    counts = [
        float(site.patients) if site.known and site.patients > 0 else stand_in for site in sites
    ]
    total = sum(counts)
    return [count / total for count in counts]


def _eta(
    ready: Sequence[SiteStatus], waiting: Sequence[SiteStatus], minimum: int, now: float
) -> float | None:
    """The earliest time after `now` at which at least `minimum` sites are in a window.

    A `ready` site counts until its window ends; a `waiting` one from its next window's
    start (that window's length is not known, so from then on). None if no such time
    is known.
    """
    starts = sorted({s.next_window_start for s in waiting if s.next_window_start > now})
    for moment in starts:
        available = sum(1 for s in ready if s.window_ends == 0 or s.window_ends > moment)
        available += sum(1 for s in waiting if 0 < s.next_window_start <= moment)
        if available >= minimum:
            return moment
    return None


def plan_round(statuses: Sequence[SiteStatus], policy: SchedulePolicy, now: float) -> RoundPlan:
    """Plan one round at time `now` from the sites' `statuses` (see the module docstring)."""
    refused: dict[str, str] = {}
    waiting: list[SiteStatus] = []  # may train in a later window
    ready: list[tuple[SiteStatus, int, float | None]] = []  # may train now
    for status in sorted(statuses, key=lambda s: s.site_id):
        reason = _refusal(status, policy)
        if reason is not None:
            refused[status.site_id] = reason
            continue
        if not status.known:
            ready.append((status, policy.local_steps, None))
        elif not status.in_window:
            refused[status.site_id] = "outside its training window"
            waiting.append(status)
        else:
            sized = _sized(status, policy, now)
            if sized is None:
                refused[status.site_id] = "its training window closes before one step would end"
                waiting.append(status)
            else:
                ready.append((status, *sized))
    if len(ready) < policy.min_sites:
        eta = _eta([s for s, _, _ in ready], waiting, policy.min_sites, now)
        return RoundPlan("wait", refused=refused, eta=eta)
    weights = _weights([status for status, _, _ in ready])
    planned = tuple(
        PlannedSite(status.node_id, status.site_id, steps, weight, expected)
        for (status, steps, expected), weight in zip(ready, weights, strict=True)
    )
    return RoundPlan("train", planned=planned, refused=refused)
