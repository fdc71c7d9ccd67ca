"""`medfed report RUN_DIR --out report.html`: a run's results as one self-contained page.

It reads what the coordinator keeps in the run folder: `results.json` (metrics per
round and site), `checkpoints.db` (the last checkpoint's lineage) and `audit.jsonl`
(checked against `coordinator-signing.pub`). The page holds metrics per round and
per site as inline SVG plots, the participation timeline, epsilon per site over
rounds, and a model card with the lineage and the audit chain's check.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from medfed.common import write_atomic
from medfed.coordinator.audit_chain import AUDIT_NAME, PUBLIC_KEY_NAME
from medfed.coordinator.checkpoints import CHECKPOINTS_NAME, CheckpointStore
from medfed.coordinator.errors import CoordinatorError
from medfed.coordinator.results import RoundRecord, RunResults, read_results
from medfed.errors import MedfedError
from medfed.privacy.audit import verify_audit_log
from medfed.privacy.errors import PrivacyError
from medfed.privacy.signing import VerifyKey
from medfed.svg import Point, line_chart

RESULTS_NAME = "results.json"


class ReportError(MedfedError):
    """The run folder holds no results to report on."""


@dataclass(frozen=True)
class RunFolder:
    """What a run folder holds, read once."""

    path: Path
    results: RunResults
    lineage: dict[str, Any] | None
    checkpoint_rounds: list[int]
    audit: str
    """The audit chain's check, as one line."""
    audit_ok: bool | None


def read_run_folder(run_dir: Path) -> RunFolder:
    """Read the run folder's results, last checkpoint and audit chain check."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a folder")
    results = read_results(run_dir / RESULTS_NAME)
    if results is None:
        raise ReportError(f"{run_dir / RESULTS_NAME}: missing or not a results document")
    store = CheckpointStore(run_dir / CHECKPOINTS_NAME)
    try:
        last = store.load()
        rounds = store.rounds()
    except CoordinatorError as exc:
        raise ReportError(str(exc)) from exc
    audit, audit_ok = _audit(run_dir)
    return RunFolder(
        run_dir, results, None if last is None else last.state.get("lineage"), rounds,
        audit, audit_ok,
    )  # fmt: skip


def _audit(run_dir: Path) -> tuple[str, bool | None]:
    path, public = run_dir / AUDIT_NAME, run_dir / PUBLIC_KEY_NAME
    if not path.exists():
        return "no audit chain in the run folder", None
    try:
        verification = verify_audit_log(path, VerifyKey.load(public))
    except PrivacyError as exc:
        return f"cannot be checked: {exc}", False
    if verification.first_bad is not None:
        line, reason = verification.first_bad
        return f"FAILS at entry {line}: {reason}", False
    return (
        f"{verification.entries_checked} entries verified against {PUBLIC_KEY_NAME}"
        f" (last hash {verification.last_hash[:16]})",
        True,
    )


def _series(rounds: list[RoundRecord], attribute: str) -> dict[str, list[Point]]:
    """One series per site of a per-site dict attribute of the rounds."""
    sites = sorted({site for r in rounds for site in getattr(r, attribute)})
    return {
        site: [(float(r.round), getattr(r, attribute).get(site)) for r in rounds] for site in sites
    }


METRIC_LABELS = {"auroc": "AUROC", "c_index": "c-index"}


def metric_name_of(results: RunResults) -> str:
    """The run's held-out metric (`cli_common.metric_name`)."""
    from medfed.cli_common import metric_name

    return metric_name(results)


def metric_label(results: RunResults) -> str:
    """How the run's held-out metric is shown (`AUROC`, `c-index`)."""
    name = metric_name_of(results)
    return METRIC_LABELS.get(name, name)


def _plots(results: RunResults) -> list[str]:
    rounds = results.per_round
    start: list[Point] = [(0.0, results.initial_loss)]
    loss = {
        "global model (train loss)": start + [(float(r.round), r.loss) for r in rounds],
        "local DP-SGD loss": [(float(r.round), r.local_loss) for r in rounds],
    }
    metric = {
        "all sites": [(0.0, results.initial_metric)] + [(float(r.round), r.metric) for r in rounds],
        **_series(rounds, "metric_by_site"),
    }
    label = metric_label(results)
    return [
        line_chart("Loss per round", loss, y_label="loss"),
        line_chart(f"Held-out {label} per round, over all sites and per site", metric,
                   y_label=label),
        line_chart("Train loss per site", _series(rounds, "loss_by_site"), y_label="loss"),
        line_chart(f"Epsilon spent per site (delta {results.delta or 0:g})",
                   _series(rounds, "epsilon_by_site"), y_label="epsilon"),
        line_chart("Local steps per site (sized by the scheduler)",
                   {s: [(x, None if y is None else float(y)) for x, y in points]
                    for s, points in _series(rounds, "local_steps_by_site").items()},
                   y_label="steps"),
    ]  # fmt: skip


def _timeline(results: RunResults) -> str:
    """Sites by rounds: trained (steps), dropped or rejected (why), refused (why)."""
    sites = sorted(
        {*results.sites} | {s for r in results.per_round for s in (*r.refused, *r.rejected)}
    )
    head = "".join(f"<th>{r.round}</th>" for r in results.per_round)
    rows = []
    for site in sites:
        cells = []
        for record in results.per_round:
            if site in record.participants:
                steps = record.local_steps_by_site.get(site)
                clipped = " clipped" if site in record.clipped else ""
                label = f"trained{'' if steps is None else f' ({steps})'}{clipped}"
                cells.append(f'<td class="trained" title="{escape(label)}">{escape(label)}</td>')
            elif site in record.rejected:
                reason = record.rejected[site]
                cells.append(f'<td class="rejected" title="{escape(reason)}">rejected</td>')
            elif site in record.refused:
                reason = record.refused[site]
                cells.append(f'<td class="refused" title="{escape(reason)}">refused</td>')
            else:
                cells.append("<td></td>")
        rows.append(f"<tr><th>{escape(site)}</th>{''.join(cells)}</tr>")
    return (
        f'<table class="timeline"><tr><th>site \\ round</th>{head}</tr>{"".join(rows)}</table>'
        "<p>Hover a cell for the reason a site was refused or its reply rejected.</p>"
    )


def _model_card(folder: RunFolder) -> str:
    results, lineage = folder.results, folder.lineage or {}
    final = results.per_round[-1].model_sha256 if results.per_round else "(no round yet)"
    rows = [
        ("run", results.run_id),
        ("status", results.status + (f": {results.error}" if results.error else "")),
        ("study", f"{lineage.get('study', '?')} ({lineage.get('study_sha256', '?')})"),
        ("strategy", results.strategy),
        ("rounds completed", f"{results.rounds_completed} of {results.num_rounds}"),
        ("final model (SHA-256)", final),
        ("app bundle (SHA-256)", lineage.get("app_sha256") or "(not recorded)"),
        ("updates signature-checked", "yes" if results.signed_updates else "NO"),
        ("checkpoints", ", ".join(map(str, folder.checkpoint_rounds)) or "none"),
        ("resumed after rounds", ", ".join(map(str, results.resumed_from)) or "never"),
        ("audit chain", folder.audit),
    ]
    table = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in rows)
    sites = lineage.get("sites", {})
    site_rows = "".join(
        f"<tr><td>{escape(site)}</td><td>{escape(', '.join(entry.get('datasets', [])) or '-')}"
        f"</td><td>{escape(', '.join(map(str, entry.get('rounds', []))))}</td>"
        f"<td>{_number(entry.get('epsilon'))}</td><td>{entry.get('delta', '')}</td></tr>"
        for site, entry in sorted(sites.items())
    )
    lineage_rounds = "".join(
        f"<tr><td>{r['round']}</td><td>{escape(', '.join(r['sites']))}</td>"
        f"<td><code>{escape(r['model_sha256'])}</code></td></tr>"
        for r in lineage.get("rounds", [])
    )
    return (
        f"<table>{table}</table><h3>Sites</h3><table><tr><th>site</th><th>datasets"
        "</th><th>rounds</th><th>epsilon</th><th>delta</th></tr>"
        f"{site_rows}</table><h3>Rounds</h3><table><tr><th>round</th><th>sites</th>"
        f"<th>model SHA-256</th></tr>{lineage_rounds}</table>"
    )


def _number(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else "-"


_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 13px; }
td.trained { background: #d9f2d9; } td.refused { background: #eee; color: #666; }
td.rejected { background: #f8d7d7; } .bad { color: #b00; font-weight: bold; }
.plots svg { margin: 0.5em 1em 0.5em 0; border: 1px solid #eee; }
"""


def render_report(folder: RunFolder) -> str:
    """The report page as HTML text."""
    results = folder.results
    warning = (
        f'<p class="bad">The audit chain {escape(folder.audit)}</p>'
        if folder.audit_ok is False
        else ""
    )
    created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>medfed run {escape(results.run_id)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>Run {escape(results.run_id)}</h1><p>Written {created} from"
        f" <code>{escape(str(folder.path))}</code>.</p>{warning}"
        f"<h2>Model card</h2>{_model_card(folder)}"
        f'<h2>Metrics per round and per site</h2><div class="plots">{"".join(_plots(results))}'
        f"</div><h2>Participation</h2>{_timeline(results)}</body></html>"
    )


def write_report(run_dir: Path, out: Path) -> RunFolder:
    """Render the run folder's report to `out` (atomically); return what was read."""
    folder = read_run_folder(run_dir)
    try:
        write_atomic(out, render_report(folder).encode("utf-8"), mode=0o644)
    except (OSError, PrivacyError) as exc:
        raise ReportError(f"{out}: cannot be written ({exc})") from exc
    return folder
