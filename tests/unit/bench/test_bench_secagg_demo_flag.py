"""`medfed demo --no-secure-aggregation` (for `medfed bench secagg --demo-rounds`): the
study the sites approve has secure aggregation off, the demo says so loudly, and the
benchmark's demo runs alternate which side goes first. No demo runs here."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import medfed.demo
from medfed.bench.secagg_demo import demo_argv, order_of
from medfed.cli import app
from medfed.coordinator.study import StudySettings
from medfed.demo import DemoOptions, privacy_warnings, run_demo, synthetic_study
from medfed.errors import DemoFailedError


def test_the_flag_turns_secure_aggregation_off_in_the_study() -> None:
    secure = synthetic_study(DemoOptions(sites=3, rounds=2))
    plain = synthetic_study(DemoOptions(sites=3, rounds=2, secure_aggregation=False))
    assert secure.secure_aggregation is True
    assert plain.secure_aggregation is False
    assert plain.sha256() != secure.sha256()  # an approval of one is not one of the other
    assert plain.to_run_config()["secure-aggregation"] is False
    assert privacy_warnings(DemoOptions()) == []
    (line,) = privacy_warnings(DemoOptions(secure_aggregation=False))
    assert "SECURE AGGREGATION IS OFF" in line and "sees each site's" in line


class _Stop(Exception):
    pass


def test_the_sites_approve_the_study_with_the_flag(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    approved: list[StudySettings] = []

    def write_demo_consortium(root: Path, study: StudySettings, **kwargs: object) -> None:
        approved.append(study)
        raise _Stop

    monkeypatch.setattr(medfed.demo, "_programs", lambda simulation: None)
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    monkeypatch.setattr(medfed.demo, "write_demo_consortium", write_demo_consortium)
    notices: list[str] = []
    with pytest.raises(_Stop):
        run_demo(DemoOptions(secure_aggregation=False), lambda _: None, notify=notices.append)
    assert [study.secure_aggregation for study in approved] == [False]
    assert notices[0].startswith("WARNING: SECURE AGGREGATION IS OFF")


def test_the_cli_passes_the_flag_and_reports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[DemoOptions] = []

    def fake_run_demo(options: DemoOptions, progress: object, **kwargs: object) -> object:
        seen.append(options)
        raise DemoFailedError("stopped by the test")

    monkeypatch.setattr(medfed.demo, "run_demo", fake_run_demo)
    result = CliRunner().invoke(app, ["demo", "--no-secure-aggregation", "--json"])
    assert result.exit_code == 1
    assert [options.secure_aggregation for options in seen] == [False]
    refused = CliRunner().invoke(app, ["demo", "--no-secure-aggregation", "--example", "lung"])
    assert refused.exit_code == 2 and "Traceback" not in refused.output


def test_the_demo_pairs_alternate_and_only_plain_gets_the_flag() -> None:
    assert [order_of(r) for r in range(3)] == [
        ["secure", "plain"], ["plain", "secure"], ["secure", "plain"]
    ]  # fmt: skip
    medfed = Path("/venv/bin/medfed")
    assert "--no-secure-aggregation" in demo_argv(medfed, "plain", rounds=3, sites=3)
    assert "--no-secure-aggregation" not in demo_argv(medfed, "secure", rounds=3, sites=3)
