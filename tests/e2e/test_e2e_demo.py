"""End to end: `medfed demo` with real SuperLink, SuperNode and ClientApp processes on loopback."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TEST_TAG_VARIABLE, pids_with_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MEDFED = [sys.executable, "-m", "medfed"]


def _env(tag: str) -> dict[str, str]:
    return {**os.environ, TEST_TAG_VARIABLE: tag, "PYTHONUNBUFFERED": "1"}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _assert_nothing_left(tag: str) -> None:
    deadline = time.monotonic() + 10
    while (left := pids_with_env(TEST_TAG_VARIABLE, tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], "processes left running: " + "; ".join(_cmdline(pid) for pid in left)


def _check_document(document: dict[str, object], *, sites: int, rounds: int) -> None:
    assert document["rounds_completed"] == rounds
    assert document["signed_updates"] is True, "every update's signed receipt must be checked"
    assert document["sites"] == [f"hospital-{i + 1}" for i in range(sites)]
    assert isinstance(document["run_id"], str) and document["run_id"]
    assert isinstance(document["wall_s"], float) and document["wall_s"] > 0
    per_round = document["per_round"]
    assert isinstance(per_round, list) and [r["round"] for r in per_round] == list(
        range(1, rounds + 1)
    )
    # Every figure is DP-noised at the sites, and the results say so (the learning
    # itself is checked on the model, not on these noised figures: tests/integration).
    assert "DP-noised" in str(document["figures"])
    # Each site calibrated its noise so that the planned rounds (and their metrics'
    # releases) end at the study's target epsilon (3 by default): never above it.
    for epsilon in per_round[-1]["epsilon_by_site"].values():
        assert 0.95 * 3.0 <= epsilon <= 3.0
    previous: dict[str, float] = {}
    for record in per_round:
        assert sorted(record["participants"]) == document["sites"]
        assert record["loss"] is None or math.isfinite(record["loss"])
        assert record["metric"] is None or 0.0 <= record["metric"] <= 1.0
        epsilons = record["epsilon_by_site"]
        assert sorted(epsilons) == document["sites"]
        for site, epsilon in epsilons.items():
            assert epsilon > previous.get(site, 0.0), "epsilon must grow with every round trained"
            previous[site] = epsilon


def test_demo_json_runs_a_tls_federation_and_leaves_nothing(process_tag: str) -> None:
    completed = subprocess.run(
        [*MEDFED, "demo", "--sites", "3", "--rounds", "2", "--json"],
        env=_env(process_tag), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    document = json.loads(completed.stdout)
    _check_document(document, sites=3, rounds=2)
    _assert_nothing_left(process_tag)


def test_demo_simulation_runs_on_ray(process_tag: str) -> None:
    completed = subprocess.run(
        [*MEDFED, "demo", "--simulation", "--sites", "4", "--rounds", "2", "--json"],
        env=_env(process_tag), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    _check_document(json.loads(completed.stdout), sites=4, rounds=2)
    _assert_nothing_left(process_tag)


def test_demo_example_lung_trains_the_example_sites_under_dp(process_tag: str) -> None:
    """The lung study on its four example sites, each reading its own format (FHIR, OMOP,
    CSV, Parquet): the study's survival contract reaches the sites. The c-index is a
    pairwise statistic with no bounded per-patient sum, so no site releases it under DP;
    the run is followed by the pooled noised loss."""
    completed = subprocess.run(
        [*MEDFED, "demo", "--example", "lung", "--rounds", "2", "--json"],
        env=_env(process_tag), capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    document = json.loads(completed.stdout)
    # A site decides whether it is big enough on its noised patient count (what its
    # answer reveals must be DP too): a site of about 14 training patients against a
    # minimum cohort of 10 and a count noise of 10 sits some runs out, and says so.
    examples = {"lung-csv", "lung-fhir", "lung-omop", "lung-parquet"}
    assert set(document["sites"]) <= examples and len(document["sites"]) >= 2
    for record in document["per_round"]:
        for site in examples - set(record["participants"]):
            # refused at its pre-flight ("too small") or, at training, with its reason
            why = record["refused"].get(site, "") + record["rejected"].get(site, "")
            assert "too small" in why or "minimum cohort" in why, record
    assert document["rounds_completed"] == 2
    assert document["metric_name"] == "c_index"
    assert document["signed_updates"] is True
    per_round = document["per_round"]
    for record in per_round:
        assert record["metric_name"] == "c_index"
        assert record["metric"] is None  # not released under DP
        assert math.isfinite(record["loss"])
        for epsilon in record["epsilon_by_site"].values():
            assert 0.0 < epsilon <= 3.0  # the lung study's target epsilon
    _assert_nothing_left(process_tag)


def test_demo_refuses_an_unknown_example_as_a_usage_error() -> None:
    completed = subprocess.run(
        [*MEDFED, "demo", "--example", "nope"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 2
    assert "--example must be one of" in completed.stderr
    assert "Traceback" not in completed.stderr


def _wait_for_site_daemon(tag: str, site_id: str, timeout_s: float) -> int:
    """The PID of the site's `medfed site start` (the demo runs one daemon per site; the
    daemon itself restarts a SuperNode that dies, see tests/unit/medfed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in pids_with_env(TEST_TAG_VARIABLE, tag):
            command = _cmdline(pid)
            if " site start " in command and f"/{site_id}/site.toml" in command:
                return pid
        time.sleep(0.2)
    raise AssertionError(f"the site daemon of {site_id} never started")


def test_demo_names_a_dead_site_stops_the_rest_and_fails(process_tag: str) -> None:
    demo = subprocess.Popen(
        [*MEDFED, "demo", "--sites", "3", "--rounds", "3", "--json"],
        env=_env(process_tag), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        victim = _wait_for_site_daemon(process_tag, "hospital-2", timeout_s=120)
        time.sleep(2)
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
        demo.communicate()
    assert demo.returncode == 1
    assert stdout == ""
    assert "hospital-2" in stderr
    assert f"pid {victim}" in stderr
    assert "exited with code -9" in stderr
    assert "Traceback" not in stderr
    _assert_nothing_left(process_tag)


def test_demo_stops_everything_on_ctrl_c(process_tag: str) -> None:
    demo = subprocess.Popen(
        [*MEDFED, "demo", "--sites", "2", "--rounds", "5", "--json"],
        env=_env(process_tag), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for_site_daemon(process_tag, "hospital-2", timeout_s=120)
        demo.send_signal(signal.SIGINT)
        _, stderr = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
        demo.communicate()
    assert demo.returncode == 130
    assert "interrupted" in stderr
    assert "Traceback" not in stderr
    _assert_nothing_left(process_tag)
