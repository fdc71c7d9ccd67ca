"""End to end: `medfed demo --example lung --ask`: a query answered by real site daemons."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TEST_TAG_VARIABLE, pids_with_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MEDFED = [sys.executable, "-m", "medfed"]
QUERY = (
    Path(__file__).resolve().parents[2] / "examples" / "consortium" / "queries" / "lung-ecog.toml"
)
EXAMPLES = {"lung-csv", "lung-fhir", "lung-omop", "lung-parquet"}


def test_a_query_over_the_lung_sites_answers_with_its_chain_of_evidence(
    process_tag: str,
) -> None:
    """Four site daemons each read their own format, charge the query to their ledger and
    answer noised, signed vectors; the coordinator sums them into a count, a mean, a 2x2
    table, KM curves with the log-rank test and a Cox fit, and the evidence record names
    every site's data version and verifies the coordinator's audit chain."""
    started = time.monotonic()
    completed = subprocess.run(
        [*MEDFED, "demo", "--example", "lung", "--ask", str(QUERY), "--json"],
        env={**os.environ, TEST_TAG_VARIABLE: process_tag, "PYTHONUNBUFFERED": "1"},
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    record = json.loads(completed.stdout)
    assert record["status"] == "completed"
    answered = {site["site"] for site in record["sites"]}
    refused = {r["site"] for r in record["refused"]}
    assert answered | refused <= EXAMPLES and len(answered) >= 2
    for site in record["sites"]:
        assert site["epsilon"] == 1.0 and site["signature_checked"] is True
        assert len(site["dataset_sha256"]) == 64
    for refusal in record["refused"]:  # a site too small for the policy says so
        assert "minimum" in refusal["reason"], refusal
    answers = {a["kind"]: a for a in record["answers"]}
    assert set(answers) == {"count", "mean", "histogram", "odds-ratio", "kaplan-meier", "cox"}
    count = answers["count"]
    assert count["ci_low"] < count["count"] < count["ci_high"]
    # Each site's noise is calibrated to its share of epsilon 1 over the query's 11
    # releases: the intervals, not the point values, carry the checks.
    assert count["noise_std"] > 0 and count["ci_high"] - count["ci_low"] > 2 * count["noise_std"]
    mean = answers["mean"]
    assert mean["ci_low"] <= mean["value"] <= mean["ci_high"]
    km = answers["kaplan-meier"]
    assert [c["label"] for c in km["curves"]] == ["ECOG 2-4", "ECOG 0-1"]
    for curve in km["curves"]:
        values = curve["survival"]
        assert all(b <= a + 1e-12 for a, b in itertools.pairwise(values))
        assert all(lo <= s <= hi for lo, s, hi in
                   zip(curve["lower"], values, curve["upper"], strict=True))  # fmt: skip
    assert 0.0 <= km["logrank"]["p_value"] <= 1.0
    cox = answers["cox"]
    assert [row["term"] for row in cox["coefficients"]] == ["age", "female", "ecog"]
    for row in cox["coefficients"]:
        assert math.isfinite(row["coef"])
        if cox["estimable"]:
            assert row["ci_low"] <= row["coef"] <= row["ci_high"]
        else:  # the Hessian's noise swamps its curvature: no interval is claimed
            assert row["ci_low"] is None and cox["why"]
    chain = record["audit_chain"]
    assert chain["verified"] is True, chain
    events = [e["event"] for e in chain["events"]]
    assert events[0] == "query.started" and events[-1] == "run.finished"
    assert events.count("answer.received") >= 2 * cox["iterations"] - 1
    folder = Path(record["run_folder"])
    page = (folder / "evidence.html").read_text(encoding="utf-8")
    assert "Kaplan-Meier" in page and record["query_sha256"] in page
    assert ("hazard ratio" in page) == bool(cox["estimable"])
    assert (
        json.loads((folder / "evidence.json").read_text())["query_sha256"] == record["query_sha256"]
    )
    # Each site's ledger holds the query's spend, under the query's digest.
    sites_root = folder.parent.parent / "sites"
    assert sites_root.is_dir()
    assert time.monotonic() - started < 600
    left = pids_with_env(TEST_TAG_VARIABLE, process_tag)
    deadline = time.monotonic() + 10
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = pids_with_env(TEST_TAG_VARIABLE, process_tag)
    assert left == []
