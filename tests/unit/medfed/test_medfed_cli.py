"""The CLI: one clear line for every error, exit codes 0/1/2/130, JSON on stdout only."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import medfed.demo
import medfed.processes
from medfed.cli import app
from medfed.coordinator.results import RoundRecord, RunResults
from medfed.demo import DemoOptions
from medfed.errors import MissingDependencyError, ProcessDiedError

runner = CliRunner()


def _results() -> RunResults:
    return RunResults(
        run_id="42",
        status="completed",
        num_rounds=2,
        sites=["hospital-1", "hospital-2"],
        initial_loss=0.74,
        initial_metric=0.52,
        per_round=[
            RoundRecord(
                round=r,
                participants=["hospital-1", "hospital-2"],
                local_loss=0.6,
                loss=0.6 - 0.1 * r,
                metric=0.7 + 0.05 * r,
                epsilon_by_site={"hospital-1": 1.5 * r, "hospital-2": 1.6 * r},
            )
            for r in (1, 2)
        ],
    )


def test_demo_json_prints_one_document_with_the_promised_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[DemoOptions] = []

    def fake_run_demo(options: DemoOptions, progress: object, **kwargs: object) -> RunResults:
        seen.append(options)
        return _results()

    monkeypatch.setattr(medfed.demo, "run_demo", fake_run_demo)
    result = runner.invoke(app, ["demo", "--sites", "2", "--rounds", "2", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert {"run_id", "rounds_completed", "sites", "per_round", "wall_s"} <= document.keys()
    assert document["rounds_completed"] == 2
    assert document["per_round"][1]["epsilon_by_site"] == {"hospital-1": 3.0, "hospital-2": 3.2}
    assert seen == [DemoOptions(sites=2, rounds=2)]


def test_demo_table_shows_every_round(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(medfed.demo, "run_demo", lambda options, progress, **kwargs: _results())
    result = runner.invoke(app, ["demo", "--sites", "2", "--rounds", "2"])
    assert result.exit_code == 0
    for text in ("0 (initial)", "0.7400", "0.5000", "0.800", "hospital-2 3.20"):
        assert text in result.stdout


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (MissingDependencyError("'flwr' was not found; install it with: pip install x"), 1),
        (ProcessDiedError("hospital-2 (pid 7) exited with code -9; last lines of log:\nkilled"), 1),
        (KeyboardInterrupt(), 130),
    ],
)
def test_demo_errors_are_one_message_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, error: BaseException, code: int
) -> None:
    def failing(options: DemoOptions, progress: object, **kwargs: object) -> RunResults:
        raise error

    monkeypatch.setattr(medfed.demo, "run_demo", failing)
    result = runner.invoke(app, ["demo", "--json"])
    assert result.exit_code == code
    assert result.stdout == ""
    assert result.stderr.startswith("medfed: error: ")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["demo", "--sites", "0"], ["demo", "--rounds", "x"], ["nope"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert runner.invoke(app, args).exit_code == 2


def test_simulation_without_ray_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = medfed.demo.importlib.util.find_spec
    monkeypatch.setattr(
        medfed.demo.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "ray" else real_find_spec(name, *a),
    )
    result = runner.invoke(app, ["demo", "--simulation", "--json"])
    assert result.exit_code == 1
    assert "--simulation needs Ray; install it with: pip install 'flwr[simulation]==1.42.*'" in (
        result.stderr
    )


def test_a_missing_flower_cli_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(medfed.processes.Path, "is_file", lambda self: False)
    monkeypatch.setenv("PATH", "/nonexistent")
    result = runner.invoke(app, ["demo", "--json"])
    assert result.exit_code == 1
    assert "'flower-superlink' was not found; install it with: pip install 'flwr==1.42.*'" in (
        result.stderr
    )
