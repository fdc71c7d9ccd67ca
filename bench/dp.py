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

Model FLOPs per step are counted, not estimated: torch's `FlopCounterMode` over one
plain step (forward and backward, every matmul and attention product). Each variant's
achieved FLOP/s is those model FLOPs over its step time (DP's extra work is not counted
as useful), and its fraction of the device's peak uses `PEAK_TFLOPS` (dense, by device
name and precision) or `--peak-tflops`; on a CPU no peak is assumed unless given.

    python -m medfed.bench.dp --preset small [--mode bk --mode hooks] [--precision bf16]
    medfed bench dp --json ...                           (the same through the CLI)
"""

from __future__ import annotations

import argparse
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

Variant = Literal["plain", "bk", "hooks", "functorch", "ew", "ghost"]
DP_MODES: tuple[Variant, ...] = ("bk", "hooks", "functorch", "ew", "ghost")
DEFAULT_MODES: tuple[Variant, ...] = ("bk", "hooks", "ew", "ghost")
TARGETS = {"time_ratio": 1.2, "memory_ratio": 1.2}
"""The targets, DP over plain at the same precision; reported, never passed or failed on."""
VARIANT_TIMEOUT_S = 600.0

PEAK_TFLOPS: dict[tuple[str, str], float] = {
    ("H200", "bf16"): 989.0,
    ("H200", "fp32"): 67.0,
    ("H100", "bf16"): 989.0,
    ("H100", "fp32"): 67.0,
    ("A100", "bf16"): 312.0,
    ("A100", "fp32"): 19.5,
    ("L40S", "bf16"): 362.0,
    ("L40S", "fp32"): 91.6,
}
"""Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets (SXM parts), by a name
the device's name contains and the precision; fp32 is plain FP32 (torch does not use
TF32 for matmuls by default). Other devices: pass `--peak-tflops`."""


@dataclass(frozen=True)
class DpBenchConfig:
    """What to measure: the model preset, batch, steps, modes, repeats and device."""

    preset: str = "small"
    batch: int = 32
    steps: int = 10
    warmup_steps: int = 2
    modes: tuple[Variant, ...] = DEFAULT_MODES
    repeats: int = 3
    device: Literal["cpu", "cuda"] = "cpu"
    threads: int = 2
    seed: int = 7
    precision: Literal["fp32", "bf16"] = "fp32"
    physical_batch: int | None = None
    """Rows per forward/backward (plain and bk only); None: the whole batch at once."""
    peak_tflops: float | None = None
    """The device's dense peak at this precision; None: `PEAK_TFLOPS` by device name."""

    def __post_init__(self) -> None:
        if self.batch < 1 or self.steps < 1 or self.repeats < 1 or self.warmup_steps < 0:
            raise ValueError("batch, steps and repeats must be at least 1; warm-up at least 0")
        unknown = [mode for mode in self.modes if mode not in DP_MODES]
        if unknown or not self.modes:
            raise ValueError(f"modes must be among {', '.join(DP_MODES)}, got {self.modes}")
        if self.physical_batch is not None and set(self.modes) - {"bk"}:
            raise ValueError("physical batches run with mode bk only")


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
    tokens_per_step: int
    model_flops_per_step: int
    """Counted on one plain step (forward and backward); 0 in DP variants' own runs."""


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


def _tokens_per_step(model: Any, batch: tuple[Any, ...]) -> int:
    """Positions the fusion transformer reads for the whole batch (its fusion token and
    every document's tokens); one per patient for a network without a fusion stage."""
    import torch

    from medfed.bench.workload import BENCH_CONTRACT
    from medfed.model.tokenizers import split_tensors

    fusion = getattr(model, "fusion", None)
    if fusion is None:
        return int(batch[0].shape[0])
    seen: list[int] = []

    def hook(_module: Any, inputs: tuple[Any, ...]) -> None:
        documents = inputs[0]
        patients = int(documents[0][0].shape[0]) if documents else 0
        seen.append(patients + sum(int(t.shape[0] * t.shape[1]) for t, _ in documents))

    handle = fusion.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(*split_tensors(BENCH_CONTRACT, batch)[0])
    finally:
        handle.remove()
    return seen[0]


def measure_variant(config: DpBenchConfig, variant: Variant) -> VariantFigures:
    """Build the model and batch, then warm up and time `config.steps` steps of `variant`.

    Run this in a fresh process per variant (`main` does): its memory figure is the
    process's own high-water mark.
    """
    import torch
    from torch.utils.data import TensorDataset
    from torch.utils.flop_counter import FlopCounterMode

    from medfed.bench.workload import BENCH_CONTRACT, synthetic_tensors
    from medfed.model.network import build_model
    from medfed.model.precision import autocast_dtype
    from medfed.model.train import LossReducer, mean_loss, train_steps
    from medfed.privacy.dpsgd import DpSgdSettings, make_private, plain_sgd

    torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    model = build_model(config.preset, contract=BENCH_CONTRACT, seed=config.seed).to(device)  # type: ignore[arg-type]
    parameters = sum(p.numel() for p in model.parameters())
    batch = tuple(t.to(device) for t in synthetic_tensors(config.batch, seed=config.seed))
    tokens = _tokens_per_step(model, batch)
    trained: torch.nn.Module = model
    optimizer: torch.optim.Optimizer
    reduce: LossReducer = mean_loss
    if variant == "plain":
        optimizer = plain_sgd(model, 0.01)
    else:
        settings = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0)
        private = make_private(
            model, TensorDataset(*batch), settings=settings, learning_rate=0.01,
            grad_sample_mode=variant,
        )  # fmt: skip
        trained, optimizer, reduce = private.model, private.optimizer, private.reduce_loss

    def step() -> None:
        train_steps(
            trained, optimizer, [batch], steps=1, contract=BENCH_CONTRACT, reduce_loss=reduce,
            physical_batch_size=config.physical_batch,
            autocast_dtype=autocast_dtype(config.precision),
        )  # fmt: skip

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
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_bytes("VmHWM")
    flops = 0
    if variant == "plain":  # counted on one more, untimed step, after the memory figures
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops = int(counter.get_total_flops())
    return VariantFigures(
        variant=variant,
        step_s_median=statistics.median(times),
        step_s=[round(t, 6) for t in times],
        cpu_s_median=statistics.median(cpu_times),
        peak_bytes=max(0, peak - baseline),
        baseline_bytes=baseline,
        parameters=parameters,
        tokens_per_step=tokens,
        model_flops_per_step=flops,
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
    device_name = "cpu"
    if config.device == "cuda":
        import torch

        device_name = torch.cuda.get_device_name(0)
    return {
        "device_name": device_name,
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


def assumed_peak(config: DpBenchConfig, device_name: str) -> tuple[float | None, str]:
    """The peak FLOP/s the fractions divide by, and where that figure comes from."""
    if config.peak_tflops is not None:
        return config.peak_tflops * 1e12, f"{config.peak_tflops} TFLOP/s, given (--peak-tflops)"
    if config.device == "cuda":
        for (name, precision), tflops in PEAK_TFLOPS.items():
            if name in device_name and precision == config.precision:
                return tflops * 1e12, (
                    f"{tflops} TFLOP/s: {name}'s dense {precision} peak from NVIDIA's data sheet"
                )
    return None, (
        "none assumed (a CPU's peak depends on its vector units, clock and the threads"
        " torch uses; pass --peak-tflops): only achieved FLOP/s are reported"
    )


def _throughput(
    figures: dict[str, Any], flops: int, tokens: int, batch: int, peak: float | None
) -> None:
    step_s = figures["step_s_median"]
    figures["tokens_per_s"] = round(tokens / step_s, 1)
    figures["patients_per_s"] = round(batch / step_s, 2)
    figures["model_flops_per_s"] = round(flops / step_s)
    figures["fraction_of_peak"] = None if peak is None else round(flops / step_s / peak, 4)


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
    flops = runs["plain"][0].model_flops_per_step
    tokens = runs["plain"][0].tokens_per_step
    peak, peak_source = assumed_peak(config, str(machine["device_name"]))
    _throughput(plain, flops, tokens, config.batch, peak)
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
        _throughput(figures, flops, tokens, config.batch, peak)
        modes[mode] = figures
    return {
        "benchmark": "dp",
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": asdict(config),
        "machine": machine,
        "model": {
            "preset": config.preset,
            "parameters": runs["plain"][0].parameters,
            "tokens_per_step": tokens,
            "model_flops_per_step": flops,
            "flops_method": "torch.utils.flop_counter.FlopCounterMode over one plain step"
            " (forward and backward)",
        },
        "peak_flops_per_s": peak,
        "peak_assumed": peak_source,
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
            "model_flops_per_s and fraction_of_peak count the plain step's FLOPs over each"
            " variant's median step time: DP's extra work is overhead, not useful FLOPs.",
        ],
    }


def _variant_main(variant: str, config_json: str) -> None:
    raw = json.loads(config_json)
    raw["modes"] = tuple(raw["modes"])
    figures = measure_variant(DpBenchConfig(**raw), variant)  # type: ignore[arg-type]
    sys.stdout.write(json.dumps(asdict(figures)) + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m medfed.bench.dp",
        description="Step time, peak memory, FLOP/s and tokens/s of DP-SGD against plain"
        " SGD on the same model, batch and precision; one JSON document on stdout.",
    )
    parser.add_argument("--preset", default="small", choices=("tiny", "small", "base", "large"))
    parser.add_argument("--batch", type=int, default=32, help="patients per batch")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument(
        "--mode", action="append", choices=DP_MODES, help="grad-sample mode (repeatable)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per variant")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--physical-batch", type=int, default=None, help="rows per pass (bk)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--variant", nargs=2, help=argparse.SUPPRESS)  # one subprocess's run
    return parser


def _config(parser: argparse.ArgumentParser, arguments: argparse.Namespace) -> DpBenchConfig:
    try:
        return DpBenchConfig(
            preset=arguments.preset, batch=arguments.batch, steps=arguments.steps,
            warmup_steps=arguments.warmup_steps, modes=tuple(arguments.mode or DEFAULT_MODES),
            repeats=arguments.repeats, device=arguments.device, threads=arguments.threads,
            precision=arguments.precision, physical_batch=arguments.physical_batch,
            peak_tflops=arguments.peak_tflops,
        )  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))


def parse_arguments(argv: Sequence[str]) -> DpBenchConfig:
    """`python -m medfed.bench.dp` options as a config (`--help` prints and exits)."""
    parser = _parser()
    return _config(parser, parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m medfed.bench.dp [options]`: the same benchmark as `medfed bench dp --json`."""
    parser = _parser()
    arguments = parser.parse_args(argv)
    if arguments.variant is not None:
        _variant_main(*arguments.variant)
        return 0
    config = _config(parser, arguments)
    report = run_dp_bench(config, progress=lambda line: print(line, file=sys.stderr))
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
