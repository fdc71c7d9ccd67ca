"""The pure part of `medfed bench scale`: site counts from the command line, each round's
share of process samples and of the bytes exchanged, and the growth exponent of a cost
against the number of sites.

No processes, no clock, no Flower here: `bench.scale` runs the federations and feeds these
functions what it sampled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from medfed.coordinator.traffic import ExchangeTraffic


def parse_site_counts(text: str, *, most: int, option: str) -> tuple[int, ...]:
    """Site counts written as `10,50,100`: ascending, no repeats; empty text gives none.

    Raises
    ------
    ValueError
        A part is not a whole number from 1 to `most` (the message names `option`).
    """
    counts: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if not part.isdigit() or not 1 <= int(part) <= most:
            raise ValueError(
                f"{option}: expected whole numbers from 1 to {most} separated by commas,"
                f" got {part!r}"
            )
        counts.add(int(part))
    return tuple(sorted(counts))


def growth_exponent(sites: Sequence[float], values: Sequence[float]) -> float | None:
    """The slope b of log(value) = a + b log(sites), by least squares.

    b = 1: the cost grows in proportion to the sites; b = 2: with their square. None
    when fewer than two distinct site counts have a positive, finite value.
    """
    points = [
        (math.log(n), math.log(v))
        for n, v in zip(sites, values, strict=True)
        if n > 0 and math.isfinite(v) and v > 0
    ]
    if len({x for x, _ in points}) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def serverapp_threads(pid: int, threads: Sequence[tuple[int, str]]) -> set[int]:
    """Which threads of a `flwr-simulation` process (pid, and its threads as (tid, name))
    run the ServerApp rather than Flower's simulated fleet.

    flwr 1.42 starts the ServerApp's thread before it starts Ray, whose native threads
    name themselves (`gcs_client_io_s`, ...); the fleet's own Python threads (message
    queues, workers) come after them, and the main thread starts Ray and the fleet.
    So: the Python threads (named as the process) other than the main one, started
    before Ray's first named thread; all but the main one while Ray has none yet.
    """
    named = dict(threads)
    process_name = named.get(pid)
    first_native = min((tid for tid, name in threads if name != process_name), default=None)
    return {
        tid
        for tid, name in threads
        if tid != pid and name == process_name and (first_native is None or tid < first_native)
    }


@dataclass(frozen=True)
class Sample:
    """One look at the federation's processes: when (monotonic seconds), the CPU seconds
    each role used since the previous look, and each role's resident memory now."""

    at_s: float
    cpu_s: Mapping[str, float]
    rss_bytes: Mapping[str, int]


@dataclass(frozen=True)
class RoundUsage:
    """What each role of processes used during one round (`start_s`, `end_s`]."""

    round: int
    start_s: float
    end_s: float
    cpu_s: dict[str, float]
    peak_rss_bytes: dict[str, int]

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s


def round_ends(reports: Sequence[tuple[float, int]], rounds: int) -> list[float]:
    """When each round ended: for round k, the first report (monotonic seconds, rounds
    completed) that had completed at least k rounds. Rounds with no such report (the run
    stopped) are left out, so the list may be shorter than `rounds`."""
    ends: list[float] = []
    for k in range(1, rounds + 1):
        seen = [at for at, done in reports if done >= k]
        if not seen:
            break
        ends.append(min(seen))
    return ends


def per_round(samples: Sequence[Sample], start_s: float, ends: Sequence[float]) -> list[RoundUsage]:
    """Split `samples` into rounds: round k spans (previous end, its end]. A sample's CPU
    counts in the round its look fell in; peak memory is the largest look in it."""
    usages: list[RoundUsage] = []
    begin = start_s
    for number, end in enumerate(ends, start=1):
        inside = [s for s in samples if begin < s.at_s <= end]
        cpu: dict[str, float] = {}
        peak: dict[str, int] = {}
        for sample in inside:
            for role, used in sample.cpu_s.items():
                cpu[role] = cpu.get(role, 0.0) + used
            for role, rss in sample.rss_bytes.items():
                peak[role] = max(peak.get(role, 0), rss)
        usages.append(RoundUsage(number, begin, end, cpu, peak))
        begin = end
    return usages


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, rounded; None when either is missing or the base is 0."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return round(numerator / denominator, 3)


def site_bytes_per_round(
    exchanges: Sequence[ExchangeTraffic], sites: int
) -> dict[int, dict[str, int]]:
    """Per round, the payload bytes a site sent and received, from the site's side: the
    replies the coordinator got and the messages it pushed in the round's exchanges (its
    status query, training and secure steps), summed and divided by `sites` (every site
    of the federation, answering or not). Exchanges of no round (`final`) are left out."""
    totals: dict[int, list[int]] = {}
    for exchange in exchanges:
        if exchange.round is not None:
            total = totals.setdefault(exchange.round, [0, 0])
            total[0] += exchange.from_sites_bytes
            total[1] += exchange.to_sites_bytes
    return {
        number: {"sent": round(sent / sites), "received": round(received / sites)}
        for number, (sent, received) in sorted(totals.items())
    }
