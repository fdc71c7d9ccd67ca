"""`medfed model export | score`: a run's final model as files, and a site scoring its own
patients with it (registered in `medfed/cli.py` as the `model` sub-app; the work is in
`medfed/model_export.py`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table
from rich.text import Text

from medfed.cli_common import guard, stdout

model_app = typer.Typer(
    help="The final model of a run: export it with its contract and card; score a site's"
    " patients with it, at the site.",
    no_args_is_help=True,
)


def _run_folder(run: str, consortium: Path) -> Path:
    """RUN as a folder (a run folder or an exported model), else a run name of the
    consortium (`medfed round list`)."""
    from medfed.coordinator.consortium import load_consortium
    from medfed.runs import run_folder

    if Path(run).is_dir():
        return Path(run)
    config = guard(lambda: load_consortium(consortium))
    return guard(lambda: run_folder(config, run))


@model_app.command("export")
def model_export(
    run: Annotated[str, typer.Argument(help="The run's name (see `medfed round list`) or folder.")],
    out: Annotated[Path, typer.Option("--out", help="A new folder for the model's files.")],
    consortium: Annotated[
        Path, typer.Option("--consortium", help="The consortium's consortium.toml.", dir_okay=False)
    ] = Path("consortium.toml"),
    weights: Annotated[
        Literal["npz", "safetensors"],
        typer.Option("--format", help="The weights' file format (never pickle)."),
    ] = "npz",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Write the run's final model: weights, contract.json, model.json and MODEL_CARD.md."""
    from medfed.model_export import MODEL_JSON, export_model

    folder = _run_folder(run, consortium)
    written = guard(lambda: export_model(folder, out, fmt=weights))
    description = json.loads((written / MODEL_JSON).read_text(encoding="utf-8"))
    if as_json:
        sys.stdout.write(json.dumps({"out": str(written), **description}) + "\n")
        return
    stdout.print(Text(f"exported {description['study']} after {description['rounds']} rounds"
                      f" to {written} ({description['weights']}, model SHA-256"
                      f" {description['model_sha256'][:16]})"), soft_wrap=True)  # fmt: skip


@model_app.command("score")
def model_score(
    model: Annotated[Path, typer.Argument(help="An exported model folder (or a run folder).")],
    site_toml: Annotated[Path, typer.Argument(help="The site's site.toml.", dir_okay=False)],
    out: Annotated[
        Path, typer.Option("--out", help="Where the per-patient scores go (CSV, at the site).")
    ] = Path("scores.csv"),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Score every patient of the site's datasets with MODEL, locally: one CSV row per
    patient, and each task's metric over the patients with labels. Nothing is sent."""
    from medfed.model_export import score_site

    scored = guard(lambda: score_site(model, site_toml, out))  # bad data: every problem named
    if as_json:
        sys.stdout.write(json.dumps(scored.to_json()) + "\n")
        return
    table = Table(title=f"{scored.patients} patients scored; scores in {scored.out}")
    for column in ("task", "labelled", "metric", "value"):
        table.add_column(column)
    for task, metrics in scored.metrics.items():
        for name, value in metrics.items():
            if name not in ("examples", "loss"):
                table.add_row(task, f"{int(metrics['examples'])}", name, f"{value:.4f}")
    stdout.print(table)
