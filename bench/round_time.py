"""Seconds per round: `medfed demo` beside a stock Flower deployment, measured in one run.

Runs the stock baseline (`stock_flower_rounds.sh`: plain FedAvg over a tiny MLP, no TLS,
no DP) and `medfed demo --json` with the same rounds and sites, alternating the order
from one repeat to the next (stock first, then medfed first, ...) so that drifting machine
load falls on both sides. Prints one JSON document on stdout; progress goes to stderr.
It reports figures and never passes or fails on them: it exits 1 only if a side fails.

    .venv/bin/python bench/round_time.py [--rounds 3] [--sites 3] [--repeats 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Literal

Side = Literal["stock", "medfed"]

DEFAULT_BASELINE = Path(__file__).resolve().parent / "baselines" / "stock_flower_rounds.sh"
"""Flower's stock app and its runner, shipped with medfed (bench/baselines/)."""
TIMEOUT_S = 900.0
"""Wall-clock limit of one side's run, start to finish."""
GRACE_S = 30.0
"""How long a timed-out run gets to stop its own SuperLink and SuperNodes after SIGTERM."""
STDERR_TAIL_LINES = 20

NOTES = [
    "per_round_s compares the time a coordinator spends per training round; both"
    " exclude process start-up. stock: Flower's 'Strategy execution finished in' time"
    " divided by rounds (FedAvg.start: send_and_receive for training, then an empty"
    " evaluation step since fraction_evaluate=0). medfed: the mean of per_round[].duration_s"
    " (push the model, poll for replies, validate, aggregate); the final evaluation"
    " message after the last round is not in any duration_s, but it is in medfed wall_s.",
    "medfed: TLS on the SuperLink plus SuperNode authentication (registered EC keys);"
    " each site evaluates the incoming global model on its training and held-out rows,"
    " then trains 30 local DP-SGD steps with Opacus (Poisson-sampled batches, per-sample"
    " clipping, Gaussian noise), writes the spend to its SQLite privacy ledger and"
    " computes epsilon; the coordinator checks every reply and polls the SuperLink for"
    " replies every 50 ms.",
    "stock: no TLS, no SuperNode authentication, no DP, no evaluation; 5 full-batch SGD"
    " steps of a 32-64-2 MLP on 512 random rows; Flower's Grid.send_and_receive sleeps"
    " 3 s between pulls for replies. Its FedAvg asks for min_available_nodes=1, so a round"
    " could run with fewer than all SuperNodes if some had not connected yet.",
    "stock: one flower-superlink and one flower-supernode per site on loopback, default"
    " subprocess isolation, so every message starts a fresh flwr-clientapp process at the"
    " site (the stock app imports torch in it).",
    "medfed: each site runs `medfed site start` (as the demo does): a warm site worker"
    " (data, model, ledger; gRPC on a Unix socket), flower-supernode --isolation process"
    " with its idle polls capped at 0.2 s, and a warm executor that runs the thin ClientApp"
    " tasks in one process: no process starts per message. Each worker uses 1 torch"
    " thread (3 sites share the machine).",
    "overhead_s_by_round: a round's duration_s minus the slowest site's local training"
    " time, as that site's worker logged it (evaluating the incoming model, DP-SGD steps,"
    " ledger write, signing).",
    "medfed wall_s is the whole `medfed demo` command: synthetic data, PKI, SuperLink and"
    " SuperNode start-up, key registration, all rounds and the final evaluation.",
    "stock flwr_run_wall_s is its `flwr run --stream` command; process_wall_s (both sides)"
    " is the whole subprocess as this script timed it, for stock including the baseline's"
    " fixed 9 s of sleeps while its SuperLink and SuperNodes start.",
    "load_1min_after is the 1-minute load average as each run ended. It counts the run's"
    " own processes (medfed's three ClientApps at once take a 2-core machine past 3), so"
    " read it beside loadavg_at_start and the other side's: far above both means other"
    " work shared the CPUs and that run's figures are inflated.",
    "Ratios use the medians over repeats; these shared machines are noisy, so only figures"
    " measured side by side in one run compare.",
]


class BenchError(Exception):
    """One side of the benchmark failed; the message says how."""

    def __init__(self, side: Side, reason: str, *, returncode: int | None, stderr: str) -> None:
        super().__init__(f"{side}: {reason}")
        self.side = side
        self.reason = reason
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class Options:
    """What to run: the same rounds and sites on both sides, `repeats` times each."""

    rounds: int
    sites: int
    repeats: int
    baseline: Path


@dataclass(frozen=True)
class Finished:
    """What a finished subprocess left: exit status, output, and its wall-clock seconds."""

    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    timed_out: bool
    load_1min_after: float
    """The machine's 1-minute load average when it ended: other work shows up here."""


@dataclass(frozen=True)
class StockRun:
    """One run of the stock baseline."""

    per_round_s: float
    strategy_s: float
    flwr_run_wall_s: float
    process_wall_s: float
    load_1min_after: float


@dataclass(frozen=True)
class MedfedRun:
    """One run of `medfed demo --json`, with each round's slowest local training."""

    duration_s: list[float]
    wall_s: float
    process_wall_s: float
    load_1min_after: float
    slowest_train_s: list[float | None] = field(default_factory=list)

    @property
    def overhead_s(self) -> list[float | None]:
        """Per round: the round's wall time minus its slowest site's local training time."""
        return [
            None if train is None else round(duration - train, 3)
            for duration, train in zip(self.duration_s, self.slowest_train_s, strict=False)
        ]

    @property
    def per_round_s(self) -> float:
        return statistics.fmean(self.duration_s)


@dataclass
class Measured:
    """Everything measured so far, in the order it ran."""

    order: list[list[Side]] = field(default_factory=list)
    stock: list[StockRun] = field(default_factory=list)
    medfed: list[MedfedRun] = field(default_factory=list)


def log(message: str) -> None:
    print(f"[round_time] {message}", file=sys.stderr, flush=True)


def run_process(argv: list[str], *, env: dict[str, str], cwd: Path) -> Finished:
    """Run `argv` in its own session; on timeout SIGTERM the session, then SIGKILL it."""
    started = time.monotonic()
    process = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    timed_out = False
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        timed_out = True
        stdout, stderr = _stop(process)
    return Finished(
        returncode=process.returncode,
        stdout=stdout,
        stderr=stderr,
        wall_s=round(time.monotonic() - started, 2),
        timed_out=timed_out,
        load_1min_after=round(os.getloadavg()[0], 2),
    )


def _stop(process: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGTERM the process's session (both sides then stop their SuperLink and SuperNodes,
    which run in sessions of their own); SIGKILL it if it is still there after a grace."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.communicate(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        log(f"still running {GRACE_S:g} s after SIGTERM; sending SIGKILL")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    try:
        return process.communicate(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        return "", "(no output: something it started still holds its pipes open)"


def last_json_line(finished: Finished) -> dict[str, object] | None:
    """The JSON object on the last non-empty stdout line, or None if there is none."""
    lines = [line for line in finished.stdout.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        document = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


def number(document: dict[str, object], key: str) -> float:
    value = document.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key!r} is {value!r}, not a finite number")
    return float(value)


def check_finished(side: Side, finished: Finished) -> dict[str, object]:
    """The side's JSON document, or a `BenchError` saying why there is none."""
    if finished.timed_out:
        reason = f"did not finish within {TIMEOUT_S:g} s (stopped)"
    elif finished.returncode != 0:
        reason = f"exited with status {finished.returncode}"
    elif (document := last_json_line(finished)) is None:
        reason = "printed no JSON object on stdout"
    else:
        return document
    raise BenchError(side, reason, returncode=finished.returncode, stderr=finished.stderr)


def run_stock(baseline: Path, rounds: int, sites: int, env: dict[str, str]) -> StockRun:
    argv = ["bash", str(baseline), str(rounds), str(sites)]
    finished = run_process(argv, env=env, cwd=baseline.parent)
    document = check_finished("stock", finished)
    try:
        if document.get("exit") != 0:
            raise ValueError(f"flwr run exited with status {document.get('exit')!r}")
        return StockRun(
            per_round_s=number(document, "per_round_s"),
            strategy_s=number(document, "strategy_s"),
            flwr_run_wall_s=number(document, "flwr_run_wall_s"),
            process_wall_s=finished.wall_s,
            load_1min_after=finished.load_1min_after,
        )
    except ValueError as exc:
        reason = f"{exc}; it printed: {finished.stdout.strip()[-400:]}"
        raise BenchError(
            "stock", reason, returncode=finished.returncode, stderr=finished.stderr
        ) from exc


KEPT = re.compile(r"the demo's files and logs are kept in (\S+)")
TRAINED = re.compile(r"trained run \S+ round (\d+) in ([0-9.]+) s")


def slowest_training(stderr: str, rounds: int) -> list[float | None]:
    """Per round, the longest local training any site logged (the site workers log each
    round's training time); the demo's kept folder is removed afterwards."""
    match = KEPT.search(stderr)
    if match is None:
        return [None] * rounds
    work = Path(match.group(1))
    slowest: dict[int, float] = {}
    for log_path in work.glob("sites/*/state/logs/worker.log"):
        for number_text, seconds in TRAINED.findall(log_path.read_text(errors="replace")):
            slowest[int(number_text)] = max(slowest.get(int(number_text), 0.0), float(seconds))
    shutil.rmtree(work, ignore_errors=True)
    return [slowest.get(index) for index in range(1, rounds + 1)]


def run_medfed(medfed: Path, rounds: int, sites: int, env: dict[str, str]) -> MedfedRun:
    argv = [str(medfed), "demo", "--sites", str(sites), "--rounds", str(rounds), "--json", "--keep"]
    finished = run_process(argv, env=env, cwd=Path.cwd())
    slowest = slowest_training(finished.stderr, rounds)
    document = check_finished("medfed", finished)
    try:
        per_round = document.get("per_round")
        if not isinstance(per_round, list) or len(per_round) != rounds:
            raise ValueError(f"per_round should list {rounds} rounds; it is {per_round!r:.200}")
        records = [record for record in per_round if isinstance(record, dict)]
        if len(records) != rounds:
            raise ValueError("a per_round entry is not an object")
        durations = [number(record, "duration_s") for record in records]
        return MedfedRun(
            duration_s=durations,
            wall_s=number(document, "wall_s"),
            process_wall_s=finished.wall_s,
            load_1min_after=finished.load_1min_after,
            slowest_train_s=slowest,
        )
    except ValueError as exc:
        raise BenchError(
            "medfed", str(exc), returncode=finished.returncode, stderr=finished.stderr
        ) from exc


def order_of(repeat: int) -> list[Side]:
    """Stock first on even repeats, medfed first on odd ones (A B, B A, A B, ...)."""
    return ["stock", "medfed"] if repeat % 2 == 0 else ["medfed", "stock"]


def measure(options: Options, env: dict[str, str], measured: Measured) -> None:
    """Run every repeat, appending to `measured` as it goes; raises `BenchError` on a failure."""
    medfed = Path(sys.executable).parent / "medfed"
    for repeat in range(options.repeats):
        order = order_of(repeat)
        measured.order.append(order)
        for side in order:
            where = f"{options.rounds} rounds, {options.sites} sites"
            log(f"repeat {repeat + 1}/{options.repeats}: {side}, {where} ...")
            if side == "stock":
                stock = run_stock(options.baseline, options.rounds, options.sites, env)
                measured.stock.append(stock)
                log(f"  stock: {stock.per_round_s:.2f} s per round ({stock.process_wall_s:.0f} s)")
            else:
                run = run_medfed(medfed, options.rounds, options.sites, env)
                measured.medfed.append(run)
                log(f"  medfed: {run.per_round_s:.2f} s per round (wall {run.wall_s:.0f} s)")


def machine_facts() -> dict[str, object]:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "flwr": version("flwr"),
        "torch": version("torch"),
        "opacus": version("opacus"),
        "loadavg_at_start": [round(load, 2) for load in os.getloadavg()],
    }


def source_facts() -> dict[str, object]:
    """Which medfed was measured: the checkout's commit, and how many files outside bench/
    differ from it (the venv's editable install runs the working tree, not the commit)."""
    repo = Path(__file__).resolve().parent.parent
    status = _git(repo, "status", "--porcelain", "--", ".", ":(exclude)bench")
    return {
        "checkout": str(repo),
        "commit": _git(repo, "rev-parse", "HEAD"),
        "uncommitted_files": None if status is None else len(status.splitlines()),
    }


def _git(repo: Path, *args: str) -> str | None:
    try:
        completed = subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def cpu_model() -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return platform.processor() or None
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return None


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summary(measured: Measured) -> dict[str, object]:
    """The figures: every repeat and the medians, per side, and the medfed/stock ratio."""
    stock_per_round = [run.per_round_s for run in measured.stock]
    medfed_per_round = [round(run.per_round_s, 3) for run in measured.medfed]
    stock_median, medfed_median = median(stock_per_round), median(medfed_per_round)
    ratio = None
    if stock_median and medfed_median is not None:
        ratio = round(medfed_median / stock_median, 2)
    return {
        "stock": {
            "per_round_s": stock_per_round,
            "per_round_s_median": stock_median,
            "strategy_s": [run.strategy_s for run in measured.stock],
            "flwr_run_wall_s": [run.flwr_run_wall_s for run in measured.stock],
            "process_wall_s": [run.process_wall_s for run in measured.stock],
            "load_1min_after": [run.load_1min_after for run in measured.stock],
        },
        "medfed": {
            "per_round_s": medfed_per_round,
            "per_round_s_median": medfed_median,
            "duration_s_by_round": [run.duration_s for run in measured.medfed],
            "wall_s": [run.wall_s for run in measured.medfed],
            "wall_s_median": median([run.wall_s for run in measured.medfed]),
            "slowest_site_train_s_by_round": [run.slowest_train_s for run in measured.medfed],
            "overhead_s_by_round": [run.overhead_s for run in measured.medfed],
            "overhead_s_median": median(
                [o for run in measured.medfed for o in run.overhead_s if o is not None]
            ),
            "load_1min_after": [run.load_1min_after for run in measured.medfed],
        },
        "ratio_medfed_per_round_to_stock_per_round": ratio,
        "ratio_by_repeat": [
            round(m.per_round_s / s.per_round_s, 2) if s.per_round_s else None
            for s, m in zip(measured.stock, measured.medfed, strict=False)
        ],
    }


def failure_record(error: BenchError) -> dict[str, object]:
    return {
        "side": error.side,
        "reason": error.reason,
        "returncode": error.returncode,
        "stderr_tail": error.stderr.strip().splitlines()[-STDERR_TAIL_LINES:],
    }


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    parser.add_argument(
        "--sites", type=int, default=3, help="sites, one SuperNode each (default 3)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side (default 1)")
    parser.add_argument(
        "--baseline", type=Path, default=DEFAULT_BASELINE, help="the stock_flower_rounds.sh to run"
    )
    args = parser.parse_args(argv)
    options = Options(
        rounds=args.rounds, sites=args.sites, repeats=args.repeats, baseline=args.baseline
    )
    for name in ("rounds", "sites", "repeats"):
        if getattr(options, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not options.baseline.is_file():
        parser.error(f"no baseline script at {options.baseline}")
    return options


def main(argv: list[str] | None = None) -> int:
    document = run_benchmark(parse_args(argv))
    sys.stdout.write(json.dumps(document, indent=2) + "\n")
    return 0 if document["ok"] else 1


def run_benchmark(options: Options) -> dict[str, object]:
    """Measure both sides as `options` says; the JSON document (`ok` false if one failed)."""
    venv_bin = str(Path(sys.executable).parent)
    # The baseline needs flower-superlink etc. and a `python3` that imports flwr and torch.
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    date_utc = datetime.now(UTC).isoformat(timespec="seconds")
    machine = machine_facts()
    source = source_facts()
    measured = Measured()
    failure: BenchError | None = None
    try:
        measure(options, env, measured)
    except BenchError as exc:
        failure = exc
        log(f"FAILED: {exc}")
    document: dict[str, object] = {
        "benchmark": "round_time",
        "date_utc": date_utc,
        "ok": failure is None,
        "failure": None if failure is None else failure_record(failure),
        "config": {
            "rounds": options.rounds,
            "sites": options.sites,
            "repeats": options.repeats,
            "order": measured.order,
            "timeout_s": TIMEOUT_S,
            "baseline": str(options.baseline),
        },
        "machine": machine,
        "medfed_source": source,
        **summary(measured),
        "notes": NOTES,
    }
    return document


if __name__ == "__main__":
    sys.exit(main())
