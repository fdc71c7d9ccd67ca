"""The site's privacy gate in-process: budgets, approvals and policy are enforced before
any training step, and every decision is on signed records the officer can check."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import medfed.client.trainer as trainer_module
from medfed.cli import app
from medfed.client.config import load_site_config
from medfed.client.errors import BudgetRefusal, SiteRefusal
from medfed.client.protocol import TrainRequest
from medfed.client.trainer import SiteTrainer
from medfed.consortium import approve, demo_study, write_demo_consortium
from medfed.coordinator.study import StudySettings
from medfed.model.contract import DEMO_CONTRACT
from medfed.privacy.audit import verify_audit_log
from medfed.privacy.signing import SigningKey
from tests.references import dp_accounting_epsilon
from tests.sitekit import train_request, training_records

STEPS = 5


def _renamed(study: StudySettings, name: str, **changes: Any) -> StudySettings:
    values = {**study.to_run_config(), "study-name": name, **changes}
    return StudySettings.model_validate(values)


def _study(name: str = "study-a", *, rounds: int = 2, epsilon: float = 2.0) -> StudySettings:
    base = demo_study(rounds=rounds, sites=1, target_epsilon=epsilon, seed=3, local_steps=STEPS)
    return _renamed(base, name)


def _request(study: StudySettings, round_number: int, **changes: Any) -> TrainRequest:
    return train_request(study, round_number, run_id=f"run-{study.name}", **changes)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """One demo hospital, with `study-a` approved at epsilon 2; returns its site.toml."""
    (only,) = write_demo_consortium(tmp_path, _study(), n_sites=1, seed=5)
    return only.site_toml


def _officer(site_toml: Path) -> SigningKey:
    return SigningKey.load(site_toml.parent / "officer" / "officer.key")


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any training step starts."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a training step ran although the round should have been refused")

    monkeypatch.setattr(trainer_module, "train_steps", forbidden)


def _rows(site_toml: Path) -> int:
    config = load_site_config(site_toml)
    with sqlite3.connect(config.ledger_path) as connection:
        # DP-SGD spends only (the releases of counts and metrics are rows of their own).
        return int(
            connection.execute(
                "SELECT COUNT(*) FROM spend WHERE study NOT LIKE 'medfed:%'"
                " AND run_id NOT LIKE '%/%'"
            ).fetchone()[0]
        )


def test_a_study_spends_what_its_approval_allows_and_no_more(site: Path) -> None:
    study = _study()
    trainer = SiteTrainer(load_site_config(site), DEMO_CONTRACT)
    replies = [trainer.train(_request(study, r)) for r in (1, 2)]

    # Calibrated: the planned rounds end at (not above, and within 5% of) the approval,
    # by our accountant and by Google's dp-accounting over the recorded events.
    # The study's spend (the replies' epsilon) is its rounds and their metrics'
    # releases; the unit's total adds the noised count's release.
    study_events = [row.event for row in trainer.ledger.records() if "@" in row.study]
    assert 0.95 * 2.0 <= replies[-1].epsilon <= 2.0
    assert dp_accounting_epsilon(study_events, study.delta) == pytest.approx(
        replies[-1].epsilon, rel=1e-3
    )
    assert all(reply.noise_multiplier >= 0.5 for reply in replies)
    assert [row.event.noise_multiplier for row in training_records(trainer.ledger)] == [
        reply.noise_multiplier for reply in replies
    ]

    # A round past the plan would spend beyond the approval: refused.
    with pytest.raises(SiteRefusal, match="beyond the 2 rounds planned"):
        trainer.train(_request(study, 3))
    assert _rows(site) == 2


def test_an_unapproved_study_is_refused_before_any_step(site: Path, no_training: None) -> None:
    other = _renamed(_study(), "study-b")
    trainer = SiteTrainer(load_site_config(site), DEMO_CONTRACT)
    with pytest.raises(SiteRefusal, match="has no valid approval"):
        trainer.train(_request(other, 1))
    assert _rows(site) == 0


def test_an_approval_signed_by_another_key_is_not_an_approval(
    site: Path, no_training: None
) -> None:
    # Someone with write access to the ledger file adds an approval signed by a key of
    # their own: the site trusts only its officer's key, so the study stays unapproved.
    other = _renamed(_study(), "study-b")
    approve(site, other, epsilon=2.0, officer_key=SigningKey.generate())
    trainer = SiteTrainer(load_site_config(site), DEMO_CONTRACT)
    with pytest.raises(SiteRefusal, match="no valid approval"):
        trainer.train(_request(other, 1))
    shown = CliRunner().invoke(app, ["budget", "show", str(site), "--json"])
    (invalid,) = json.loads(shown.stdout)["invalid_approvals"]
    assert "approval 2" in invalid


def test_a_second_study_beyond_the_dataset_cap_is_refused_before_any_step(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each study alone fits a cap of 9; together they would not (9.27 by RDP).
    site.write_text(site.read_text().replace("epsilon_cap = 10.0", "epsilon_cap = 9.0"))
    trainer = SiteTrainer(load_site_config(site), DEMO_CONTRACT)
    first = _study(epsilon=8.0, rounds=1)
    approve(site, first, epsilon=8.0, officer_key=_officer(site))
    trainer.train(_request(first, 1))
    spent = trainer.ledger.epsilon(trainer.privacy_unit, delta=1e-5)

    second = _renamed(first, "study-b")
    approve(site, second, epsilon=8.0, officer_key=_officer(site))
    monkeypatch.setattr(trainer_module, "train_steps", _forbidden)
    with pytest.raises(
        BudgetRefusal,
        match=r"out of budget: the dataset would reach epsilon 9\.\d+, above the site's cap 9$",
    ):
        trainer.train(_request(second, 1))
    assert _rows(site) == 1
    assert trainer.ledger.epsilon(trainer.privacy_unit, delta=1e-5) == spent


def _forbidden(*args: object, **kwargs: object) -> None:
    raise AssertionError("a training step ran although the round should have been refused")


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"max_grad_norm": 50.0}, "clipping norm 50 exceeds the site's maximum 10"),
        ({"delta": 1e-4}, "delta 0.0001 exceeds the site's maximum 1e-05"),
        ({"target_epsilon": 1e-4}, "out of budget"),
    ],
)
def test_policy_limits_refuse_the_round(
    site: Path, no_training: None, changes: dict[str, Any], reason: str
) -> None:
    trainer = SiteTrainer(load_site_config(site), DEMO_CONTRACT)
    with pytest.raises(SiteRefusal, match=reason):
        trainer.train(_request(_study(), 1, **changes))
    assert _rows(site) == 0


def test_every_decision_is_in_the_signed_audit_log(site: Path) -> None:
    config = load_site_config(site)
    trainer = SiteTrainer(config, DEMO_CONTRACT)
    trainer.train(_request(_study(), 1))
    with pytest.raises(SiteRefusal):
        trainer.train(_request(_renamed(_study(), "study-b"), 1))

    public = SigningKey.load(config.signing_key_path).public
    verification = verify_audit_log(config.audit_path, public)
    assert verification.ok, verification.first_bad
    events = [
        line.split('"event":"')[1].split('"')[0]
        for line in config.audit_path.read_text().splitlines()
    ]
    # The noised patient count's release, the round's spend, the release of the round's
    # noised metrics (a ledger row of its own), the refusal.
    assert events == ["budget spent", "budget spent", "budget spent", "round refused"]


def test_the_officer_sees_a_tampered_ledger_row(site: Path, tmp_path: Path) -> None:
    config = load_site_config(site)
    trainer = SiteTrainer(config, DEMO_CONTRACT)
    trainer.train(_request(_study(), 1))
    runner = CliRunner()
    assert runner.invoke(app, ["budget", "show", str(site)]).exit_code == 0

    # Someone lowers the recorded steps behind the triggers' back.
    with sqlite3.connect(config.ledger_path) as connection:
        connection.execute("DROP TRIGGER spend_no_update")
        connection.execute("UPDATE spend SET steps = 1")
    report = tmp_path / "report.html"
    result = runner.invoke(app, ["budget", "report", str(site), "--out", str(report)])
    assert result.exit_code == 1
    assert "signature does not match the row" in result.stderr
    page = report.read_text()
    assert "Ledger verification FAILED" in page and "<svg" in page
    assert runner.invoke(app, ["budget", "show", str(site), "--json"]).exit_code == 1


def test_budget_show_matches_an_independent_accountant(site: Path) -> None:
    trainer = SiteTrainer(load_site_config(site), DEMO_CONTRACT)
    study = _study()
    for r in (1, 2):
        trainer.train(_request(study, r))
    result = CliRunner().invoke(app, ["budget", "show", str(site), "--json"])
    assert result.exit_code == 0, result.output
    (dataset,) = json.loads(result.stdout)["datasets"]
    reference = dp_accounting_epsilon([row.event for row in trainer.ledger.records()], 1e-5)
    assert dataset["epsilon_spent"] == pytest.approx(reference, rel=1e-3)
    assert dataset["epsilon_remaining"] == pytest.approx(10.0 - reference, rel=1e-3)
    assert dataset["privacy_unit"] == load_site_config(site).site.id
    assert dataset["neighbouring_relation"].startswith("add or remove one patient")
    (count, spend) = dataset["studies"]
    assert count["study"] == "medfed:patient-count"
    assert spend["approved_epsilon"] == 2.0
    assert spend["rounds_by_run"] == {"run-study-a": 2, "run-study-a/metrics": 2}
    assert spend["epsilon"] < dataset["epsilon_spent"]


def test_refusals_and_a_tampered_audit_log_reach_the_officer(site: Path, tmp_path: Path) -> None:
    config = load_site_config(site)
    trainer = SiteTrainer(config, DEMO_CONTRACT)
    trainer.train(_request(_study(), 1))
    with pytest.raises(SiteRefusal):
        trainer.train(_request(_renamed(_study(), "study-b"), 1))
    runner = CliRunner()
    shown = json.loads(runner.invoke(app, ["budget", "show", str(site), "--json"]).stdout)
    (refusal,) = shown["refusals"]
    assert refusal["study"] == "study-b" and "no valid approval" in refusal["reason"]
    assert shown["audit_verified"] is True

    audit = ["audit", "verify", str(config.audit_path), "--key", str(site), "--json"]
    verified = runner.invoke(app, audit)
    # The count's release, the round's spend, its metrics' release and the refusal.
    assert verified.exit_code == 0 and json.loads(verified.stdout)["entries_checked"] == 4

    # Swap the first two entries: the chain names line 1 as the first bad entry.
    lines = config.audit_path.read_text().splitlines(keepends=True)
    config.audit_path.write_text(lines[1] + lines[0] + "".join(lines[2:]))
    broken = runner.invoke(app, audit)
    assert broken.exit_code == 1
    assert json.loads(broken.stdout)["first_bad"]["line"] == 1
    report = tmp_path / "report.html"
    result = runner.invoke(app, ["budget", "report", str(site), "--out", str(report)])
    assert result.exit_code == 1
    assert "Audit log verification FAILED" in report.read_text()
    assert "audit log:" in result.stderr and "line 1" in result.stderr
