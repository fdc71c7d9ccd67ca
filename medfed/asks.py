"""The lead's queries (`medfed ask`): read, check, submit, follow, and the evidence record.

A query file names its study (`query.study`) and is read with it: `<study>.toml` beside
the query, else `../studies/<study>.toml` (the examples' layout), or `--study`. It runs
as a Flower run of the signed app bundle, like a training run, with the query's
canonical JSON as the run config's `ask-query`; its folder under the consortium's
`runs/` holds `answers.json` (what the ServerApp writes), the coordinator's signed
audit chain and, once it ends,
`evidence.json` and `evidence.html`: the chain of evidence of every answer.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medfed.analysis.query import AskQuery, QueryError, check_against, parse_query
from medfed.common import read_toml, write_atomic
from medfed.coordinator.audit_chain import AUDIT_NAME, PUBLIC_KEY_NAME, verify_chain
from medfed.coordinator.study import StudySettings, load_study_file
from medfed.errors import MedfedError
from medfed.model.query_names import query_names
from medfed.privacy.errors import PrivacyError
from medfed.privacy.signing import VerifyKey

ANSWERS_NAME = "answers.json"
EVIDENCE_JSON = "evidence.json"
EVIDENCE_HTML = "evidence.html"
ASK_QUERY_KEY = "ask-query"


class AskError(MedfedError):
    """A query cannot be read, checked, submitted or followed; the message says why."""


def load_query_file(path: Path) -> AskQuery:
    """The query in `path`, or an `AskError` naming the file and key at fault."""
    document = read_toml(path, AskError)
    try:
        return parse_query(document, where=str(path))
    except QueryError as exc:
        raise AskError(str(exc)) from exc


def study_for(query: AskQuery, query_path: Path, study_path: Path | None) -> StudySettings:
    """The study the query reads, checked: its name is the query's `study`, and the query
    names only features, codes and tasks of its contract."""
    beside = query_path.parent / f"{query.study}.toml"
    shared = query_path.parent.parent / "studies" / f"{query.study}.toml"
    here = beside.is_file() and beside.resolve() != query_path.resolve()
    path = study_path or (beside if here or not shared.is_file() else shared)
    if not path.is_file():
        raise AskError(
            f"{query_path}: query.study {query.study!r}: no study file {path} (use --study)"
        )
    try:
        study = load_study_file(path)
    except MedfedError as exc:
        raise AskError(str(exc)) from exc
    if study.name != query.study:
        raise AskError(
            f"{query_path}: query.study is {query.study!r}, {path} is study {study.name!r}"
        )
    try:
        check_against(query, query_names(study.contract))
    except QueryError as exc:
        raise AskError(f"{query_path}: {exc}") from exc
    return study


def ask_run_config(study: StudySettings, query: AskQuery, folder: Path) -> dict[str, object]:
    """The run config of a query run: the study's, the query, and where to write."""
    return {
        **study.to_run_config(),
        ASK_QUERY_KEY: query.canonical_json(),
        "results-path": str(folder / ANSWERS_NAME),
        "run-dir": str(folder),
    }


def read_answers(folder: Path) -> dict[str, object] | None:
    """The ServerApp's last word on a query run, or None before its first."""
    try:
        document = json.loads((folder / ANSWERS_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AskError(f"{folder / ANSWERS_NAME}: not readable ({exc})") from exc
    if not isinstance(document, dict):
        raise AskError(f"{folder / ANSWERS_NAME}: not a results object")
    return document


def wait_for_answers(folder: Path, *, timeout_s: float, alive: object = None) -> dict[str, object]:
    """Wait until the query run ends (completed or failed); its results."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(alive):
            alive()
        document = read_answers(folder)
        if document is not None and document.get("status") in ("completed", "failed"):
            return document
        time.sleep(0.1)
    raise AskError(f"the query did not finish within {timeout_s:g} s (see {folder})")


def _chain(folder: Path) -> dict[str, object]:
    path, public = folder / AUDIT_NAME, folder / PUBLIC_KEY_NAME
    if not path.is_file() or not public.is_file():
        return {"verified": False, "problem": "no audit chain in the run folder"}
    try:
        check = verify_chain(path, VerifyKey.load(public), finished=True)
    except PrivacyError as exc:
        return {"verified": False, "problem": str(exc)}
    entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {
        "verified": check.problem is None,
        "problem": check.problem,
        "entries": check.entries_checked,
        "last_hash": check.last_hash,
        "public_key": str(public),
        "events": [{"event": e.get("event"), "hash": e.get("hash", "")[:16]} for e in entries],
    }


def evidence(folder: Path, answers: dict[str, object]) -> dict[str, object]:
    """The chain of evidence of a query run: the query and its digest, the code (bundle
    digest), who answered (each site's data-version digest, epsilon, signature check)
    and who refused (with why), the answers, and the coordinator's audit chain checked
    against its published key (`medfed audit verify` checks it the same way)."""
    return {
        "query": answers.get("query"),
        "query_sha256": answers.get("query_sha256"),
        "status": answers.get("status"),
        "error": answers.get("error"),
        "run_id": answers.get("run_id"),
        "started": answers.get("started"),
        "finished": answers.get("finished"),
        "seconds": answers.get("seconds"),
        "app_sha256": answers.get("app_sha256"),
        "contract_sha256": answers.get("contract_sha256"),
        "sites": answers.get("sites"),
        "refused": answers.get("refused"),
        "answers": answers.get("answers"),
        "steps": answers.get("steps"),
        "audit_chain": _chain(folder),
        "run_folder": str(folder),
    }


def read_evidence(path: Path) -> dict[str, Any]:
    """An evidence record written by `write_evidence`, or an `AskError` naming the file."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AskError(f"{path}: not an evidence record ({exc})") from exc
    if not isinstance(document, dict) or "answers" not in document:
        raise AskError(f"{path}: not an evidence record (no answers)")
    return document


def write_evidence(folder: Path, answers: dict[str, object]) -> dict[str, object]:
    """Write `evidence.json` and `evidence.html` into the run folder; the evidence."""
    from medfed.ask_report import render_evidence

    record = evidence(folder, answers)
    write_atomic(folder / EVIDENCE_JSON, json.dumps(record, indent=1, default=str).encode())
    write_atomic(folder / EVIDENCE_HTML, render_evidence(record).encode("utf-8"))
    return record


def _scalars(answer: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """An answer's point estimates with their standard errors, by name."""
    kind = answer.get("kind")
    out: dict[str, tuple[float, float]] = {}
    if kind == "count":
        out["count"] = (float(answer["count"]), float(answer["noise_std"]))
    elif kind in ("mean", "odds-ratio") and answer.get("std_error") is not None:
        value = float(answer["value"])
        if kind == "odds-ratio":  # its standard error is log(OR)'s
            value = math.log(max(value, 1e-300))
        out["log_odds_ratio" if kind == "odds-ratio" else "mean"] = (
            value,
            float(answer["std_error"]),
        )
    for row in answer.get("coefficients") or []:
        if row.get("std_error") is not None:
            out[f"coef:{row['term']}"] = (float(row["coef"]), float(row["std_error"]))
    return out


def compare_evidence(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Two answers to a query side by side: each estimate's difference in units of the two
    answers' combined standard error (sampling and DP noise), the sites whose data version
    changed, and whether every difference is within `COMPARE_Z` of chance."""
    rows = []
    before = {int(a["index"]): a for a in old.get("answers") or []}
    for answer in new.get("answers") or []:
        earlier = before.get(int(answer["index"]))
        if earlier is None or earlier.get("kind") != answer.get("kind"):
            continue
        mine, theirs = _scalars(answer), _scalars(earlier)
        for name in sorted(set(mine) & set(theirs)):
            (a, sa), (b, sb) = mine[name], theirs[name]
            spread = math.hypot(sa, sb)
            z = (a - b) / spread if spread > 0 else math.inf
            rows.append({"index": answer["index"], "kind": answer["kind"], "estimate": name,
                         "before": b, "after": a, "z": z})  # fmt: skip
    versions = {s["site"]: s["dataset_sha256"] for s in old.get("sites") or []}
    changed = sorted(
        s["site"]
        for s in new.get("sites") or []
        if versions.get(s["site"], s["dataset_sha256"]) != s["dataset_sha256"]
    )
    return {
        "same_query": old.get("query_sha256") == new.get("query_sha256"),
        "data_changed_at": changed,
        "differences": rows,
        "consistent": all(abs(r["z"]) <= COMPARE_Z for r in rows),
        "threshold_z": COMPARE_Z,
    }


COMPARE_Z = 3.0
"""Differences within this many combined standard errors are read as chance (noise)."""
