"""Step time and peak memory of DP-SGD against plain SGD: same model, data and batch.

Each variant (plain SGD, then DP-SGD under each grad-sample mode) runs in a fresh
subprocess, so one variant's allocations never colour another's peak; the variants
are interleaved over the repeats (the order rotates each repeat) so drifting machine
load falls on all of them. In each subprocess: build the model and the batch, reset
the memory high-water mark, take warm-up steps, then time each step.

Memory on CPU is the process's peak resident set during the steps minus its resident
set just before them (Linux `/proc/self/status` VmHWM after resetting it through
`/proc/self/clear_refs`); `tracemalloc` does not see torch's allocations. On CUDA it
is `torch.cuda.max_memory_allocated` above the memory allocated before the steps.

    python -m medfed.bench.dp --preset small          (or: medfed bench dp --json ...)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from typing import Any, Literal

Variant = Literal["plain", "hooks", "functorch", "ew", "ghost"]
DP_MODES: tuple[Variant, ...] = ("hooks", "functorch", "ew", "ghost")
TARGETS = {"time_ratio": 1.3, "memory_ratio": 1.5}
"""The issue's targets on CPU; figures are reported, never passed or failed on."""
VARIANT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DpBenchConfig:
    """What to measure: the model preset, batch, steps, modes, repeats and device."""

    preset: str = "small"
    batch: int = 32
    steps: int = 10
    warmup_steps: int = 2
    modes: tuple[Variant, ...] = ("hooks", "ew", "ghost")
    repeats: int = 3
    device: Literal["cpu", "cuda"] = "cpu"
    threads: int = 2
    seed: int = 7

    def __post_init__(self) -> None:
        if self.batch < 1 or self.steps < 1 or self.repeats < 1 or self.warmup_steps < 0:
            raise ValueError("batch, steps and repeats must be at least 1; warm-up at least 0")
        unknown = [mode for mode in self.modes if mode not in DP_MODES]
        if unknown or not self.modes:
            raise ValueError(f"modes must be among {', '.join(DP_MODES)}, got {self.modes}")


@dataclass(frozen=True)
class VariantFigures:
    """One variant's run: median and all step times, and its peak memory above baseline."""

    variant: str
    step_s_median: float
    step_s: list[float]
    cpu_s_median: float
    peak_bytes: int
    baseline_bytes: int
    parameters: int


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current resident set (Linux 4.0+: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def measure_variant(config: DpBenchConfig, variant: Variant) -> VariantFigures:
    """Build the model and batch, then warm up and time `config.steps` steps of `variant`.

    Run this in a fresh process per variant (`main` does): its memory figure is the
    process's own high-water mark.
    """
    import torch
    from torch.utils.data import TensorDataset

    from medfed.bench.workload import BENCH_CONTRACT, synthetic_tensors
    from medfed.model.network import build_model
    from medfed.model.train import LossReducer, mean_loss, train_steps
    from medfed.privacy.dpsgd import DpSgdSettings, make_private

    torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    model = build_model(config.preset, contract=BENCH_CONTRACT, seed=config.seed).to(device)  # type: ignore[arg-type]
    parameters = sum(p.numel() for p in model.parameters())
    batch = tuple(t.to(device) for t in synthetic_tensors(config.batch, seed=config.seed))
    trained: torch.nn.Module = model
    optimizer: torch.optim.Optimizer
    reduce: LossReducer = mean_loss
    if variant == "plain":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    else:
        settings = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0)
        private = make_private(
            model, TensorDataset(*batch), settings=settings, learning_rate=0.01,
            grad_sample_mode=variant,
        )  # fmt: skip
        trained, optimizer, reduce = private.model, private.optimizer, private.reduce_loss

    def step() -> None:
        train_steps(
            trained, optimizer, [batch], steps=1, contract=BENCH_CONTRACT, reduce_loss=reduce
        )

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        baseline = _status_bytes("VmRSS")
    for _ in range(config.warmup_steps):
        step()
    times, cpu_times = [], []
    for _ in range(config.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_bytes("VmHWM")
    return VariantFigures(
        variant=variant,
        step_s_median=statistics.median(times),
        step_s=[round(t, 6) for t in times],
        cpu_s_median=statistics.median(cpu_times),
        peak_bytes=max(0, peak - baseline),
        baseline_bytes=baseline,
        parameters=parameters,
    )


def _run_variant(config: DpBenchConfig, variant: Variant) -> VariantFigures:
    """`measure_variant` in a fresh interpreter; its JSON figures come back on stdout."""
    command = [
        sys.executable,
        "-m",
        "medfed.bench.dp",
        "--variant",
        variant,
        json.dumps(asdict(config)),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}  # Opacus's and torch's chatter on stderr
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=VARIANT_TIMEOUT_S, env=env, check=False
    )
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"variant {variant} failed (exit {done.returncode}): {tail}")
    return VariantFigures(**json.loads(done.stdout.strip().splitlines()[-1]))


def _machine(config: DpBenchConfig) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for package in ("torch", "opacus"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **versions,
        "loadavg_at_start": list(os.getloadavg()),
        "torch_threads": config.threads,
    }


def _summary(runs: Sequence[VariantFigures]) -> dict[str, Any]:
    return {
        "step_s_median": statistics.median(r.step_s_median for r in runs),
        "step_s_by_repeat": [round(r.step_s_median, 6) for r in runs],
        "step_s_best": min(r.step_s_median for r in runs),
        "cpu_s_median": statistics.median(r.cpu_s_median for r in runs),
        "cpu_s_by_repeat": [round(r.cpu_s_median, 6) for r in runs],
        "peak_bytes_median": int(statistics.median(r.peak_bytes for r in runs)),
        "peak_bytes_by_repeat": [r.peak_bytes for r in runs],
    }


def run_dp_bench(
    config: DpBenchConfig, *, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Measure plain SGD and each DP mode, interleaved; return the JSON document."""
    variants: list[Variant] = ["plain", *config.modes]
    runs: dict[str, list[VariantFigures]] = {v: [] for v in variants}
    machine = _machine(config)
    for repeat in range(config.repeats):
        shift = repeat % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            if progress is not None:
                progress(f"repeat {repeat + 1}/{config.repeats}: {variant}")
            runs[variant].append(_run_variant(config, variant))
    plain = _summary(runs["plain"])
    modes: dict[str, Any] = {}
    for mode in config.modes:
        figures = _summary(runs[mode])
        figures["time_ratio"] = round(figures["step_s_median"] / plain["step_s_median"], 3)
        figures["cpu_time_ratio"] = round(figures["cpu_s_median"] / plain["cpu_s_median"], 3)
        figures["best_time_ratio"] = round(figures["step_s_best"] / plain["step_s_best"], 3)
        figures["memory_ratio"] = (
            round(figures["peak_bytes_median"] / plain["peak_bytes_median"], 3)
            if plain["peak_bytes_median"] > 0
            else None
        )
        modes[mode] = figures
    return {
        "benchmark": "dp",
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": asdict(config),
        "machine": machine,
        "model": {"preset": config.preset, "parameters": runs["plain"][0].parameters},
        "memory_method": (
            "torch.cuda.max_memory_allocated above the allocation before the steps"
            if config.device == "cuda"
            else "peak resident set (VmHWM, reset via /proc/self/clear_refs) above the"
            " resident set before the steps, in a fresh process per variant"
        ),
        "plain": plain,
        "dp": modes,
        "targets": TARGETS,
        "notes": [
            "Same model (seeded), batch and contract for every variant; DP-SGD steps take"
            " the whole batch (no Poisson sampling) so that every variant does the same work.",
            "time_ratio and memory_ratio are DP over plain, medians over the repeats of each"
            " run's median step time and peak memory above baseline.",
            "cpu_time_ratio is the same over the process's CPU time per step (all threads);"
            " best_time_ratio divides the fastest repeat of each variant (as timeit does):"
            " on a shared machine, where other work slows some runs, it is the least biased.",
        ],
    }


def _variant_main(variant: str, config_json: str) -> None:
    raw = json.loads(config_json)
    raw["modes"] = tuple(raw["modes"])
    figures = measure_variant(DpBenchConfig(**raw), variant)  # type: ignore[arg-type]
    sys.stdout.write(json.dumps(asdict(figures)) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m medfed.bench.dp [options]`: the same benchmark as `medfed bench dp --json`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m medfed.bench.dp", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--preset", default="small", help="tiny, small, base or large")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--batch", type=int, default=32, help="patients per batch")
    parser.add_argument(
        "--mode", action="append", choices=DP_MODES, help="grad-sample mode (repeatable)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per variant")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--variant", nargs=2, help=argparse.SUPPRESS)  # one subprocess's run
    args = parser.parse_args(argv)
    if args.variant is not None:
        _variant_main(*args.variant)
        return 0
    try:
        config = DpBenchConfig(
            preset=args.preset, batch=args.batch, steps=args.steps, repeats=args.repeats,
            modes=tuple(args.mode or ("hooks", "ew", "ghost")), device=args.device,
            threads=args.threads,
        )  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))
    report = run_dp_bench(config, progress=lambda line: print(line, file=sys.stderr))
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
