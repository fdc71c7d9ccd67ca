"""`medfed ask`: the consortium lead's questions to every site, answered under DP."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from medfed.asks import COMPARE_Z
from medfed.cli_common import JsonOption, guard, stderr, stdout

QueryArgument = Annotated[
    Path, typer.Argument(help="The query's TOML file ([query], cohort, analyses).", dir_okay=False)
]


def ask(
    query_toml: QueryArgument,
    consortium: Annotated[
        Path, typer.Option("--consortium", help="The consortium's consortium.toml.")
    ] = Path("consortium.toml"),
    study: Annotated[
        Path | None,
        typer.Option(
            "--study",
            help="The study file whose contract the query reads"
            " (default: <query.study>.toml beside the query).",
        ),
    ] = None,
    pki: Annotated[
        Path | None,
        typer.Option(
            "--pki",
            help="The PKI folder: signs the app bundle and checks each site's signed answers.",
        ),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", help="Wait for the answers and write the evidence record.")
    ] = False,
    compare: Annotated[
        Path | None,
        typer.Option(
            "--compare",
            help="With --follow: an earlier evidence.json of this question"
            " to compare the new answers with.",
            dir_okay=False,
        ),
    ] = None,
    timeout_s: Annotated[
        float, typer.Option("--timeout-s", min=1.0, help="How long --follow waits.")
    ] = 600.0,
    as_json: JsonOption = False,
) -> None:
    """Ask every site of the consortium QUERY_TOML's question (`coordinator start` must be
    running): each site answers under DP, charged to its ledger; with --follow, print the
    answers and write evidence.json and evidence.html in the run's folder."""
    from medfed.asks import (
        compare_evidence,
        load_query_file,
        read_evidence,
        study_for,
        wait_for_answers,
        write_evidence,
    )
    from medfed.coordinator import load_consortium
    from medfed.provision import PkiLayout
    from medfed.round_cli import flwr_program
    from medfed.runs import start_ask

    query = guard(lambda: load_query_file(query_toml))
    settings = guard(lambda: study_for(query, query_toml, study))
    config = guard(lambda: load_consortium(consortium))
    if pki is None:
        stderr.print(Text("warning: no --pki: the app bundle is NOT signed (sites that check"
                          " bundles will refuse it) and answers are NOT signature-checked"),
                     soft_wrap=True)  # fmt: skip
    layout = None if pki is None else PkiLayout(pki)
    folder = guard(lambda: start_ask(config, settings, query, flwr=flwr_program(), pki=layout))
    if not follow:
        document: dict[str, object] = {"run_folder": str(folder), "status": "submitted",
                                       "query_sha256": query.sha256()}  # fmt: skip
        _print(document, as_json)
        return
    earlier = None if compare is None else guard(lambda: read_evidence(compare))
    answers = guard(lambda: wait_for_answers(folder, timeout_s=timeout_s))
    record = guard(lambda: write_evidence(folder, answers))
    if earlier is not None:
        record["comparison"] = compare_evidence(earlier, record)
    _print(record, as_json)
    if record["status"] != "completed":
        raise typer.Exit(1)


def _print(document: dict[str, object], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(document, default=str) + "\n")
        return
    print_answers(document)


def print_answers(record: dict[str, object]) -> None:
    """The answers as tables, and where the evidence is."""
    status = record.get("status")
    stdout.print(Text(f"query {record.get('query_sha256', '')!s:.16} {status}"), soft_wrap=True)
    if record.get("error"):
        stdout.print(Text(f"error: {record['error']}"), soft_wrap=True)
    for site in record.get("sites") or []:  # type: ignore[attr-defined]
        stdout.print(Text(f"  answered: {site['site']} (epsilon {site['epsilon']:g})"))
    for refusal in record.get("refused") or []:  # type: ignore[attr-defined]
        stdout.print(Text(f"  refused: {refusal['site']}: {refusal['reason']}"), soft_wrap=True)
    for answer in record.get("answers") or []:  # type: ignore[attr-defined]
        stdout.print(_answer_table(answer))
    comparison = record.get("comparison")
    if isinstance(comparison, dict):
        verdict = "consistent with" if comparison["consistent"] else "DIFFERS from"
        changed = comparison["data_changed_at"] or "no site"
        stdout.print(Text(f"compared: {verdict} the earlier answers (|z| <= {COMPARE_Z:g});"
                          f" data changed at {changed}"))  # fmt: skip
        for row in comparison["differences"]:
            stdout.print(Text(f"  {row['index']}. {row['estimate']}: {row['before']:.4g} ->"
                              f" {row['after']:.4g} (z {row['z']:+.2f})"))  # fmt: skip
    folder = record.get("run_folder")
    if folder and status in ("completed", "failed"):
        stdout.print(Text(f"evidence: {Path(str(folder)) / 'evidence.html'}"), soft_wrap=True)


def _number(value: object) -> str:
    return "-" if value is None else f"{float(value):.4g}"  # type: ignore[arg-type]


def _answer_table(answer: dict[str, object]) -> Table | Text:
    kind = str(answer.get("kind"))
    title = f"{kind} {answer.get('title') or ''}".strip()
    if "coefficients" in answer:
        table = Table(title=title)
        for column in ("term", "coef", "std_error", "ci_low", "ci_high", "p_value"):
            table.add_column(column)
        for row in answer["coefficients"]:  # type: ignore[attr-defined]
            table.add_row(str(row["term"]), *(_number(row[c]) for c in
                          ("coef", "std_error", "ci_low", "ci_high", "p_value")))  # fmt: skip
        if answer.get("estimable") is False:
            table.caption = str(answer.get("why", ""))
        return table
    if kind == "kaplan-meier":
        lines = [title]
        for curve in answer["curves"]:  # type: ignore[attr-defined]
            median = curve.get("median")
            lines.append(f"  {curve['label']}: median {median}")
        if "logrank" in answer:
            test = answer["logrank"]
            lines.append(f"  log-rank chi2 {test['statistic']:.3f}, p {test['p_value']:.3g}")  # type: ignore[index]
        return Text("\n".join(lines))
    shown = {k: v for k, v in answer.items() if k not in ("kind", "title", "index")}
    return Text(f"{title}: {json.dumps(shown, default=str)[:400]}")
