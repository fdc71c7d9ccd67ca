"""What every `medfed` command shares: the consoles, one-line errors, exit codes, the
`--json` option and the round table. The sub-CLIs (`round_cli`, `site_cli`, `site_daemon`,
`bench_cli`) import this module only, never each other or `medfed.cli`.

Exit codes: 0 ok, 1 the thing checked is wrong (bad data, broken chain, budget exceeded),
2 usage, 130 interrupted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from medfed.errors import MedfedError

if TYPE_CHECKING:
    from medfed.client import SiteConfig

T = TypeVar("T")

EXIT_OK: Final = 0
EXIT_CHECK_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

stderr = Console(stderr=True)
"""Logs, warnings, errors and progress bars: never what a pipe reads."""
stdout = Console()
"""Results: tables, or the one JSON document of `--json`."""

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def fail(message: str, code: int = EXIT_CHECK_FAILED) -> NoReturn:
    """Print `medfed: error: message` on stderr and exit with `code`."""
    # The message is plain text: brackets in it (`flwr[simulation]`) are not markup.
    stderr.print(Text.assemble(("medfed: error: ", "bold red"), message), soft_wrap=True)
    raise typer.Exit(code)


def guard(action: Callable[[], T]) -> T:
    """Run `action`; any medfed error (of any room) becomes one line on stderr and its
    exit code (1 unless the error names another)."""
    from medfed.client import ClientError
    from medfed.coordinator import CoordinatorError
    from medfed.flower import FlowerVersionError
    from medfed.privacy import PrivacyError
    from medfed.sites import SiteError

    try:
        return action()
    except (
        MedfedError,
        ClientError,
        CoordinatorError,
        PrivacyError,
        SiteError,
        FlowerVersionError,
    ) as exc:
        fail(str(exc), getattr(exc, "exit_code", EXIT_CHECK_FAILED))


def site_config(path: Path) -> SiteConfig:
    """`site.toml` read and checked (raises the client's `SiteConfigError`; use `guard`)."""
    from medfed.client import load_site_config

    return load_site_config(path)


def warn(line: str) -> None:
    """A notice on stderr; a warning that privacy is weaker stands out in bold red."""
    stderr.print(Text(line, style="bold red" if line.startswith("WARNING") else ""), soft_wrap=True)


def say(line: str) -> None:
    """One line of plain text on stdout (no markup, no highlighting)."""
    stdout.print(Text(line), soft_wrap=True)


def metric_name(results: object) -> str:
    """The held-out metric the run is followed by: what its last round recorded, else
    the study's own (`RunResults.metric_name`, set when the run starts)."""
    records = getattr(results, "per_round", [])
    if records:
        return str(records[-1].metric_name)
    return str(getattr(results, "metric_name", "auroc"))


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def round_table(results: object) -> Table:
    """A run's results (`medfed.coordinator.results.RunResults`) as one row per round."""
    from medfed.coordinator import RunResults

    if not isinstance(results, RunResults):
        raise TypeError(f"round_table expects RunResults, got {type(results).__name__}")
    table = Table(
        title=f"run {results.run_id}: {results.rounds_completed} rounds",
        caption=f"DP-noised figures: {results.figures}. In brackets: a 95% interval"
        " (patient sampling, not the noise).",
        caption_justify="left",
    )
    table.add_column("round", justify="right", no_wrap=True)
    table.add_column("sites", no_wrap=True)
    table.add_column("train loss", justify="right")
    label = {"auroc": "AUROC", "c_index": "c-index"}.get(metric_name(results), "metric")
    table.add_column(f"held-out {label}", justify="right")
    delta = f" (delta {results.delta:g})" if results.delta else ""
    table.add_column(f"study epsilon by site{delta}", no_wrap=True)
    table.add_row(
        "0 (initial)", "", _number(results.initial_loss, 4), _number(results.initial_metric, 3), ""
    )
    for record in results.per_round:
        table.add_row(
            str(record.round),
            "\n".join(record.participants),
            _number(record.loss, 4),
            _number(record.metric, 3)
            + (
                f"\n({record.metric_ci[0]:.2f}-{record.metric_ci[1]:.2f})"
                if record.metric_ci
                else ""
            ),
            "\n".join(f"{site} {eps:.2f}" for site, eps in record.epsilon_by_site.items()),
        )
    return table
