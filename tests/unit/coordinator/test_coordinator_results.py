"""RunResults as JSON: undefined metrics become null, and the file is replaced atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from medfed.coordinator.results import FIGURES_NOTE, RoundRecord, RunResults, write_results


def strict_json(text: str) -> object:
    """Parse JSON refusing NaN/Infinity, which Python's json module accepts by default."""

    def refuse(constant: str) -> object:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def results_with_undefined_metrics() -> RunResults:
    return RunResults(
        run_id="run-7",
        status="running",
        num_rounds=3,
        sites=["hospital-1", "hospital-2"],
        initial_metric=math.nan,
        per_round=[
            RoundRecord(
                round=1,
                participants=["hospital-1", "hospital-2"],
                local_loss=0.71,
                loss=0.69,
                metric=math.nan,
                epsilon_by_site={"hospital-1": 1.5, "hospital-2": math.inf},
                noise_by_site={"hospital-1": 1.07, "hospital-2": math.nan},
                rejected={"node-9": "site replied with an error: hospital-3: refused"},
                model_sha256="ab" * 32,
                duration_s=4.25,
            ),
            RoundRecord(round=2, participants=["hospital-1"], loss=-math.inf),
        ],
    )


def test_undefined_numbers_become_null_everywhere() -> None:
    document = results_with_undefined_metrics().to_json()

    assert document["initial_metric"] is None
    rounds = document["per_round"]
    assert isinstance(rounds, list)
    assert rounds[0]["metric"] is None
    assert rounds[0]["epsilon_by_site"] == {"hospital-1": 1.5, "hospital-2": None}
    assert rounds[0]["noise_by_site"] == {"hospital-1": 1.07, "hospital-2": None}
    assert rounds[0]["loss"] == 0.69
    assert rounds[1]["loss"] is None
    assert document["rounds_completed"] == 2


def test_to_json_leaves_the_results_themselves_unchanged() -> None:
    results = results_with_undefined_metrics()
    results.to_json()
    assert math.isnan(results.per_round[0].metric or 0.0)
    assert math.isinf(results.per_round[0].epsilon_by_site["hospital-2"])


NEW_ROUND_FIELDS: dict[str, object] = {
    "planning_s": 0.0,
    "refused": {},
    "local_steps_by_site": {},
    "clipped": {},
    "loss_by_site": {},
    "metric_by_site": {},
    "metric_ci": None,
    "metric_ci_by_site": {},
}


def test_the_written_file_is_strict_json_with_every_field(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "results.json"
    results = results_with_undefined_metrics()

    write_results(path, results)

    document = strict_json(path.read_text(encoding="utf-8"))
    assert document == {
        "run_id": "run-7",
        "status": "running",
        "num_rounds": 3,
        "sites": ["hospital-1", "hospital-2"],
        "signed_updates": False,
        "initial_loss": None,
        "initial_metric": None,
        "per_round": [
            {
                "round": 1,
                "participants": ["hospital-1", "hospital-2"],
                "local_loss": 0.71,
                "loss": 0.69,
                "metric": None,
                "metric_name": "auroc",
                "epsilon_by_site": {"hospital-1": 1.5, "hospital-2": None},
                "noise_by_site": {"hospital-1": 1.07, "hospital-2": None},
                "rejected": {"node-9": "site replied with an error: hospital-3: refused"},
                "model_sha256": "ab" * 32,
                "duration_s": 4.25,
                **NEW_ROUND_FIELDS,
            },
            {
                "round": 2,
                "participants": ["hospital-1"],
                "local_loss": None,
                "loss": None,
                "metric": None,
                "metric_name": "auroc",
                "epsilon_by_site": {},
                "noise_by_site": {},
                "rejected": {},
                "model_sha256": "",
                "duration_s": 0.0,
                **NEW_ROUND_FIELDS,
            },
        ],
        "error": None,
        "rounds_completed": 2,
        "strategy": "fedavg",
        "delta": None,
        "waiting_until": None,
        "resumed_from": [],
        "metric_name": "auroc",
        "flower_run_id": "",
        "figures": FIGURES_NOTE,
    }


def test_rewrites_replace_the_file_and_leave_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    results = RunResults(run_id="r", status="waiting", num_rounds=2)
    for status in ("waiting", "running", "completed"):
        results.status = status  # type: ignore[assignment]
        write_results(path, results)
        assert strict_json(path.read_text(encoding="utf-8"))["status"] == status  # type: ignore[index]

    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "results.json"
    write_results(path, RunResults(run_id="r", status="running", num_rounds=2))
    before = path.read_bytes()

    unserialisable = RunResults(run_id="r", status="failed", num_rounds=2, error=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        write_results(path, unserialisable)

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
