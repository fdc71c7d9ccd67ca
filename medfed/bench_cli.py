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
