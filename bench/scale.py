"""`medfed bench scale`: how the coordinator's time and memory grow with the number of sites.

For each number of virtual sites it starts the demo's federation on Flower's simulation
runtime (a TLS SuperLink, Ray; the synthetic consortium, the tiny preset, DP-SGD at every
site) twice, once with plain rounds and once with secure aggregation, alternating which
goes first from one site count to the next so drifting machine load falls on both; then
the same with real site daemons (a worker, a SuperNode and an executor per site, as
`medfed demo` starts them) at a few small counts.

While a run goes, a sampler looks at every process of the federation four times a second
(`/proc`: CPU time, resident memory) and sorts them into roles: the SuperLink, Flower's
SuperExec, the ServerApp (`flwr-serverapp` with real SuperNodes; in a simulation the
ServerApp's thread of `flwr-simulation`, whose other threads are Flower's simulated
fleet: its in-memory LinkState, message queues and Ray driver), the sites (Ray's
ClientApp actor, or each site daemon's processes) and the rest of Ray. The coordinator
is the SuperLink, the SuperExec and the ServerApp. Rounds are cut where the run's
results say a round completed. The bytes each site sent and received in a round come
from the run's traffic file (`coordinator.traffic`: the payload of every message the
coordinator pushed and every reply it got, by round). The secure round's baseline is the
plain round at the same site count, in the same invocation. Prints figures; never passes
or fails on them.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

from medfed.bench.scale_fit import (
    RoundUsage,
    Sample,
    growth_exponent,
    per_round,
    ratio,
    round_ends,
    serverapp_threads,
    site_bytes_per_round,
)
from medfed.coordinator.traffic import TRAFFIC_NAME, read_traffic

Mode = Literal["plain", "secure"]
MAX_REAL_SITES = 16
"""Site daemons are three processes each, all on this one machine (as `bench idle`)."""
SAMPLE_INTERVAL_S = 0.25
COORDINATOR_ROLES = ("superlink", "superexec", "serverapp")
MIB = 2**20
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ScaleOptions:
    """What to run: simulated and real site counts, rounds and local steps per run, and
    how long one run may take before the benchmark stops going larger."""

    sites: tuple[int, ...] = (10, 50, 100, 200)
    real: tuple[int, ...] = (3, 6)
    rounds: int = 2
    local_steps: int = 3
    run_timeout_s: float = 900.0


def role_of(argv: Sequence[str]) -> str:
    """The role of a process of the federation's SuperLink tree, from its command line."""
    if not argv:
        return "runtime"
    if argv[0].startswith("ray::ClientAppActor"):  # runs the virtual sites' messages
        return "sites"
    names = {Path(part).name for part in argv[:2]}
    if "flower-superlink" in names:
        return "superlink"
    if "flower-superexec" in names:
        return "superexec"
    if names & {"flwr-simulation", "flwr-serverapp"}:
        return "serverapp"
    return "runtime"


def _proc_stat(path: str) -> tuple[str, int, float, int] | None:
    """(name, parent pid, CPU seconds so far, resident bytes) from a `/proc/.../stat`."""
    try:
        stat = Path(path).read_text()
    except OSError:
        return None
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS_PER_S
    return name, int(fields[1]), cpu, int(fields[21]) * PAGE_BYTES


def _thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each live thread of `pid`: its name and CPU seconds so far."""
    threads: dict[int, tuple[str, float]] = {}
    try:
        tids = [int(entry.name) for entry in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return threads
    for tid in tids:
        if (found := _proc_stat(f"/proc/{pid}/task/{tid}/stat")) is not None:
            threads[tid] = (found[0], found[2])
    return threads


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


class Sampler:
    """Samples the federation's processes in a thread: `roots` maps a name to the pid of
    a process whose whole tree belongs to it (`superlink`, or a site daemon)."""

    def __init__(self, roots: Mapping[str, int], interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.roots = dict(roots)
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._last_cpu: dict[tuple[int, int], float] = {}
        """CPU seconds at the last look, by (pid, 0) for a process, (pid, tid) for a thread."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scale-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._look(count=False)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(self._look(count=True))

    def _look(self, *, count: bool) -> Sample:
        stats: dict[int, tuple[str, int, float, int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (found := _proc_stat(f"{entry}/stat")) is not None:
                stats[int(entry.name)] = found
        parents = {pid: stat[1] for pid, stat in stats.items()}
        cpu: dict[str, float] = {}
        rss: dict[str, int] = {}
        for name, root in self.roots.items():
            for pid in _descendants(root, parents):
                argv = _argv(pid)  # at every look: a Ray worker renames itself as an actor
                role = "sites" if name != "superlink" else role_of(argv)
                rss[role] = rss.get(role, 0) + stats[pid][3]
                if role == "serverapp" and any(Path(a).name == "flwr-simulation" for a in argv):
                    self._split_simulation(pid, cpu)
                else:
                    self._add(cpu, role, (pid, 0), stats[pid][2])
        return Sample(time.monotonic(), cpu if count else {}, rss)

    def _add(self, cpu: dict[str, float], role: str, key: tuple[int, int], used: float) -> None:
        # a process or thread first seen now started since the last look: all its CPU is new
        cpu[role] = cpu.get(role, 0.0) + used - self._last_cpu.get(key, 0.0)
        self._last_cpu[key] = used

    def _split_simulation(self, pid: int, cpu: dict[str, float]) -> None:
        """The ServerApp's thread apart from Flower's simulated fleet (same process)."""
        threads = _thread_cpu(pid)
        own = serverapp_threads(pid, [(tid, name) for tid, (name, _) in threads.items()])
        for tid, (_, used) in threads.items():
            self._add(cpu, "serverapp" if tid in own else "simulated_fleet", (pid, tid), used)


def _descendants(root: int, parents: Mapping[int, int]) -> list[int]:
    """`root` and every live process below it."""
    if root not in parents:
        return []
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found, todo = [root], [root]
    while todo:
        below = children.get(todo.pop(), [])
        found.extend(below)
        todo.extend(below)
    return found


@dataclass
class RunFigures:
    """One federation run: per round what each role used, or why it stopped."""

    sites: int
    mode: Mode
    simulation: bool
    ok: bool = True
    failure: str | None = None
    setup_s: float = 0.0
    run_s: float = 0.0
    rounds: list[dict[str, Any]] = field(default_factory=list)
    load_1min_after: float = 0.0


def _round_figures(
    usage: RoundUsage, duration_s: float | None, sites: int, site_bytes: dict[str, int] | None
) -> dict[str, Any]:
    coordinator_cpu = sum(usage.cpu_s.get(role, 0.0) for role in COORDINATOR_ROLES)
    coordinator_rss = sum(usage.peak_rss_bytes.get(role, 0) for role in COORDINATOR_ROLES)
    return {
        "round": usage.round,
        "round_s": round(usage.seconds, 3),
        "coordinator_duration_s": duration_s,
        "coordinator_cpu_s": round(coordinator_cpu, 3),
        "coordinator_cpu_s_per_site": round(coordinator_cpu / sites, 5),
        "coordinator_peak_mib": round(coordinator_rss / MIB, 1),
        "cpu_s": {role: round(used, 3) for role, used in sorted(usage.cpu_s.items())},
        "peak_mib": {role: round(b / MIB, 1) for role, b in sorted(usage.peak_rss_bytes.items())},
        "bytes_per_site": site_bytes,
    }


def measure_run(sites: int, mode: Mode, *, simulation: bool, options: ScaleOptions) -> RunFigures:
    """Start the demo's federation, run `options.rounds` rounds while sampling; the
    figures (`ok` false, with the reason, when it failed or ran past its time)."""
    from medfed.demo import DemoOptions, demo_federation
    from medfed.errors import MedfedError

    figures = RunFigures(sites, mode, simulation)
    demo = DemoOptions(
        sites=sites, rounds=options.rounds, simulation=simulation,
        local_steps=options.local_steps, secure_aggregation=mode == "secure",
        timeout_s=options.run_timeout_s,
    )  # fmt: skip
    started = submitted = time.monotonic()
    reports: list[tuple[float, int]] = []
    durations: list[float] = []
    site_bytes: dict[int, dict[str, int]] = {}
    sampler: Sampler | None = None
    try:
        with demo_federation(demo, notify=lambda _: None) as federation:
            figures.setup_s = round(time.monotonic() - started, 2)
            roots = {process.name: process.pid for process in federation.group.processes}
            submitted = time.monotonic()
            with Sampler(roots) as sampler:
                federation.submit()
                results = federation.watch(
                    lambda r: reports.append((time.monotonic(), r.rounds_completed))
                )
            durations = [record.duration_s for record in results.per_round]
            figures.run_s = round(time.monotonic() - submitted, 2)
            traffic = read_traffic(federation.results_path.parent / TRAFFIC_NAME)
            site_bytes = site_bytes_per_round(traffic, sites)
    except MedfedError as exc:
        figures.ok, figures.failure = False, f"{type(exc).__name__}: {exc}"[:600]
    figures.load_1min_after = round(os.getloadavg()[0], 2)
    if sampler is not None:
        start_s = min((at for at, done in reports if done == 0), default=submitted)
        usages = per_round(sampler.samples, start_s, round_ends(reports, options.rounds))
        duration_of = dict(enumerate(durations, start=1))
        figures.rounds = [
            _round_figures(u, duration_of.get(u.round), sites, site_bytes.get(u.round))
            for u in usages
        ]
    return figures


def interrupt_on_sigterm() -> None:
    """Make SIGTERM stop the benchmark as Ctrl-C does: the running federation's block
    ends and stops every process it started (call it from the main thread)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def order_of(index: int) -> tuple[Mode, Mode]:
    """Plain first at even positions, secure first at odd ones."""
    return ("plain", "secure") if index % 2 == 0 else ("secure", "plain")


def steady(figures: RunFigures) -> dict[str, Any] | None:
    """The medians over rounds 2 and later (round 1 also starts every site: its data,
    model and throughput measurement), or round 1 alone in a one-round run."""
    rounds = figures.rounds[1:] or figures.rounds[:1]
    if not figures.ok or not rounds:
        return None
    keys = ("round_s", "coordinator_cpu_s", "coordinator_cpu_s_per_site", "coordinator_peak_mib")
    summary: dict[str, Any] = {
        key: round(statistics.median(r[key] for r in rounds), 5) for key in keys
    }
    summary["round_s_per_site"] = round(summary["round_s"] / figures.sites, 5)
    summary["rounds"] = [r["round"] for r in rounds]
    roles = sorted({role for r in rounds for role in r["cpu_s"]})
    summary["cpu_s"] = {
        role: round(statistics.median(r["cpu_s"].get(role, 0.0) for r in rounds), 3)
        for role in roles
    }
    summary["sites_peak_mib"] = max(r["peak_mib"].get("sites", 0.0) for r in rounds)
    counted = [r["bytes_per_site"] for r in rounds if r.get("bytes_per_site")]
    summary["bytes_per_site_per_round"] = (
        {way: round(statistics.median(b[way] for b in counted)) for way in ("sent", "received")}
        if counted
        else None
    )
    return summary


def _row(plain: RunFigures, secure: RunFigures, order: Iterable[Mode]) -> dict[str, Any]:
    base, over = steady(plain), steady(secure)

    def of(summary: dict[str, Any] | None, key: str) -> float | None:
        return None if summary is None else summary[key]

    def bytes_of(summary: dict[str, Any] | None, way: str) -> float | None:
        counted = None if summary is None else summary["bytes_per_site_per_round"]
        return None if counted is None else counted[way]

    return {
        "sites": plain.sites,
        "order": list(order),
        "plain": {**vars(plain), "steady": base},
        "secure": {**vars(secure), "steady": over},
        "secure_to_plain": {
            **{
                key: ratio(of(over, key), of(base, key))
                for key in ("round_s", "coordinator_cpu_s", "coordinator_peak_mib")
            },
            **{
                f"bytes_per_site_{way}": ratio(bytes_of(over, way), bytes_of(base, way))
                for way in ("sent", "received")
            },
        },
    }


FITTED = ("coordinator_cpu_s", "round_s", "coordinator_peak_mib")


def _fit(measured: Sequence[tuple[int, dict[str, Any]]]) -> dict[str, float | None]:
    sites = [float(n) for n, _ in measured]
    fitted = {key: growth_exponent(sites, [s[key] for _, s in measured]) for key in FITTED}
    return {key: None if b is None else round(b, 3) for key, b in fitted.items()}


def _exponents(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per mode: the fit over every site count, and between each two neighbouring counts
    (a cost that grows faster at larger counts shows there)."""
    exponents: dict[str, dict[str, Any]] = {}
    for mode in ("plain", "secure"):
        measured = [(row["sites"], row[mode]["steady"]) for row in rows if row[mode]["steady"]]
        exponents[mode] = {
            **_fit(measured),
            "between": [{"sites": [a[0], b[0]], **_fit([a, b])} for a, b in pairwise(measured)],
        }
    return exponents


Progress = Callable[[str], None]


def _pairs(
    counts: Sequence[int], *, simulation: bool, options: ScaleOptions, progress: Progress
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Both modes at each count, smallest first; stop at the first count where a run
    failed (larger ones would fail the same way, or take longer still)."""
    rows: list[dict[str, Any]] = []
    for index, sites in enumerate(counts):
        order = order_of(index)
        runs: dict[Mode, RunFigures] = {}
        for mode in order:
            kind = "simulated" if simulation else "real"
            progress(f"[scale] {sites} {kind} sites, {mode} rounds ...")
            runs[mode] = measure_run(sites, mode, simulation=simulation, options=options)
        rows.append(_row(runs["plain"], runs["secure"], order))
        failed = [run for run in runs.values() if not run.ok]
        if failed:
            stop = failed[0]
            return rows, {"sites": sites, "mode": stop.mode, "why": stop.failure,
                          "skipped": list(counts[index + 1 :])}  # fmt: skip
    return rows, None


def run_scale_bench(options: ScaleOptions, progress: Progress = lambda _: None) -> dict[str, Any]:
    """Every simulated and real site count, both modes; the figures and the exponents."""
    simulated, sim_stop = _pairs(options.sites, simulation=True, options=options,
                                 progress=progress)  # fmt: skip
    real, real_stop = _pairs(options.real, simulation=False, options=options, progress=progress)
    return {
        "benchmark": "scale",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "config": {
            "sites": list(options.sites),
            "real": list(options.real),
            "rounds": options.rounds,
            "local_steps": options.local_steps,
            "preset": "tiny",
            "dp": True,
            "run_timeout_s": options.run_timeout_s,
            "sample_interval_s": SAMPLE_INTERVAL_S,
        },
        "simulation": simulated,
        "real": real,
        "growth_exponents": {"simulation": _exponents(simulated), "real": _exponents(real)},
        "stopped": {"simulation": sim_stop, "real": real_stop},
        "notes": NOTES,
    }


NOTES = [
    "round_s: from the report that closed the previous round (or the run's first report)"
    " to the report that closed this one, as the demo watches results.json every 0.25 s:"
    " the status queries, planning, every exchange, validation, aggregation and the"
    " checkpoint. coordinator_duration_s is the round loop's own duration_s (from the"
    " plan to the checkpoint, without the status queries).",
    "coordinator: the SuperLink, Flower's SuperExec and the ServerApp. With real"
    " SuperNodes the ServerApp is the flwr-serverapp process. In a simulation it is the"
    " ServerApp's thread of flwr-simulation (the Python threads started before Ray's"
    " first named thread, main thread aside: flwr 1.42's order); the process's other"
    " threads are simulated_fleet: Flower's in-memory LinkState, which scans every stored"
    " message for each virtual node every 0.1 s, its message queues and Ray's driver. A"
    " simulated message never reaches the SuperLink. Memory cannot be split by thread:"
    " the ServerApp's peak in a simulation is the whole flwr-simulation process.",
    "sites: Ray's ClientApp actors (simulation: Flower starts one actor per 2 CPUs, so one"
    " on this machine, running every virtual site's messages in turn) or each site daemon's"
    " processes (real). runtime: the rest of Ray (GCS, raylet, dashboard, agents).",
    "steady: medians over rounds 2 and later; round 1 also loads every site's data and"
    " measures its throughput. Growth exponents: least squares of log(figure) against"
    " log(sites) over the steady figures.",
    "CPU is user + system time from /proc/PID/stat, sampled every 0.25 s; a process that"
    " exits between two looks loses its last quarter second. Peak memory is the largest sum"
    " of resident set sizes of a role seen at a look in the round.",
    "bytes_per_site: from the site's side, what it sent (the replies the coordinator got)"
    " and received (the messages the coordinator pushed) in the round's exchanges: its"
    " status query, training and, with secure aggregation, the key, mask and reveal"
    " steps; summed over the federation's sites and divided by their number (answering or"
    " not). Payload bytes, as the ServerApp's traffic file (run folder, traffic.jsonl) counts"
    " them: every array's data and every config and metric record as Flower serializes it;"
    " message metadata, Flower's object headers, gRPC and TLS framing, heartbeats and"
    " polling are left out, and so is the final evaluation. The same count for simulated"
    " and real sites.",
]


def _cell(value: object, spec: str = "") -> str:
    return "n/a" if value is None else format(value, spec)


def _site_kb(summary: Mapping[str, Any]) -> str:
    counted = summary.get("bytes_per_site_per_round")
    if not counted:
        return "n/a"
    return f"{counted['sent'] / 1000:.1f}+{counted['received'] / 1000:.1f}"


def table_lines(document: Mapping[str, Any]) -> list[str]:
    """The figures as lines of text: one per site count, then the exponents and stops."""
    lines = [
        "sites  kind  plain s/round  secure s/round  ratio  coordinator CPU s/round"
        " (plain/secure)  coordinator peak MiB (plain/secure)  site kB sent+received/round"
        " (plain/secure)"
    ]
    for kind in ("simulation", "real"):
        for row in document[kind]:
            plain, secure = row["plain"]["steady"] or {}, row["secure"]["steady"] or {}
            lines.append(
                f"{row['sites']:>5}  {kind[:4]}  {_cell(plain.get('round_s'), '.2f'):>13}"
                f"  {_cell(secure.get('round_s'), '.2f'):>14}"
                f"  {_cell(row['secure_to_plain']['round_s'], '.2f'):>5}"
                f"  {_cell(plain.get('coordinator_cpu_s'), '.2f')}"
                f" / {_cell(secure.get('coordinator_cpu_s'), '.2f')}"
                f"  {_cell(plain.get('coordinator_peak_mib'), '.0f')}"
                f" / {_cell(secure.get('coordinator_peak_mib'), '.0f')}"
                f"  {_site_kb(plain)} / {_site_kb(secure)}"
            )
    for kind, exponents in document["growth_exponents"].items():
        for mode, figures in exponents.items():
            between = "; ".join(
                f"{a}-{b} sites: CPU {_cell(pair['coordinator_cpu_s'], '.2f')}, time"
                f" {_cell(pair['round_s'], '.2f')}"
                for pair in figures["between"]
                for a, b in [pair["sites"]]
            )
            lines.append(
                f"growth exponent, {kind} {mode}: coordinator CPU"
                f" {_cell(figures['coordinator_cpu_s'], '.2f')}, round time"
                f" {_cell(figures['round_s'], '.2f')}" + (f" ({between})" if between else "")
            )
    for kind, stop in document["stopped"].items():
        if stop is not None:
            lines.append(f"{kind} stopped at {stop['sites']} sites ({stop['mode']}): {stop['why']}")
    return lines
