"""`medfed bench secagg`: its protocol row plays the real secure-aggregation messages and
recovers the plain float64 weighted sum within the fixed-point bound; its upload is the
float32 size plus small messages; bad arguments are usage errors in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from medfed.bench.secagg import (
    Workload,
    make_consortium,
    make_workload,
    measure,
    plain_round,
    secure_round,
)
from medfed.cli import app


def _fixed_point_bound(n_sites: int, clip: float = 1.0) -> float:
    """n roundings of half a grid step; the grid: (2**31 - 1) // n levels per clip."""
    return n_sites * 0.5 * clip / ((2**31 - 1) // n_sites)


def _float64_weighted_sum(workload: Workload) -> np.ndarray:
    cap = max(workload.patients.values())
    names = sorted(workload.global_arrays)
    parts = []
    for site in sorted(workload.trained):
        weight = workload.patients[site] / cap
        delta = [
            workload.trained[site][n].astype(np.float64)
            - workload.global_arrays[n].astype(np.float64)
            for n in names
        ]
        parts.append(weight * np.concatenate([d.ravel() for d in delta]))
    total: np.ndarray = np.sum(parts, axis=0)
    return total


@pytest.mark.parametrize("n_sites", [2, 3])
def test_the_secure_round_recovers_the_plain_weighted_sum_within_the_bound(n_sites: int) -> None:
    workload = make_workload(n_sites, 1000, seed=n_sites)
    consortium = make_consortium(sorted(workload.trained))
    run = secure_round(consortium, workload)
    error = np.max(np.abs(run.weighted_sum - _float64_weighted_sum(workload)))
    assert error <= _fixed_point_bound(n_sites)
    # The average the coordinator would install is FedAvg's (float64 reference).
    total = sum(workload.patients.values())
    for name, value in run.averaged.items():
        fedavg = sum(
            workload.trained[s][name].astype(np.float64) * (workload.patients[s] / total)
            for s in workload.trained
        )
        np.testing.assert_allclose(value, fedavg, rtol=0, atol=1e-6)
    plain = plain_round(consortium, workload)
    for name, value in plain.averaged.items():
        np.testing.assert_allclose(value, run.averaged[name], rtol=0, atol=1e-6)
    # Every site took part in every step.
    assert {step: len(t) for step, t in run.clock.site_s.items()} == dict.fromkeys(
        ("keys", "train", "reveal"), n_sites
    )


def test_a_row_reports_its_error_within_the_bound_and_a_uint32_upload() -> None:
    row = measure(3, 1000, repeats=2, seed=0)
    assert 0 <= float(row["max_abs_error_weighted_sum"]) <= _fixed_point_bound(3)  # type: ignore[arg-type]
    uploads = row["upload_bytes"]
    assert isinstance(uploads, dict)
    # The masked vector travels as uint32 in numpy's format: 4 bytes a value and a header.
    assert 4000 <= uploads["secure_masked_vector"] <= 4000 + 128
    assert 4000 <= uploads["plain_packed"] <= 4000 + 128
    assert uploads["secure_total"] == sum(
        uploads[f"secure_{part}"]
        for part in ("masked_vector", "advertisement", "sealed_shares", "reveal")
    )
    secure = row["secure"]
    assert isinstance(secure, dict)
    slowest, coordinator = secure["slowest_site_s"], secure["coordinator_s"]
    assert set(slowest) == set(coordinator) == {"keys", "train", "reveal"}
    assert secure["critical_path_s"] <= secure["serial_s"]


def test_the_benchmark_prints_one_json_document_with_both_paths() -> None:
    result = CliRunner().invoke(app, ["bench", "secagg", "--sites", "2,3", "--params", "1e3",
                                      "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [(row["sites"], row["params"]) for row in document["rows"]] == [(2, 1000), (3, 1000)]
    assert "demo_rounds" not in document  # opt-in only
    for row in document["rows"]:
        assert row["plain"]["critical_path_s"] > 0 and row["secure"]["critical_path_s"] > 0


def test_bad_counts_are_usage_errors() -> None:
    for args in (["--sites", "1"], ["--params", "many"], ["--demo-rounds", "-1"]):
        result = CliRunner().invoke(app, ["bench", "secagg", *args])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
