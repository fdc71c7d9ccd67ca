"""End to end: a 13-site consortium under secure aggregation completes on its first try.

Thirteen real site daemons (each a worker, a SuperNode and an executor that import
torch and Opacus) do not fit on the 2-core CI machine beside a SuperLink, so the sites
run on Flower's simulation runtime (Ray) behind a real TLS SuperLink, through the same
ServerApp, round loop, status queries, retrying Flower calls and secure aggregation as
a deployment. The run must succeed the first time: every site of known identity in
every round, nothing rejected, no retry of the whole run. Measured on the shared
2-core machine at load 15-24 (2026-12-04): round 1 took 77 s and round 2 126 s with all
13 sites; the whole run over 7 minutes there. One earlier attempt lost its simulation
process (Ray) under that load and the demo waited out its timeout: see the report.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import TEST_TAG_VARIABLE, pids_with_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SITES = 13
ROUNDS = 2


def test_a_13_site_consortium_runs_right_the_first_time(process_tag: str) -> None:
    env = {**os.environ, TEST_TAG_VARIABLE: process_tag, "PYTHONUNBUFFERED": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "medfed", "demo", "--simulation", "--sites", str(SITES),
         "--rounds", str(ROUNDS), "--local-steps", "3", "--json"],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    document = json.loads(completed.stdout)

    names = [f"hospital-{i + 1}" for i in range(SITES)]
    assert document["sites"] == names
    assert document["rounds_completed"] == ROUNDS
    assert document["secure_aggregation"] is True
    assert document["metric_name"] == "auroc"
    for record in document["per_round"]:
        assert sorted(record["participants"]) == sorted(names), record.get("rejected")
        assert record["rejected"] == {} and record["refused"] == {}
        assert math.isfinite(record["loss"])
        # each site's own spend on this study, within its target of 3
        assert sorted(record["epsilon_by_site"]) == sorted(names)
        assert all(0 < eps <= 3.0 for eps in record["epsilon_by_site"].values())
    deadline = time.monotonic() + 10
    while pids_with_env(TEST_TAG_VARIABLE, process_tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pids_with_env(TEST_TAG_VARIABLE, process_tag) == []
