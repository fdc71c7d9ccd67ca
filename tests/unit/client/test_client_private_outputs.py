"""Issue 14 at a real site: every number that leaves is inside the epsilon its officer
approved. The attacks that worked on main (a corrected value starting a fresh budget,
exact counts and fingerprints in the reply, unlimited free evaluations, Cox under DP)
are each refused or noised here."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from medfed.budget import budget_summary
from medfed.client.errors import BudgetRefusal, SiteRefusal
from medfed.client.privacy_gate import PrivacyGate
from medfed.client.trainer import SiteTrainer
from medfed.consortium import DemoSite, approve
from medfed.model.contract import DEMO_CONTRACT as CONTRACT
from medfed.model.contract import StudyContract, TaskSpec
from medfed.model.network import arrays_sha256, build_model, state_arrays
from medfed.privacy.ledger import PrivacyLedger
from medfed.privacy.population import NoisyCount
from tests.sitekit import (
    evaluate_request,
    fingerprint_of,
    global_arrays,
    ledger_of,
    make_study,
    officer_of,
    release_rows,
    rewrite_policy,
    site_config,
    spend_rows,
    table_path,
    train_request,
    unit_of,
    write_sites,
)

STUDY = make_study(rounds=1, sites=1, target_epsilon=2.0, local_steps=3, sample_rate=0.1)


@pytest.fixture
def site(tmp_path: Path) -> DemoSite:
    (only,) = write_sites(tmp_path, STUDY, n_sites=1, seed=3)
    return only


def _change_one_value(path: Path) -> None:
    """Correct one numeric value of the first patient by 0.01 (a data correction)."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    column = CONTRACT.numeric[0].name
    first = next(row for row in rows if row[column].strip())
    first[column] = str(float(first[column]) + 0.01)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_a_corrected_value_continues_the_same_budget_and_is_refused_at_the_cap(
    site: DemoSite,
) -> None:
    """On main, one value changed by 0.01 gave the same patients a fresh budget."""
    rewrite_policy(site.site_toml, epsilon_cap=2.3)
    SiteTrainer(site_config(site.site_toml), CONTRACT).train(train_request(STUDY))
    before = fingerprint_of(site.site_toml)

    _change_one_value(table_path(site.site_toml))
    assert fingerprint_of(site.site_toml) != before
    second = make_study(
        name="second-study", rounds=1, sites=1, target_epsilon=2.0, local_steps=3,
        sample_rate=0.1,
    )  # fmt: skip
    approve(site.site_toml, second, epsilon=2.0, officer_key=officer_of(site))
    trainer = SiteTrainer(site_config(site.site_toml), CONTRACT)

    with pytest.raises(BudgetRefusal, match=r"above the site.s cap 2\.3"):
        trainer.train(train_request(second, run_id="run-2"))
    assert [row.study.split("@")[0] for row in spend_rows(site.site_toml)] == [STUDY.name]
    assert {row.dataset for row in ledger_of(site.site_toml).records()} == {unit_of(site.site_toml)}


def test_the_reply_carries_no_exact_count_and_no_fingerprint(site: DemoSite) -> None:
    trainer = SiteTrainer(site_config(site.site_toml), CONTRACT)
    reply = trainer.train(train_request(STUDY))

    fingerprint = fingerprint_of(site.site_toml)
    assert reply.dataset_sha256 and reply.dataset_sha256 != fingerprint
    # The weight is the count the site released noised, charged once to its unit.
    (count_row,) = [r for r in release_rows(site.site_toml) if r.study == "medfed:patient-count"]
    assert count_row.event.sample_rate == 1.0
    assert reply.num_examples == trainer.noisy_count().public
    # The received model's figures came from one charged Gaussian release.
    (metrics_row,) = [r for r in release_rows(site.site_toml) if r.run_id == "run-1/metrics"]
    policy = site_config(site.site_toml).privacy
    assert metrics_row.event.noise_multiplier == policy.metrics_noise_multiplier
    assert len(reply.incoming.stats) > 0
    # The mechanism's sampling rate is the study's, not one derived from the exact count.
    (training,) = spend_rows(site.site_toml)
    assert training.event.sample_rate == STUDY.sample_rate


def test_evaluate_is_charged_once_per_round_and_limited_per_run(site: DemoSite) -> None:
    rewrite_policy(site.site_toml, max_evaluations_per_run=2)
    trainer = SiteTrainer(site_config(site.site_toml), CONTRACT)
    arrays = global_arrays()

    first = trainer.evaluate(evaluate_request(arrays, round_number=1))
    assert len(first.result.stats) > 0
    with pytest.raises(SiteRefusal, match="evaluated here already"):
        trainer.evaluate(evaluate_request(arrays, round_number=1))
    trainer.evaluate(evaluate_request(arrays, round_number=2))
    with pytest.raises(BudgetRefusal, match="2 evaluations"):
        trainer.evaluate(evaluate_request(arrays, round_number=3))
    evaluations = [r for r in release_rows(site.site_toml) if r.run_id == "run-1/evaluate"]
    assert [r.round for r in evaluations] == [1, 2]


def test_delta_must_be_below_a_tenth_of_one_over_the_noised_count(site: DemoSite) -> None:
    trainer = SiteTrainer(site_config(site.site_toml), CONTRACT)
    patients = trainer.noisy_count().public
    delta = 1 / (5 * patients)  # below 1/N, above 1/(10 N)
    rewrite_policy(site.site_toml, max_delta=0.5)
    trainer = SiteTrainer(site_config(site.site_toml), CONTRACT)
    with pytest.raises(SiteRefusal, match=r"above 1/\(10 x N\)"):
        trainer.train(train_request(STUDY, delta=delta))
    assert spend_rows(site.site_toml) == []


SURVIVAL = StudyContract.model_validate(
    {
        **CONTRACT.model_dump(),
        "tasks": [
            TaskSpec(
                name="death", kind="survival", target="time", event="died", survival_loss="cox"
            ).model_dump()
        ],
    }
)


def _gate_plan(site: DemoSite, contract: StudyContract) -> None:
    """Plan (and, when allowed, record) one round of `contract` at the site's gate."""
    config = site_config(site.site_toml)
    gate = PrivacyGate(config, PrivacyLedger(config.ledger_path))
    arrays = state_arrays(build_model("tiny", contract=contract, seed=0))
    request = train_request(
        STUDY,
        arrays=arrays,
        model_sha256=arrays_sha256(arrays),
        contract_json=contract.canonical_json(),
        contract_sha256=contract.sha256(),
    )
    count = NoisyCount("unit", "v", 200.0, 10.0)
    plan = gate.plan(request, unit="unit", count=count, contract=contract)
    gate.record(request, plan, unit="unit")


def test_cox_under_dp_is_refused_in_one_line_unless_the_policy_allows_it(
    site: DemoSite,
) -> None:
    with pytest.raises(SiteRefusal) as refused:
        _gate_plan(site, SURVIVAL)
    assert "Cox partial likelihood" in str(refused.value)
    assert "\n" not in str(refused.value)

    rewrite_policy(site.site_toml, allow_unbounded_mechanisms=True)
    _gate_plan(site, SURVIVAL)
    # The ledger and the officer's view say the round has no guarantee.
    (note,) = ledger_of(site.site_toml).population.notes("unit")
    assert note[3].startswith("no guarantee:")
    summary = budget_summary(site_config(site.site_toml))
    (unit,) = [b for b in summary.datasets if b.dataset == "unit"]
    assert unit.no_guarantee == [f"run run-1 round 1: {note[3]}"]
