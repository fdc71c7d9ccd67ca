"""The Flower ServerApp: parses the run config and runs the study's rounds on the grid."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medfed.coordinator.errors import CoordinatorError, StudyConfigError
from medfed.coordinator.results import RunResults, read_results, write_results
from medfed.coordinator.rounds import run_study
from medfed.coordinator.study import StudySettings
from medfed.coordinator.traffic import TRAFFIC_NAME, traffic_written_to
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

    if ASK_QUERY_KEY in context.run_config:
        _ask_main(grid, context, results_path)
        return
    try:
        study = StudySettings.from_run_config(context.run_config)
    except StudyConfigError as exc:
        log.error("run %s refused: %s", run_id, exc)
        report(RunResults(run_id=run_id, status="failed", num_rounds=0, error=str(exc),
                          flower_run_id=run_id))  # fmt: skip
        raise
    # Each exchange's bytes beside the run's checkpoints, for operators and `bench scale`.
    traffic = (
        traffic_written_to(Path(study.run_dir) / TRAFFIC_NAME)
        if study.run_dir
        else contextlib.nullcontext()
    )
    try:
        with traffic:
            run_study(
                grid, study, study.contract, run_id=run_id, report=report,
                app_sha256=_fab_hash(grid),
            )  # fmt: skip
    except CoordinatorError as exc:
        log.error("run %s failed: %s", run_id, exc)
        _mark_failed(results_path, run_id, study, str(exc))
        raise


ASK_QUERY_KEY = "ask-query"
"""The run-config key of a query run (`medfed ask`): the query's canonical JSON."""


def _ask_main(grid: Grid, context: Context, results_path: Path | None) -> None:
    """Run the query the run config carries, on the study its other keys describe."""
    from medfed.analysis.query import QueryError, query_from
    from medfed.common import write_atomic
    from medfed.coordinator.ask import AskResults, AskSetup, run_ask, site_keys_in
    from medfed.coordinator.audit_chain import CoordinatorAudit
    from medfed.coordinator.checkpoints import CHECKPOINTS_NAME, CheckpointStore
    from medfed.coordinator.rounds import audit_signer

    run_id = str(context.run_id)
    raw = dict(context.run_config)
    text = str(raw.pop(ASK_QUERY_KEY))

    last: list[AskResults] = []

    def report(results: AskResults) -> None:
        last[:] = [results]
        if results_path is not None:
            document = json.dumps(results.to_json(), indent=1, allow_nan=False)
            write_atomic(results_path, document.encode("utf-8"))

    failed = AskResults(run_id, {}, "", status="failed")
    try:
        query = query_from(text, where="run config ask-query")
        study = StudySettings.from_run_config(raw)
    except (QueryError, StudyConfigError) as exc:
        failed.error = str(exc)
        report(failed)
        raise CoordinatorError(f"query run {run_id} refused: {exc}") from exc
    run_dir = Path(study.run_dir or ".")
    store = CheckpointStore(run_dir / CHECKPOINTS_NAME)
    signer = audit_signer(study)
    audit = CoordinatorAudit.open(run_dir, signer=signer, store=store)
    if not query.secure_aggregation:
        log.warning("query %s: SECURE AGGREGATION IS OFF: the coordinator sees each site's"
                    " (DP-noised) answer", query.name)  # fmt: skip
    setup = AskSetup(study, site_keys_in(study.site_keys_dir), signer, _fab_hash(grid))
    try:
        run_ask(grid, query, setup, run_id=run_id, report=report, audit=audit,
                wait_s=study.round_timeout_s)  # fmt: skip
        audit.record("run.finished", {"query_sha256": query.sha256()})
    except Exception as exc:  # any end of a query run is written, never left "running"
        log.exception("query run %s failed: %s", run_id, exc)
        audit.record("run.failed", {"error": str(exc)})
        failed = last[0] if last else failed
        failed.query, failed.query_sha256 = json.loads(query.canonical_json()), query.sha256()
        failed.status, failed.error = "failed", str(exc)
        report(failed)
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
