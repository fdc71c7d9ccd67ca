"""`medfed round start | status | list | resume | stop`: the lead's runs, from the CLI.

Registered in `medfed/cli.py` as the `round` sub-app; the work is in `medfed/runs.py`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from medfed.cli_common import JsonOption, guard, round_table, stderr, stdout

if TYPE_CHECKING:
    from medfed.coordinator import ConsortiumConfig
    from medfed.runs import RunView


round_app = typer.Typer(
    help="The lead's runs: start a study on the consortium, follow, resume and stop it.",
    no_args_is_help=True,
)

ConsortiumOption = Annotated[
    Path,
    typer.Option("--consortium", help="The consortium's consortium.toml.", dir_okay=False),
]
RunArgument = Annotated[str, typer.Argument(help="The run's name (see `medfed round list`).")]
FOLLOW_POLL_S = 1.0
SECAGG_OFF_WARNING = (
    "WARNING: SECURE AGGREGATION IS OFF for this study: the coordinator sees each site's"
    " (DP-noised) update, not only their sum"
)
START_WAIT_S = 900.0
"""How long `--follow` waits for a submitted run to write its first report."""


def _config(path: Path) -> ConsortiumConfig:
    from medfed.coordinator import load_consortium

    return guard(lambda: load_consortium(path))


def flwr_program() -> str:
    """The `flwr` CLI's path, or exit naming how to install it."""
    from medfed.flower import FLWR_HINT
    from medfed.processes import find_program

    return guard(lambda: find_program("flwr", install_hint=FLWR_HINT))


def _print_view(document: dict[str, object]) -> None:
    done = f"{document['rounds_completed']} of {document['num_rounds'] or '?'} rounds"
    line = f"run {document['run']}: {document['status']}, {done}"
    if document.get("waiting_until"):
        eta = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(document["waiting_until"])))  # type: ignore[arg-type]
        line += f"; waiting for enough sites in their windows until {eta}"
    stdout.print(Text(line), soft_wrap=True)
    if document.get("secure_aggregation") is False:
        stderr.print(Text(SECAGG_OFF_WARNING, style="bold red"), soft_wrap=True)
    if document.get("error"):
        stderr.print(Text(f"error: {document['error']}"), soft_wrap=True)


FLOWER_POLL_S = 10.0
"""How often `--follow` asks Flower whether the run ended (a dead ServerApp writes no end)."""
_FINAL = ("completed", "failed", "stopped")


def _flower_state_of(config: ConsortiumConfig, flower_run_id: str) -> Callable[[], str | None]:
    from medfed.runs import flower_state

    return lambda: flower_state(config, flower_run_id, flwr=flwr_program())


def _reconciled_view(config: ConsortiumConfig, current: RunView) -> dict[str, object]:
    """The run's view, set right by Flower's state while its own report is not final."""
    from medfed.runs import flower_state, reconciled

    document = current.to_json()
    if document["status"] in _FINAL or not current.record.flower_run_ids:
        return document
    state = flower_state(config, current.record.flower_run_ids[-1], flwr=flwr_program())
    return reconciled(document, state)


def _follow(
    folder: Path,
    total: int,
    flower_run_id: str,
    flower: Callable[[], str | None] | None = None,
) -> dict[str, object]:
    """Show a progress bar of rounds until the run completes or fails; its last view.
    Only a report that Flower run `flower_run_id` wrote counts: after `resume`, the
    results of the run's last life (its old error) are not the resumed run's. `flower`
    gives Flower's state of the run: once Flower says it finished, following ends with
    what the run's report and Flower say together (`runs.reconciled`)."""
    from medfed.runs import reconciled, view

    asked = time.monotonic()

    def fresh(current: RunView) -> bool:
        results = current.results
        return results is not None and results.flower_run_id in ("", flower_run_id)

    def ended() -> dict[str, object] | None:
        nonlocal asked
        if flower is None or time.monotonic() - asked < FLOWER_POLL_S:
            return None
        asked = time.monotonic()
        state = flower()
        if state is None or not state.startswith("finished"):
            return None
        time.sleep(FOLLOW_POLL_S)  # the app's last report may be a moment behind Flower
        current = view(folder)
        document = current.to_json()
        if not fresh(current):  # no report of this run: the last life's says nothing of it
            document = {**document, "status": "submitted", "error": None}
        return reconciled(document, state)

    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=stderr, disable=not stderr.is_terminal,
    )  # fmt: skip
    task = bar.add_task("starting", total=total)
    started = time.monotonic()
    with bar:
        while True:
            current = view(folder)
            document = current.to_json()
            if not fresh(current):
                final = ended()
                if final is not None:
                    return final
                if time.monotonic() - started > START_WAIT_S:
                    return {**document, "status": "failed", "error": (
                        f"Flower run {flower_run_id} wrote no report within {START_WAIT_S:g} s"
                        " (see `flwr log`)")}  # fmt: skip
                time.sleep(FOLLOW_POLL_S)
                continue
            bar.update(task, completed=int(document["rounds_completed"]))  # type: ignore[call-overload]
            description = "waiting for windows" if document["status"] == "waiting" else "rounds"
            bar.update(task, description=description)
            if document["status"] in ("completed", "failed"):
                return document
            final = ended()
            if final is not None:
                return final
            time.sleep(FOLLOW_POLL_S)


@round_app.command("start")
def round_start(
    study_toml: Annotated[Path, typer.Argument(help="The study's study.toml.", dir_okay=False)],
    consortium: ConsortiumOption = Path("consortium.toml"),
    pki: Annotated[
        Path | None,
        typer.Option(
            "--pki",
            help="The PKI folder: signs the app bundle (sites run only signed bundles) and"
            " checks each site's signed updates.",
        ),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", help="Show a progress bar until the run ends.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Submit STUDY_TOML to the consortium's SuperLink as a new run (`coordinator start`
    must be running); with --follow, show its rounds until it ends."""
    from medfed.coordinator import load_study_file
    from medfed.provision import PkiLayout
    from medfed.runs import start_run

    config = _config(consortium)
    study = guard(lambda: load_study_file(study_toml))
    if pki is None:
        stderr.print(Text("warning: no --pki: the app bundle is NOT signed (sites that check"
                          " bundles will refuse it) and site updates will NOT be"
                          " signature-checked"), soft_wrap=True)  # fmt: skip
    if not study.secure_aggregation:
        stderr.print(Text(SECAGG_OFF_WARNING, style="bold red"), soft_wrap=True)
    layout = None if pki is None else PkiLayout(pki)
    started = guard(lambda: start_run(config, study, flwr=flwr_program(), pki=layout))
    document = started.to_json()
    if follow:
        flower_id = started.record.flower_run_ids[-1]
        document = _follow(
            started.folder, study.num_rounds, flower_id, _flower_state_of(config, flower_id)
        )
    if as_json:
        sys.stdout.write(json.dumps(document) + "\n")
    else:
        stdout.print(Text(f"submitted run {started.record.name} (Flower run"
                          f" {started.record.flower_run_ids[-1]}); files in {started.folder}"),
                     soft_wrap=True)  # fmt: skip
        if follow:
            _print_view(document)
    if document["status"] == "failed":
        raise typer.Exit(1)


@round_app.command("status")
def round_status(run: RunArgument, consortium: ConsortiumOption = Path("consortium.toml"),
                 as_json: JsonOption = False) -> None:  # fmt: skip
    """A run's status and rounds; exit 1 if it failed."""
    from medfed.runs import run_folder, view

    config = _config(consortium)
    current = guard(lambda: view(run_folder(config, run)))
    document = _reconciled_view(config, current)
    if as_json:
        sys.stdout.write(json.dumps(document) + "\n")
    else:
        _print_view(document)
        if current.results is not None and current.results.per_round:
            stdout.print(round_table(current.results))
    if document["status"] == "failed":
        raise typer.Exit(1)


@round_app.command("list")
def round_list(consortium: ConsortiumOption = Path("consortium.toml"),
               as_json: JsonOption = False) -> None:  # fmt: skip
    """Every run of the consortium, oldest first."""
    from medfed.runs import list_runs

    config = _config(consortium)
    views = guard(lambda: list_runs(config))
    documents = [_reconciled_view(config, v) for v in views]
    if as_json:
        for document in documents:
            document.pop("results")
        sys.stdout.write(json.dumps({"runs": documents}) + "\n")
        return
    table = Table(title=f"runs in {config.run_dir}")
    for column in ("run", "study", "status", "rounds", "Flower run ids"):
        table.add_column(column)
    for d in documents:
        table.add_row(
            Text(str(d["run"])), Text(str(d["study"])), str(d["status"]),
            f"{d['rounds_completed']}/{d['num_rounds'] or '?'}",
            ", ".join(map(str, d["flower_run_ids"])),  # type: ignore[call-overload]
        )  # fmt: skip
    stdout.print(table)


@round_app.command("resume")
def round_resume(
    run: RunArgument,
    consortium: ConsortiumOption = Path("consortium.toml"),
    follow: Annotated[bool, typer.Option("--follow", help="Show a progress bar.")] = False,
    pki: Annotated[
        Path | None,
        typer.Option(
            "--pki",
            help="The PKI folder whose key signs the bundle (default: the"
            " one the run was started with).",
            file_okay=False,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Submit RUN again, signed: it continues from its last checkpoint, under its first id."""
    from medfed.provision import PkiLayout
    from medfed.runs import resume_run

    config = _config(consortium)
    layout = None if pki is None else PkiLayout(pki)
    resumed = guard(lambda: resume_run(config, run, flwr=flwr_program(), pki=layout))
    document = resumed.to_json()
    if follow:
        document = _follow(
            resumed.folder,
            int(document["num_rounds"] or 0),  # type: ignore[call-overload]
            resumed.record.flower_run_ids[-1],
            _flower_state_of(config, resumed.record.flower_run_ids[-1]),
        )
    if as_json:
        sys.stdout.write(json.dumps(document) + "\n")
    else:
        stdout.print(Text(f"resumed run {run} as Flower run {resumed.record.flower_run_ids[-1]}"))
        if follow:
            _print_view(document)
    if document["status"] == "failed":
        raise typer.Exit(1)


@round_app.command("stop")
def round_stop(run: RunArgument, consortium: ConsortiumOption = Path("consortium.toml"),
               as_json: JsonOption = False) -> None:  # fmt: skip
    """Stop RUN (`flwr stop`); `medfed round resume` continues it later."""
    from medfed.runs import stop_run

    config = _config(consortium)
    stopped = guard(lambda: stop_run(config, run, flwr=flwr_program()))
    if as_json:
        sys.stdout.write(json.dumps(stopped.to_json()) + "\n")
    else:
        stdout.print(Text(f"stopped run {run} (Flower run {stopped.record.flower_run_ids[-1]})"))
