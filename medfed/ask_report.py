# ruff: noqa: E501
"""The evidence record of a query as one HTML page: answers, plots and their provenance.

Its HTML and SVG markup is kept one element a line, however long (hence no E501).
"""

from __future__ import annotations

import json
import math
from html import escape

from medfed.svg import line_chart


def _km_plot(answer: dict[str, object]) -> str:
    series: dict[str, list[tuple[float, float | None]]] = {}
    for curve in answer.get("curves") or []:  # type: ignore[attr-defined]
        label = str(curve["label"])
        times, values = curve["times"], curve["survival"]
        series[label] = [(float(t), float(v)) for t, v in zip(times, values, strict=True)]
        series[f"{label} band"] = [
            (float(t), float(v)) for t, v in zip(times, curve["lower"], strict=True)
        ]
        series[f"{label} band "] = [
            (float(t), float(v)) for t, v in zip(times, curve["upper"], strict=True)
        ]
    bands = [name for name in series if name.rstrip().endswith("band")]
    return line_chart(f"Kaplan-Meier: {answer.get('task')}", series, x_label="time",
                      y_label="survival", integer_x=False, y_from_zero=True, wide=bands)  # fmt: skip


def _forest(answer: dict[str, object]) -> str:
    """Each coefficient as a point with its interval (ratios on a log axis)."""
    rows = [
        r
        for r in answer.get("coefficients") or []  # type: ignore[attr-defined]
        if r["term"] != "intercept" and r.get("ci_low") is not None
    ]
    ratio = next((k for k in ("hazard_ratio", "odds_ratio") if rows and k in rows[0]), None)
    if not rows:
        return ""
    low = [r[f"{ratio}_ci_low"] if ratio else r["ci_low"] for r in rows]
    high = [r[f"{ratio}_ci_high"] if ratio else r["ci_high"] for r in rows]
    mid = [r[ratio] if ratio else r["coef"] for r in rows]

    def axis(v: float) -> float:
        return math.log(max(v, 1e-12)) if ratio else v

    lo, hi = (
        min(axis(v) for v in [*low, 1.0 if ratio else 0.0]),
        max(axis(v) for v in [*high, 1.0 if ratio else 0.0]),
    )
    span = hi - lo or 1.0
    width, left, row_h = 640, 170, 26

    def x(v: float) -> float:
        return left + (axis(v) - lo) / span * (width - left - 30)

    height = 40 + row_h * len(rows)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">'
    ]
    ref = x(1.0 if ratio else 0.0)
    parts.append(
        f'<line x1="{ref:.1f}" y1="10" x2="{ref:.1f}" y2="{height - 20}" stroke="#999" stroke-dasharray="4"/>'
    )
    for i, row in enumerate(rows):
        y = 25 + i * row_h
        parts.append(f'<text x="5" y="{y + 4}">{escape(str(row["term"]))}</text>')
        parts.append(
            f'<line x1="{x(low[i]):.1f}" y1="{y}" x2="{x(high[i]):.1f}" y2="{y}" stroke="#225"/>'
        )
        parts.append(
            f'<rect x="{x(mid[i]) - 4:.1f}" y="{y - 4}" width="8" height="8" fill="#225"/>'
        )
        parts.append(
            f'<text x="{width - 28}" y="{y + 4}" text-anchor="end">{mid[i]:.3g} [{low[i]:.3g}, {high[i]:.3g}]</text>'
        )
    label = ratio.replace("_", " ") if ratio else "coefficient"
    parts.append(
        f'<text x="{left}" y="{height - 5}">{escape(label)} with {answer.get("level", 0.95):.0%} CI (incl. DP noise)</text></svg>'
    )
    return "".join(parts)


def _answer_section(answer: dict[str, object]) -> str:
    kind = str(answer.get("kind"))
    title = escape(f"{answer.get('index', '')}. {kind} {answer.get('title') or ''}")
    body = ""
    if kind == "kaplan-meier":
        body = _km_plot(answer)
        if "logrank" in answer:
            test = answer["logrank"]
            body += f"<p>Log-rank: chi-square {test['statistic']:.3f}, {test['dof']} dof, p = {test['p_value']:.3g}</p>"  # type: ignore[index]
    elif "coefficients" in answer:
        body = _forest(answer)
        if answer.get("estimable") is False:
            body = f"<p><b>Not estimable:</b> {escape(str(answer.get('why')))}</p>"
    shown = {k: v for k, v in answer.items() if k not in ("curves",)}
    return (f"<h2>{title}</h2>{body}<details><summary>numbers</summary><pre>"
            f"{escape(json.dumps(shown, indent=1, default=str))}</pre></details>")  # fmt: skip


def _approval_text(approval: object) -> str:
    if not isinstance(approval, dict):
        return "none (the site's policy requires none)"
    return f"epsilon {approval['epsilon']:g} by officer key {approval['officer_key_id']}, {approval['approved_at']}"


def render_evidence(record: dict[str, object]) -> str:
    """The evidence record as a self-contained HTML page."""
    chain: dict[str, object] = record.get("audit_chain") or {}  # type: ignore[assignment]
    query: dict[str, object] = record.get("query") or {}  # type: ignore[assignment]
    verified = bool(chain.get("verified"))
    sites = "".join(
        f"<tr><td>{escape(str(s['site']))}</td><td>{s['epsilon']:g}</td><td>{s['noise_multiplier']:.4g}</td>"
        f"<td><code>{escape(str(s['dataset_sha256'])[:16])}</code></td><td>{'yes' if s['signature_checked'] else 'no key'}</td>"
        f"<td>{escape(_approval_text(s.get('approval')))}</td></tr>"
        for s in record.get("sites") or []  # type: ignore[attr-defined]
    )
    refused = "".join(
        f"<tr><td>{escape(str(r['site']))}</td><td>{escape(str(r['step']))}</td><td>{escape(str(r['reason']))}</td></tr>"
        for r in record.get("refused") or []  # type: ignore[attr-defined]
    )
    answers = "".join(_answer_section(a) for a in record.get("answers") or [])  # type: ignore[attr-defined]
    problem = "" if verified else f" ({escape(str(chain.get('problem')))})"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>medfed evidence</title>
<style>body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #bbb; padding: 0.3em 0.6em; }}</style>
</head><body><h1>Evidence record: query {escape(str(query.get("name", "")))}</h1>
<p>Status <b>{escape(str(record.get("status")))}</b>{escape(" - " + str(record["error"])) if record.get("error") else ""}.
Query digest <code>{escape(str(record.get("query_sha256")))}</code>; app bundle
<code>{escape(str(record.get("app_sha256") or "unknown"))}</code>; contract
<code>{escape(str(record.get("contract_sha256")))}</code>. Run {escape(str(record.get("run_id")))},
{escape(str(record.get("started")))} to {escape(str(record.get("finished")))} ({record.get("seconds")} s).</p>
<p>Audit chain: {"verified" if verified else "NOT verified"}{problem},
{chain.get("entries", 0)} entries, last hash <code>{escape(str(chain.get("last_hash", ""))[:16])}</code>
(check it with <code>medfed audit verify {escape(str(record.get("run_folder")))}/audit.jsonl --key {escape(str(record.get("run_folder")))}/coordinator-signing.pub</code>).</p>
<h2>Sites that answered</h2><table><tr><th>site</th><th>epsilon</th><th>noise multiplier</th>
<th>data version (keyed digest)</th><th>signature checked</th><th>officer's approval</th></tr>{sites}</table>
<h2>Sites that refused</h2><table><tr><th>site</th><th>step</th><th>why</th></tr>{refused}</table>
{answers}
<h2>The query</h2><pre>{escape(json.dumps(record.get("query"), indent=1))}</pre>
</body></html>
"""
