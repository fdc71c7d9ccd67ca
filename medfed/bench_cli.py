"""`medfed bench ...`: benchmarks that print figures (never pass or fail on them).

A Typer sub-app of its own, registered by `medfed.cli`; other benchmarks add their
commands to `bench_app`. Heavy imports happen inside each command.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from medfed.cli_common import fail, stderr, stdout

bench_app = typer.Typer(
    help="Benchmarks: DP-SGD cost and more; figures as a table or one JSON document.",
    no_args_is_help=True,
)

_MODES = ("bk", "hooks", "functorch", "ew", "ghost")


def _megabytes(value: int) -> str:
    return f"{value / 2**20:.1f}"


def _render(report: dict[str, Any]) -> None:
    from rich.table import Table

    config = report["config"]
    table = Table(
        title=(
            f"DP-SGD vs plain SGD: preset {config['preset']} ({report['model']['parameters']:,}"
            f" parameters), batch {config['batch']}, {config['device']},"
            f" {config['threads']} threads, {config['repeats']} repeats"
        )
    )
    columns = ("variant", "step (ms)", "CPU (ms)", "peak memory (MiB)", "time ratio",
               "best-run ratio", "CPU ratio", "memory ratio", "tokens/s", "model GFLOP/s",
               "of peak")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right" if column != "variant" else "left")
    plain = report["plain"]
    table.add_row(
        "plain SGD",
        f"{plain['step_s_median'] * 1000:.1f}",
        f"{plain['cpu_s_median'] * 1000:.1f}",
        _megabytes(plain["peak_bytes_median"]),
        "1",
        "1",
        "1",
        "1",
        *_rates(plain),
    )
    for mode, figures in report["dp"].items():
        memory_ratio = figures["memory_ratio"]
        table.add_row(
            f"DP-SGD {mode}",
            f"{figures['step_s_median'] * 1000:.1f}",
            f"{figures['cpu_s_median'] * 1000:.1f}",
            _megabytes(figures["peak_bytes_median"]),
            f"{figures['time_ratio']:.2f}",
            f"{figures['best_time_ratio']:.2f}",
            f"{figures['cpu_time_ratio']:.2f}",
            "n/a" if memory_ratio is None else f"{memory_ratio:.2f}",
            *_rates(figures),
        )
    stdout.print(table)
    targets = report["targets"]
    stdout.print(
        f"targets: time ratio <= {targets['time_ratio']}, memory ratio <="
        f" {targets['memory_ratio']}; memory: {report['memory_method']}; model FLOPs per"
        f" step {report['model']['model_flops_per_step']:.4g} ({config['precision']});"
        f" peak: {report['peak_assumed']}",
        soft_wrap=True,
    )


def _rates(figures: dict[str, Any]) -> tuple[str, str, str]:
    fraction = figures["fraction_of_peak"]
    return (
        f"{figures['tokens_per_s']:.0f}",
        f"{figures['model_flops_per_s'] / 1e9:.1f}",
        "n/a" if fraction is None else f"{fraction:.1%}",
    )


@bench_app.command("dp")
def bench_dp(
    preset: Annotated[str, typer.Option(help="Model preset: tiny, small, base or large.")] = (
        "small"
    ),
    steps: Annotated[int, typer.Option(min=1, max=10_000, help="Timed steps per run.")] = 10,
    batch: Annotated[int, typer.Option(min=1, max=65_536, help="Patients per batch.")] = 32,
    mode: Annotated[
        list[str] | None,
        typer.Option(help="Grad-sample mode (repeat): bk, hooks, functorch, ew, ghost."),
    ] = None,
    repeats: Annotated[
        int, typer.Option(min=1, max=100, help="Interleaved runs of each variant.")
    ] = 3,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    precision: Annotated[str, typer.Option(help="fp32, or bf16 autocast (both sides).")] = ("fp32"),
    physical_batch: Annotated[
        int | None, typer.Option(min=1, help="Rows per forward/backward (mode bk only).")
    ] = None,
    peak_tflops: Annotated[
        float | None, typer.Option(min=0.001, help="The device's dense peak, TFLOP/s.")
    ] = None,
    threads: Annotated[int, typer.Option(min=1, max=256, help="torch threads per run.")] = 2,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
) -> None:
    """Step time, peak memory, tokens/s and FLOP/s of DP-SGD vs plain SGD on the same model,
    data, batch and precision."""
    from medfed.bench.dp import DEFAULT_MODES, DpBenchConfig, run_dp_bench
    from medfed.model.presets import PRESET_NAMES

    if preset not in PRESET_NAMES:
        fail(f"unknown preset {preset!r}; choose from {', '.join(sorted(PRESET_NAMES))}", 2)
    modes = tuple(mode or DEFAULT_MODES)
    unknown = [name for name in modes if name not in _MODES]
    if unknown:
        fail(f"unknown grad-sample mode {unknown[0]!r}; choose from {', '.join(_MODES)}", 2)
    if device not in ("cpu", "cuda"):
        fail(f"unknown device {device!r}; choose cpu or cuda", 2)
    if precision not in ("fp32", "bf16"):
        fail(f"unknown precision {precision!r}; choose fp32 or bf16", 2)
    if physical_batch is not None and set(modes) - {"bk"}:
        fail("--physical-batch runs with --mode bk only", 2)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail("device cuda was asked for, but torch sees no CUDA device here")
    config = DpBenchConfig(
        preset=preset, batch=batch, steps=steps, modes=modes, repeats=repeats,  # type: ignore[arg-type]
        device=device, threads=threads, precision=precision,  # type: ignore[arg-type]
        physical_batch=physical_batch, peak_tflops=peak_tflops,
    )  # fmt: skip
    show = None if as_json or not stderr.is_terminal else stderr.print
    try:
        report = run_dp_bench(config, progress=show)
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
        fail(f"the benchmark failed: {exc}")
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        _render(report)


@bench_app.command("round")
def bench_round(
    rounds: Annotated[int, typer.Option(min=1, max=100, help="Rounds per run.")] = 3,
    sites: Annotated[int, typer.Option(min=1, max=16, help="Sites, one daemon each.")] = 3,
    repeats: Annotated[int, typer.Option(min=1, max=10, help="Runs of each side.")] = 1,
    baseline: Annotated[
        Path | None,
        typer.Option(
            help="The stock Flower baseline script (default: the one medfed ships,"
            " bench/baselines/stock_flower_rounds.sh)."
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
) -> None:
    """Seconds per round of `medfed demo` (TLS, SuperNode auth, DP, site daemons) beside a
    stock Flower deployment in the same run; the ratio of their round wall times, and
    medfed's round overhead (round time minus the slowest site's local training)."""
    from medfed.bench.round_time import DEFAULT_BASELINE, Options, run_benchmark

    baseline = baseline or DEFAULT_BASELINE
    if not baseline.is_file():
        fail(f"no baseline script at {baseline}", 2)
    document = run_benchmark(
        Options(rounds=rounds, sites=sites, repeats=repeats, baseline=baseline)
    )
    if as_json:
        sys.stdout.write(json.dumps(document) + "\n")
    else:
        medfed, stock = document["medfed"], document["stock"]
        assert isinstance(medfed, dict) and isinstance(stock, dict)
        lines = [
            f"stock Flower: {stock['per_round_s_median']} s per round",
            f"medfed: {medfed['per_round_s_median']} s per round, overhead"
            f" {medfed['overhead_s_median']} s beyond the slowest site's training",
            f"ratio medfed/stock: {document['ratio_medfed_per_round_to_stock_per_round']}",
        ]
        for line in lines:
            stdout.print(Text(line))
    if not document["ok"]:
        failure = document["failure"]
        fail(f"the benchmark failed: {failure}")


def _numbers(text: str, *, name: str) -> list[int]:
    try:
        values = [int(float(part)) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(value < 1 for value in values):
        fail(f"--{name}: expected positive numbers separated by commas, got {text!r}", 2)
    return values


@bench_app.command("secagg")
def bench_secagg(
    sites: Annotated[str, typer.Option(help="Site counts, comma-separated.")] = "3,5,10",
    params: Annotated[str, typer.Option(help="Parameter counts, e.g. 1e5,1e6.")] = "1e5,1e6",
    repeats: Annotated[int, typer.Option(min=1, max=20, help="Rounds per row.")] = 1,
    demo_rounds: Annotated[
        int,
        typer.Option(
            min=0,
            max=100,
            help="Also run `medfed demo` with and without secure aggregation, this many rounds"
            " each (minutes); 0: skip.",
        ),
    ] = 0,
    demo_sites: Annotated[int, typer.Option(min=2, max=16, help="Sites of each demo.")] = 3,
    demo_repeats: Annotated[
        int, typer.Option(min=1, max=10, help="Pairs of demos, alternating which goes first.")
    ] = 1,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
) -> None:
    """Secure aggregation's real message protocol (keys, train, reveal; in-process)
    beside a plain round's packing and averaging: seconds per step and bytes uploaded per
    site; with --demo-rounds, real demo rounds with and without it."""
    from medfed.bench.secagg import Options, ProtocolBenchError, run_benchmark
    from medfed.bench.secagg_demo import DemoComparison, compare
    from medfed.privacy.errors import PrivacyError

    site_counts, param_counts = _numbers(sites, name="sites"), _numbers(params, name="params")
    if min(site_counts) < 2:
        fail("--sites: secure aggregation needs at least 2 sites", 2)
    try:
        document = run_benchmark(Options(site_counts, param_counts, repeats))
    except (PrivacyError, ProtocolBenchError) as exc:
        fail(f"the secure-aggregation protocol failed: {exc}")
    if demo_rounds:
        options = DemoComparison(rounds=demo_rounds, sites=demo_sites, repeats=demo_repeats)
        document["demo_rounds"] = compare(options)
    if as_json:
        sys.stdout.write(json.dumps(document) + "\n")
    else:
        _render_secagg(document)
    demo = document.get("demo_rounds")
    if isinstance(demo, dict) and not demo["ok"]:
        fail(f"the demo comparison failed: {demo['failure']}")


def _render_secagg(document: dict[str, Any]) -> None:
    for row in document["rows"]:
        secure, plain = row["secure"], row["plain"]
        stdout.print(
            Text(
                f"{row['sites']} sites, {row['params']:,} params: critical path secure"
                f" {secure['critical_path_s']} s vs plain {plain['critical_path_s']} s (serial"
                f" {secure['serial_s']} s vs {plain['serial_s']} s); upload"
                f" x{row['upload_ratio_secure_to_float32']} of float32; error"
                f" {row['max_abs_error_weighted_sum']:.2g} (bound"
                f" {row['error_bound_weighted_sum']:.2g})"
            )
        )
    demo = document.get("demo_rounds")
    if isinstance(demo, dict) and demo["ok"]:
        stdout.print(
            Text(
                f"demo, {demo['sites']} sites x {demo['rounds']} rounds: median round secure"
                f" {demo['secure']['duration_s_median']} s, plain"
                f" {demo['plain']['duration_s_median']} s, ratio {demo['ratio_secure_to_plain']}"
            )
        )


def _epsilons(text: str) -> list[float]:
    import math

    values: list[float] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            value = math.inf if part.lower() in ("inf", "none") else float(part)
        except ValueError:
            value = -1.0
        if not value > 0:
            fail(f"--epsilon: expected positive numbers or inf, got {part!r}", 2)
        values.append(value)
    return values


@bench_app.command("idle")
def bench_idle(
    sites: Annotated[int, typer.Option(min=1, max=16, help="Site daemons.")] = 3,
    idle_s: Annotated[
        float, typer.Option(min=10, max=3600, help="Seconds of idling measured.")
    ] = 120.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
) -> None:
    """What site daemons cost while busy (their first minute) and idle (after it), as a
    share of one core per site, and how soon idle sites pick up a new run (minutes)."""
    from medfed.bench.idle import IdleOptions, run_idle_bench
    from medfed.errors import MedfedError

    try:
        document = run_idle_bench(IdleOptions(sites=sites, idle_s=idle_s))
    except MedfedError as exc:
        fail(f"the idle benchmark failed: {exc}")
    if as_json:
        sys.stdout.write(json.dumps(document) + "\n")
        return
    busy, idle = document["busy"], document["idle"]
    stdout.print(
        Text(
            f"{sites} site daemons: busy {busy['per_site_core_share_mean']:.2%} of a core per"
            f" site, idle {idle['per_site_core_share_mean']:.2%} (max"
            f" {idle['per_site_core_share_max']:.2%}); SuperLink busy"
            f" {busy['superlink_core_share']:.2%}, idle {idle['superlink_core_share']:.2%};"
            f" a new run reached the first idle site {document['new_run_pickup_s']} s after"
            " it started"
        )
    )


@bench_app.command("scale")
def bench_scale(
    sites: Annotated[
        str, typer.Option(help="Virtual site counts (Flower's simulation), comma-separated.")
    ] = "10,50,100,200",
    real: Annotated[
        str, typer.Option(help="Real site daemon counts, comma-separated; empty: none.")
    ] = "3,6",
    rounds: Annotated[int, typer.Option(min=1, max=20, help="Rounds of each run.")] = 2,
    local_steps: Annotated[
        int, typer.Option(min=1, max=1000, help="DP-SGD steps per site and round.")
    ] = 3,
    run_timeout_s: Annotated[
        float, typer.Option(min=60, max=7200, help="Seconds one run may take; then it stops.")
    ] = 900.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
) -> None:
    """How the coordinator's seconds, CPU and memory per round and the bytes each site
    sends and receives per round grow with the number of sites, plain and secure rounds
    side by side, and the growth exponents (minutes)."""
    from medfed.bench.scale import (
        MAX_REAL_SITES,
        ScaleOptions,
        interrupt_on_sigterm,
        run_scale_bench,
        table_lines,
    )
    from medfed.bench.scale_fit import parse_site_counts
    from medfed.demo import MAX_SIMULATED_SITES

    try:
        options = ScaleOptions(
            sites=parse_site_counts(sites, most=MAX_SIMULATED_SITES, option="--sites"),
            real=parse_site_counts(real, most=MAX_REAL_SITES, option="--real"),
            rounds=rounds, local_steps=local_steps, run_timeout_s=run_timeout_s,
        )  # fmt: skip
    except ValueError as exc:
        fail(str(exc), 2)
    if not options.sites and not options.real:
        fail("--sites and --real are both empty: nothing to measure", 2)
    interrupt_on_sigterm()
    document = run_scale_bench(options, progress=lambda line: stderr.print(Text(line)))
    if as_json:
        sys.stdout.write(json.dumps(document) + "\n")
        return
    for line in table_lines(document):
        stdout.print(Text(line))


@bench_app.command("utility")
def bench_utility(
    study: Annotated[
        list[str] | None,
        typer.Option(help="Example study (repeat the option): lung, breast, freesolv, amp."),
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, max=20, help="Seeds per arm.")] = 3,
    epsilon: Annotated[
        str, typer.Option(help="Epsilons of the federated arms, comma-separated; inf: no DP.")
    ] = "1,3,8,inf",
    rounds: Annotated[
        int | None,
        typer.Option(min=1, max=1000, help="Replace each study's round count (quick checks)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write utility.json and PNG plots here; docs/benchmarks also"
            " rewrites docs/benchmarks.md."
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
) -> None:
    """Learning quality on the example consortia: pooled classical and medfed models, each
    site alone, federated without and with DP at each epsilon (the real round loop)."""
    from medfed.bench.utility import STUDIES, run_utility_bench
    from medfed.bench.utility_report import table_rows, write_report

    names = tuple(study or STUDIES)
    unknown = [name for name in names if name not in STUDIES]
    if unknown:
        fail(f"unknown study {unknown[0]!r}; choose from {', '.join(STUDIES)}", 2)
    command = "medfed bench utility " + " ".join(
        [*(f"--study {n}" for n in study or ()), f"--seeds {seeds}", f"--epsilon {epsilon}"]
        + ([f"--rounds {rounds}"] if rounds else [])
        + ([f"--out {out}"] if out else [])
    )

    def show(line: str) -> None:
        if not as_json and stderr.is_terminal:
            stderr.print(Text(line))

    document = run_utility_bench(
        names,
        seeds=seeds,
        epsilons=_epsilons(epsilon),
        command=command,
        rounds=rounds,
        progress=show,
    )
    if out is not None:
        for path in write_report(document, out):
            stderr.print(Text(f"wrote {path}"))
    if as_json:
        sys.stdout.write(json.dumps(document) + "\n")
        return
    from rich.table import Table

    header, rows = table_rows(document)
    table = Table(title="Held-out metric on the example consortia (mean ± std over seeds)")
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    stdout.print(table)


@bench_app.command("ask")
def bench_ask(
    epsilon: Annotated[
        str, typer.Option(help="Per-site epsilons of the query, comma-separated.")
    ] = "1,3,10",
    repeats: Annotated[int, typer.Option(min=1, max=10_000, help="DP answers per epsilon.")] = 100,
    daemons: Annotated[
        int, typer.Option(min=0, max=16, help="Also time a query over this many site daemons.")
    ] = 0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
) -> None:
    """`medfed ask`'s answers beside pooled lifelines fits (no DP), the coverage of its DP
    intervals per epsilon, and with --daemons its time over real site daemons."""
    from medfed.bench.ask import AskBenchOptions, run_ask_bench
    from medfed.errors import MedfedError

    try:
        epsilons = tuple(float(part) for part in epsilon.split(",") if part.strip())
    except ValueError:
        epsilons = ()
    if not epsilons or not all(0 < e <= 100 for e in epsilons):
        fail(f"--epsilon: expected numbers in (0, 100] separated by commas, got {epsilon!r}", 2)
    try:
        document = run_ask_bench(
            AskBenchOptions(epsilons=epsilons, repeats=repeats, daemons=daemons)
        )
    except MedfedError as exc:
        fail(f"the ask benchmark failed: {exc}")
    if as_json:
        sys.stdout.write(json.dumps(document) + "\n")
        return
    equal = document["equality"]
    stdout.print(Text(
        f"Cox stratified by site: max relative difference to lifelines"
        f" {equal['cox_stratified']['max_relative_difference']:.2e}; pooled risk sets"
        f" {equal['cox_pooled_risk_sets']['max_relative_difference']:.2e}; KM"
        f" {equal['kaplan_meier_max_abs_difference']:.1e}"
    ))  # fmt: skip
    for row in document["dp"]:
        stdout.print(Text(json.dumps(row)))
    if "end_to_end" in document:
        stdout.print(Text(json.dumps(document["end_to_end"])))
