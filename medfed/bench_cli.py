"""`medfed bench ...`: benchmarks that print figures (never pass/fail on timing).

A Typer sub-app, one command per benchmark; `medfed/cli.py` registers it as `bench`.
The benchmarks themselves live in the `bench` package.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

bench_app = typer.Typer(help="Benchmarks that print figures as JSON.", no_args_is_help=True)


@bench_app.command("round")
def bench_round(
    rounds: Annotated[int, typer.Option(min=1, max=100, help="Rounds per run.")] = 3,
    sites: Annotated[int, typer.Option(min=1, max=16, help="Sites, one daemon each.")] = 3,
    repeats: Annotated[int, typer.Option(min=1, max=10, help="Runs of each side.")] = 1,
    baseline: Annotated[
        Path, typer.Option(help="The stock Flower baseline script (stock_flower_rounds.sh).")
    ] = Path("/work/shared/baselines/stock_flower_rounds.sh"),
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
) -> None:
    """Seconds per round of `medfed demo` (TLS, SuperNode auth, DP, site daemons) beside a
    stock Flower deployment in the same run; the ratio of their round wall times, and
    medfed's round overhead (round time minus the slowest site's local training)."""
    from bench.round_time import Options, run_benchmark
    from medfed import cli

    if not baseline.is_file():
        cli._fail(f"no baseline script at {baseline}", 2)
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
            cli.stdout.print(Text(line))
    if not document["ok"]:
        failure = document["failure"]
        cli._fail(f"the benchmark failed: {failure}")


def _numbers(text: str, *, name: str) -> list[int]:
    try:
        values = [int(float(part)) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(value < 1 for value in values):
        from medfed import cli

        cli._fail(f"--{name}: expected positive numbers separated by commas, got {text!r}", 2)
    return values


@bench_app.command("secagg")
def bench_secagg(
    sites: Annotated[str, typer.Option(help="Site counts, comma-separated.")] = "3,5,10",
    params: Annotated[str, typer.Option(help="Parameter counts, e.g. 1e5,1e6.")] = "1e5,1e6",
    repeats: Annotated[int, typer.Option(min=1, max=20, help="Rounds per row.")] = 1,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
) -> None:
    """Secure aggregation (mask, share, unmask, in-process) beside a plain float32 sum:
    seconds and bytes uploaded per site, side by side."""
    from bench.secagg import Options, run_benchmark
    from medfed import cli

    site_counts, param_counts = _numbers(sites, name="sites"), _numbers(params, name="params")
    if min(site_counts) < 2:
        cli._fail("--sites: secure aggregation needs at least 2 sites", 2)
    document = run_benchmark(Options(site_counts, param_counts, repeats))
    if as_json:
        sys.stdout.write(json.dumps(document) + "\n")
        return
    rows = document["rows"]
    assert isinstance(rows, list)
    for row in rows:
        cli.stdout.print(
            Text(
                f"{row['sites']} sites, {row['params']} params: plain sum {row['plain_sum_s']} s,"
                f" SecAgg serial {row['secagg_round_serial_s']} s, critical path"
                f" {row['critical_path_s']} s; upload x{row['upload_ratio_secagg_to_float32']}"
                " of float32"
            )
        )
