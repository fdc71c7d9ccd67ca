"""`round resume --follow` follows the resumed Flower run: the old life's error in
results.json is not taken for the new run's."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import medfed.round_cli as round_cli
from medfed.coordinator.results import RoundRecord, RunResults, write_results
from medfed.run_report import RESULTS_NAME
from medfed.runs import RunRecord


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "study-1"
    folder.mkdir()
    RunRecord("study-1", "study", "0" * 64, "2026-12-04T00:00:00+00:00", ["111", "222"]).save(
        folder
    )
    old = RunResults("111", "failed", 3, error="HTTPStatusError 500 pull-messages",
                     per_round=[RoundRecord(1, ["a", "b"])], flower_run_id="111")  # fmt: skip
    write_results(folder / RESULTS_NAME, old)
    return folder


def test_follow_after_resume_waits_for_the_resumed_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder(tmp_path)
    monkeypatch.setattr(round_cli, "FOLLOW_POLL_S", 0.02)

    def resumed_run() -> None:
        time.sleep(0.3)
        running = RunResults("111", "running", 3, per_round=[RoundRecord(1, ["a", "b"])],
                             resumed_from=[1], flower_run_id="222")  # fmt: skip
        write_results(folder / RESULTS_NAME, running)
        time.sleep(0.2)
        running.per_round += [RoundRecord(2, ["a", "b"]), RoundRecord(3, ["a", "b"])]
        running.status = "completed"
        write_results(folder / RESULTS_NAME, running)

    writer = threading.Thread(target=resumed_run)
    writer.start()
    document = round_cli._follow(folder, 3, "222")
    writer.join()

    assert document["status"] == "completed"
    assert document["rounds_completed"] == 3
    assert document["error"] is None


def test_follow_gives_up_on_a_run_that_never_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder(tmp_path)
    monkeypatch.setattr(round_cli, "FOLLOW_POLL_S", 0.02)
    monkeypatch.setattr(round_cli, "START_WAIT_S", 0.2)
    document = round_cli._follow(folder, 3, "222")
    assert document["status"] == "failed"
    assert document["error"] == ("Flower run 222 wrote no report within 0.2 s (see `flwr log`)")


def test_follow_ends_when_flower_says_the_run_failed_without_a_last_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder(tmp_path)
    monkeypatch.setattr(round_cli, "FOLLOW_POLL_S", 0.02)
    monkeypatch.setattr(round_cli, "FLOWER_POLL_S", 0.05)
    # The resumed ServerApp wrote round 1 of 3, then died: its report still says running.
    running = RunResults("111", "running", 3, per_round=[RoundRecord(1, ["a", "b"])],
                         flower_run_id="222")  # fmt: skip
    write_results(folder / RESULTS_NAME, running)
    states = iter(["running", "finished:failed: ServerApp exited with code 1"])

    started = time.monotonic()
    document = round_cli._follow(folder, 3, "222", lambda: next(states))

    assert time.monotonic() - started < 5.0
    assert document["status"] == "failed"
    assert document["rounds_completed"] == 1
    assert "finished:failed: ServerApp exited with code 1" in str(document["error"])
    assert "running after 1 of 3 rounds" in str(document["error"])


def test_follow_does_not_wait_for_a_report_of_a_run_flower_has_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder(tmp_path)  # only the last life's report (run 111) is there
    monkeypatch.setattr(round_cli, "FOLLOW_POLL_S", 0.02)
    monkeypatch.setattr(round_cli, "FLOWER_POLL_S", 0.05)
    document = round_cli._follow(folder, 3, "222", lambda: "finished:failed")
    assert document["status"] == "failed"
    assert "Flower reports the run finished:failed" in str(document["error"])


def test_a_stopped_flower_run_reads_as_stopped_and_a_finished_report_stands() -> None:
    from medfed.runs import reconciled

    running = {"status": "running", "rounds_completed": 2, "num_rounds": 3, "error": None}
    assert reconciled(running, "finished:stopped")["status"] == "stopped"
    assert reconciled(running, "running") == running
    assert reconciled(running, None) == running
    completed = {**running, "status": "completed", "rounds_completed": 3}
    assert reconciled(completed, "finished:completed")["status"] == "completed"
