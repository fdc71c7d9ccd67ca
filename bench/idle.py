"""`medfed bench idle`: what a site daemon costs while nothing runs, and how soon it answers.

A hospital runs its daemon all year and trains minutes a day. This starts the demo's
federation on loopback (a TLS SuperLink with SuperNode authentication and `--sites` site
daemons, each its worker, SuperNode and executor, as `medfed demo` runs them), then:

1. **busy**: for the first `BUSY_WINDOW_S` after its start a daemon polls fast, as it does
   for a minute after every message; its CPU time is read over most of that window;
2. **idle**: once that window has passed, over `--idle-s` seconds;
3. **start**: it submits a one-round run and times, from the coordinator's `run.started`
   audit entry to the first site's SuperNode asking the SuperLink for that run (Flower's
   `get-run`, logged with a timestamp), how long the idle sites took to see it.

CPU time is every process of a site's tree (`/proc/PID/stat`, user + system), over wall
time: the share of one core. Prints figures; never passes or fails on them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.common.pace import BUSY_WINDOW_S

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
GET_RUN = re.compile(r"^(\S+Z) INFO \[uvicorn\.access\] .*\"POST /v1/fleet/get-run ")
"""A SuperNode asking for a run it has not seen: it has just pulled that run's first message."""


@dataclass(frozen=True)
class IdleOptions:
    sites: int = 3
    idle_s: float = 120.0

    def __post_init__(self) -> None:
        if not 1 <= self.sites <= 16:
            raise ValueError(f"--sites must be between 1 and 16, got {self.sites}")
        if not 10 <= self.idle_s <= 3600:
            raise ValueError(f"--idle-s must be between 10 and 3600, got {self.idle_s:g}")


def _parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            parents[int(entry.name)] = int(fields[1])
    return parents


def tree(root: int) -> set[int]:
    """`root` and every live process below it."""
    parents = _parents()
    found = {root}
    grew = True
    while grew:
        below = {pid for pid, parent in parents.items() if parent in found} - found
        grew = bool(below)
        found |= below
    return found


def cpu_s(pids: Iterable[int]) -> dict[int, float]:
    """Each live process's CPU time so far (user + system), in seconds."""
    times: dict[int, float] = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        times[pid] = (int(fields[11]) + int(fields[12])) / TICKS_PER_S
    return times


def core_share(roots: dict[str, int], seconds: float) -> dict[str, float]:
    """The share of one core each named process tree used over the next `seconds`
    (processes alive at both ends)."""
    trees = {name: tree(pid) for name, pid in roots.items()}
    before = {name: cpu_s(pids) for name, pids in trees.items()}
    time.sleep(seconds)
    shares: dict[str, float] = {}
    for name, pids in trees.items():
        after = cpu_s(pids)
        used = sum(after[pid] - before[name][pid] for pid in after if pid in before[name])
        shares[name] = used / seconds
    return shares


def first_pickup_s(superlink_log: Path, started_at: dt.datetime) -> float | None:
    """Seconds from `started_at` to the first SuperNode's `get-run` after it."""
    for line in superlink_log.read_text(errors="replace").splitlines():
        match = GET_RUN.match(line)
        if match is None:
            continue
        at = dt.datetime.fromisoformat(match.group(1).replace("Z", "+00:00"))
        if at >= started_at:
            return (at - started_at).total_seconds()
    return None


def run_started_at(audit_path: Path) -> dt.datetime:
    for line in audit_path.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("event") == "run.started":
            return dt.datetime.fromisoformat(entry["time"])
    raise RuntimeError(f"{audit_path}: no run.started entry")


def _summary(shares: dict[str, float], names: list[str]) -> dict[str, Any]:
    sites = [shares[name] for name in names]
    return {
        "per_site_core_share_mean": round(sum(sites) / len(sites), 5),
        "per_site_core_share_max": round(max(sites), 5),
        "superlink_core_share": round(shares["superlink"], 5),
        "per_site": {name: round(shares[name], 5) for name in names},
    }


def run_idle_bench(options: IdleOptions) -> dict[str, Any]:
    """Start the federation, measure busy and idle CPU and a new run's pickup; the figures."""
    from medfed.client.executor import IDLE_POLL_INTERVAL_S
    from medfed.client.executor import POLL_INTERVAL_S as EXECUTOR_BUSY_S
    from medfed.demo import DEMO_POLL_INTERVAL_S, DemoOptions, demo_federation

    demo = DemoOptions(sites=options.sites, rounds=1, local_steps=5, timeout_s=600.0)
    with demo_federation(demo, notify=lambda _: None) as federation:
        started = time.monotonic()
        processes = {p.name: p.pid for p in federation.group.processes}
        names = sorted(name for name in processes if name != "superlink")
        # busy: the daemons started moments ago, within their busy window
        measure_s = max(5.0, BUSY_WINDOW_S - 15.0)
        busy = core_share(processes, measure_s)
        # idle: once every poller's busy window has passed
        time.sleep(max(0.0, BUSY_WINDOW_S + 5.0 - (time.monotonic() - started)))
        idle = core_share(processes, options.idle_s)
        federation.submit()
        federation.watch(lambda _: None)
        audit = federation.results_path.parent / "audit.jsonl"
        superlink_log = next(p.log_path for p in federation.group.processes
                             if p.name == "superlink")  # fmt: skip
        pickup = first_pickup_s(superlink_log, run_started_at(audit))
    busy_figures, idle_figures = _summary(busy, names), _summary(idle, names)
    return {
        "benchmark": "idle",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "sites": options.sites,
        "polls_s": {
            "supernode_busy": DEMO_POLL_INTERVAL_S,
            "supernode_idle": _default_idle_poll(),
            "executor_busy": EXECUTOR_BUSY_S,
            "executor_idle": IDLE_POLL_INTERVAL_S,
            "busy_window": BUSY_WINDOW_S,
        },
        "busy": {"seconds": measure_s, **busy_figures},
        "idle": {"seconds": options.idle_s, **idle_figures},
        "idle_to_busy_ratio": round(
            idle_figures["per_site_core_share_mean"]
            / max(busy_figures["per_site_core_share_mean"], 1e-9),
            3,
        ),
        "new_run_pickup_s": None if pickup is None else round(pickup, 3),
    }


def _default_idle_poll() -> float:
    from medfed.client.config import CoordinatorSection

    return CoordinatorSection(superlink="127.0.0.1:1").idle_poll_interval_s
