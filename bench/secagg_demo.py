"""Real rounds with and without secure aggregation: `medfed demo` twice, side by side.

Runs `medfed demo --sites S --rounds N --json --keep` as a subprocess once as it is
(secure aggregation on: keys, train, reveal) and once with
`--no-secure-aggregation` (the coordinator sees each site's update), alternating which
goes first from one repeat to the next (secure then plain, plain then secure, ...) so
drifting machine load falls on both. Reports the median of the demo's per-round
`duration_s` on each side and their ratio, and the same with the time before each round
(`planning_s`: the status query and planning) added, after round 1. Opt in with
`medfed bench secagg --demo-rounds N`: each demo takes a minute or more.
"""

from __future__ import annotations

import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from medfed.bench.round_time import last_json_line, number, run_process, slowest_training

Mode = Literal["secure", "plain"]
PLAIN_FLAG = "--no-secure-aggregation"


class DemoSideError(RuntimeError):
    """One demo run failed; the message says which and how."""


@dataclass(frozen=True)
class DemoComparison:
    """How many rounds and sites each demo runs, and how many pairs of demos."""

    rounds: int
    sites: int = 3
    repeats: int = 1


@dataclass(frozen=True)
class DemoRun:
    """One `medfed demo --json` run: its rounds' durations and the slowest site training."""

    mode: Mode
    duration_s: list[float]
    planning_s: list[float]
    """Before each round: its status query (if any) and planning; a whole round is both."""
    slowest_train_s: list[float | None]
    wall_s: float
    load_1min_after: float


@dataclass
class Measured:
    order: list[list[Mode]] = field(default_factory=list)
    runs: list[DemoRun] = field(default_factory=list)

    def of(self, mode: Mode) -> list[DemoRun]:
        return [run for run in self.runs if run.mode == mode]


def order_of(repeat: int) -> list[Mode]:
    """Secure first on even repeats, plain first on odd ones (A B, B A, ...)."""
    return ["secure", "plain"] if repeat % 2 == 0 else ["plain", "secure"]


def demo_argv(medfed: Path, mode: Mode, *, rounds: int, sites: int) -> list[str]:
    argv = [str(medfed), "demo", "--sites", str(sites), "--rounds", str(rounds)]
    return [*argv, "--json", "--keep", *([PLAIN_FLAG] if mode == "plain" else [])]


def run_side(medfed: Path, mode: Mode, options: DemoComparison, env: dict[str, str]) -> DemoRun:
    """Run one demo; its per-round durations, or `DemoSideError` saying why there are none."""
    finished = run_process(
        demo_argv(medfed, mode, rounds=options.rounds, sites=options.sites), env=env, cwd=Path.cwd()
    )
    slowest = slowest_training(finished.stderr, options.rounds)  # removes the kept folder
    document = last_json_line(finished)
    tail = " | ".join(finished.stderr.strip().splitlines()[-5:])
    if finished.timed_out or finished.returncode != 0 or document is None:
        raise DemoSideError(f"{mode} demo: exit {finished.returncode}, no JSON result: {tail}")
    if document.get("secure_aggregation") is not (mode == "secure"):
        raise DemoSideError(
            f"{mode} demo reports secure_aggregation {document.get('secure_aggregation')!r}"
        )
    records = document.get("per_round")
    if not isinstance(records, list) or len(records) != options.rounds:
        raise DemoSideError(f"{mode} demo: per_round should list {options.rounds} rounds")
    try:
        durations = [number(record, "duration_s") for record in records]
        planning = [number(record, "planning_s") for record in records]
        wall = number(document, "wall_s")
    except (ValueError, AttributeError) as exc:
        raise DemoSideError(f"{mode} demo: {exc}") from exc
    return DemoRun(mode, durations, planning, slowest, wall, finished.load_1min_after)


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _side(runs: list[DemoRun]) -> dict[str, object]:
    durations = [d for run in runs for d in run.duration_s]
    later = [d for run in runs for d in run.duration_s[1:]]
    whole = [
        p + d for run in runs for p, d in list(zip(run.planning_s, run.duration_s, strict=True))[1:]
    ]
    overhead = [
        d - t for run in runs for d, t in zip(run.duration_s, run.slowest_train_s, strict=False)
        if t is not None
    ]  # fmt: skip
    return {
        "duration_s_by_run": [run.duration_s for run in runs],
        "duration_s_median": _median(durations),
        "duration_s_median_after_round_1": _median(later),
        "planning_s_by_run": [run.planning_s for run in runs],
        "with_status_s_median_after_round_1": _median(whole),
        "slowest_site_train_s_by_run": [run.slowest_train_s for run in runs],
        "beyond_slowest_training_s_median": _median(overhead),
        "wall_s": [run.wall_s for run in runs],
        "load_1min_after": [run.load_1min_after for run in runs],
    }


def _ratio(a: object, b: object) -> float | None:
    if isinstance(a, float) and isinstance(b, float) and b > 0:
        return round(a / b, 3)
    return None


def compare(options: DemoComparison) -> dict[str, object]:
    """Both sides `repeats` times, alternating; the medians and secure / plain ratios
    (`ok` false, with the reason, if a run failed)."""
    medfed = Path(sys.executable).parent / "medfed"
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    measured = Measured()
    failure = None
    try:
        for repeat in range(options.repeats):
            order = order_of(repeat)
            measured.order.append(order)
            for mode in order:
                where = f"{options.sites} sites, {options.rounds} rounds"
                print(f"[secagg] demo {repeat + 1}/{options.repeats}: {mode}, {where} ...",
                      file=sys.stderr, flush=True)  # fmt: skip
                measured.runs.append(run_side(medfed, mode, options, env))
    except DemoSideError as exc:
        failure = str(exc)
    secure, plain = _side(measured.of("secure")), _side(measured.of("plain"))
    return {
        "ok": failure is None,
        "failure": failure,
        "rounds": options.rounds,
        "sites": options.sites,
        "repeats": options.repeats,
        "order": measured.order,
        "secure": secure,
        "plain": plain,
        "ratio_secure_to_plain": _ratio(secure["duration_s_median"], plain["duration_s_median"]),
        "ratio_secure_to_plain_after_round_1": _ratio(
            secure["duration_s_median_after_round_1"], plain["duration_s_median_after_round_1"]
        ),
        # A whole round: its status query and planning, then the round itself.
        "ratio_with_status_after_round_1": _ratio(
            secure["with_status_s_median_after_round_1"],
            plain["with_status_s_median_after_round_1"],
        ),
    }
