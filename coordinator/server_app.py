"""The Flower ServerApp: parses the run config and runs the study's rounds on the grid."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medfed.coordinator.errors import CoordinatorError, StudyConfigError
from medfed.coordinator.results import RunResults, read_results, write_results
from medfed.coordinator.rounds import run_study
from medfed.coordinator.study import StudySettings
from medfed.flower.patches import shorten_object_pull_backoff

log = logging.getLogger(__name__)

app = ServerApp()


def _fab_hash(grid: Grid) -> str:
    """The SHA-256 of the app bundle this run was submitted with, as Flower recorded it."""
    try:
        return str(grid.run.fab_hash or "")
    except Exception:  # an in-memory grid may carry no run
        return ""


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the study named by the run config; write progress to its results path."""
    shorten_object_pull_backoff()  # replies' parts in transit: ask again within 0.5 s
    run_id = str(context.run_id)
    raw_path = str(context.run_config.get("results-path", ""))
    results_path = Path(raw_path) if raw_path else None

    def report(results: RunResults) -> None:
        if results_path is not None:
            write_results(results_path, results)

    try:
        study = StudySettings.from_run_config(context.run_config)
    except StudyConfigError as exc:
        log.error("run %s refused: %s", run_id, exc)
        report(RunResults(run_id=run_id, status="failed", num_rounds=0, error=str(exc),
                          flower_run_id=run_id))  # fmt: skip
        raise
    try:
        run_study(
            grid, study, study.contract, run_id=run_id, report=report, app_sha256=_fab_hash(grid)
        )
    except CoordinatorError as exc:
        log.error("run %s failed: %s", run_id, exc)
        _mark_failed(results_path, run_id, study, str(exc))
        raise


def _mark_failed(path: Path | None, run_id: str, study: StudySettings, error: str) -> None:
    """Say that the run failed, keeping the rounds already reported: a run refused before
    its first round (a resume that finds no checkpoint) would otherwise still read as
    running from its last life."""
    if path is None:
        return
    results = read_results(path) or RunResults(
        run_id=run_id, status="failed", num_rounds=study.num_rounds
    )
    # Always this life's error, and this Flower run's id: a resume that failed before
    # its first round must not leave the last life's error standing as its own.
    results.status, results.error, results.flower_run_id = "failed", error, run_id
    write_results(path, results)
