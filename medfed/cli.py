"""The `medfed` command line (Typer). Thin: it parses options, calls the rooms, renders.

Every command that reports takes `--json` and then prints one JSON document on
stdout; logs go to stderr. Exit codes: 0 ok, 1 the checked thing is wrong, 2 usage.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from types import FrameType
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from medfed.errors import MedfedError

app = typer.Typer(
    name="medfed",
    help="Federated learning for hospital consortia, with differential privacy, over Flower.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stderr = Console(stderr=True)
stdout = Console()


def _fail(message: str, code: int = 1) -> NoReturn:
    # The message is plain text: brackets in it (`flwr[simulation]`) are not markup.
    stderr.print(Text.assemble(("medfed: error: ", "bold red"), message), soft_wrap=True)
    raise typer.Exit(code)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _round_table(results: object) -> Table:
    from coordinator.results import RunResults

    assert isinstance(results, RunResults)
    table = Table(title=f"run {results.run_id}: {results.rounds_completed} rounds")
    table.add_column("round", justify="right")
    table.add_column("sites")
    table.add_column("train loss (global)", justify="right")
    table.add_column("AUROC (held-out)", justify="right")
    table.add_column("epsilon by site (delta 1e-5)")
    table.add_row(
        "0 (initial)", "", _number(results.initial_loss, 4), _number(results.initial_metric, 3), ""
    )
    for record in results.per_round:
        table.add_row(
            str(record.round),
            "\n".join(record.participants),
            _number(record.loss, 4),
            _number(record.metric, 3),
            "\n".join(f"{site} {eps:.2f}" for site, eps in record.epsilon_by_site.items()),
        )
    return table


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


@app.command()
def demo(
    sites: Annotated[int, typer.Option(min=1, max=64, help="Number of hospitals.")] = 3,
    rounds: Annotated[int, typer.Option(min=1, max=1000, help="Number of rounds.")] = 3,
    simulation: Annotated[
        bool,
        typer.Option("--simulation", help="Run the sites on Flower's simulation runtime (Ray)."),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the demo's files and logs.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log progress to stderr.")
    ] = False,
) -> None:
    """Run a real federation on loopback: TLS SuperLink, one SuperNode per site, DP-SGD, FedAvg."""
    import time

    from coordinator.results import RunResults
    from medfed.demo import DemoOptions, run_demo

    _setup_logging(verbose)
    signal.signal(signal.SIGTERM, _on_sigterm)
    options = DemoOptions(sites=sites, rounds=rounds, simulation=simulation, keep=keep)
    started = time.monotonic()
    show_bar = stderr.is_terminal and not as_json
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr,
        disable=not show_bar,
        transient=False,
    )
    task = bar.add_task("rounds", total=rounds)

    def progress(results: RunResults) -> None:
        bar.update(task, completed=results.rounds_completed)

    if show_bar:
        where = "Flower's simulation runtime" if simulation else "TLS, one SuperNode per site"
        stderr.print(f"medfed demo: {sites} sites, {rounds} rounds ({where}); starting ...")
    try:
        with bar:
            results = run_demo(options, progress)
    except MedfedError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; every process the demo started was stopped", 130)
    wall_s = round(time.monotonic() - started, 2)
    if as_json:
        document = results.to_json()
        summary = {
            "run_id": document["run_id"],
            "rounds_completed": document["rounds_completed"],
            "sites": document["sites"],
            "per_round": document["per_round"],
            "initial_loss": document["initial_loss"],
            "initial_metric": document["initial_metric"],
            "metric_name": "auroc",
            "wall_s": wall_s,
        }
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        stdout.print(_round_table(results))
        stdout.print(f"finished in {wall_s:.1f} s", highlight=False)


@app.command()
def version() -> None:
    """Print medfed's version."""
    from medfed import __version__

    stdout.print(__version__)


def main() -> None:
    """Entry point of the `medfed` console script."""
    app()
