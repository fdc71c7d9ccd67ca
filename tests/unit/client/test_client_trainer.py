"""SiteTrainer in-process: the digest check, the noise the site calibrates for itself, the
signed DP-SGD spend in its ledger, and refusal of a replay."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import medfed.client.trainer as trainer_module
from medfed.client.errors import SiteRefusal
from medfed.client.trainer import SiteTrainer
from medfed.consortium import DemoSite, approve
from medfed.model.contract import DEMO_CONTRACT as CONTRACT
from medfed.model.contract import OmicsPanel, StudyContract, TaskSpec
from medfed.model.network import arrays_sha256, build_model, load_arrays, state_arrays
from medfed.privacy.accountant import AccountantKind
from medfed.sites.config import DatasetConfig, NumericSource, TargetSource
from medfed.sites.export import datasets_toml
from medfed.sites.manifest import load_site_data
from tests.reference_table import SiteTable
from tests.references import dp_accounting_epsilon
from tests.sitekit import (
    DELTA,
    POLICY,
    evaluate_request,
    fingerprint_of,
    global_arrays,
    ledger_of,
    make_study,
    officer_of,
    rewrite_policy,
    site_config,
    site_public_key,
    spend_rows,
    table_of,
    table_path,
    train_request,
    write_sites,
)

SITE = "hospital-1"
# 0.07 of a site's training rows is not a whole batch: Opacus rounds the rate.
SAMPLE_RATE = 0.07
STUDY = make_study(rounds=3, sites=1, target_epsilon=2.0, local_steps=4, sample_rate=SAMPLE_RATE)
CALIBRATION_TIGHTNESS = 0.05
"""After the last planned round a site has spent at least 95% of its target epsilon."""


@pytest.fixture
def site(tmp_path: Path) -> DemoSite:
    (only,) = write_sites(tmp_path, STUDY, n_sites=1, seed=3)
    assert only.site_id == SITE
    return only


@pytest.fixture
def site_toml(site: DemoSite) -> Path:
    return site.site_toml


@pytest.fixture
def table(site_toml: Path) -> SiteTable:
    """The site's table read on its own, as the reference for what the trainer used."""
    return table_of(site_toml)


def trainer_of(site_toml: Path) -> SiteTrainer:
    return SiteTrainer(site_config(site_toml), CONTRACT)


def opacus_rate(rows: int, requested: float) -> float:
    """The Poisson rate Opacus really samples at: 1 / batches per epoch of the plain loader."""
    batch_size = max(1, round(requested * rows))
    return 1.0 / math.ceil(rows / batch_size)


reference_epsilon = dp_accounting_epsilon


def test_a_train_records_its_signed_spend_before_replying(
    site_toml: Path, table: SiteTable
) -> None:
    request = train_request(STUDY)
    n_train = len(table.train_labels)
    assert opacus_rate(n_train, SAMPLE_RATE) != SAMPLE_RATE

    reply = trainer_of(site_toml).train(request)

    (row,) = spend_rows(site_toml)
    assert row.dataset == fingerprint_of(site_toml)
    assert (row.study, row.run_id, row.round) == (f"{STUDY.name}@{STUDY.sha256()}", "run-1", 1)
    assert row.event.steps == request.local_steps
    assert row.event.noise_multiplier == reply.noise_multiplier
    assert row.event.sample_rate == pytest.approx(opacus_rate(n_train, SAMPLE_RATE), rel=1e-12)
    assert row.delta == request.delta
    # Signed with the site's key from site.toml, checked against the key file on disk.
    verification = ledger_of(site_toml).verify(site_public_key(site_toml))
    assert verification.ok, verification.bad
    assert verification.rows_checked == 1
    assert reply.epsilon == ledger_of(site_toml).epsilon(fingerprint_of(site_toml), delta=DELTA)
    assert reply.epsilon == pytest.approx(reference_epsilon([row.event], DELTA), rel=1e-3)


def test_the_noise_a_site_reports_is_its_ledgers_and_at_least_the_policy_minimum(
    site_toml: Path,
) -> None:
    trainer = trainer_of(site_toml)
    replies = [trainer.train(train_request(STUDY, k)) for k in (1, 2, 3)]

    rows = spend_rows(site_toml)
    assert [row.round for row in rows] == [1, 2, 3]
    for reply, row in zip(replies, rows, strict=True):
        assert reply.noise_multiplier == row.event.noise_multiplier
        assert reply.noise_multiplier >= POLICY.min_noise_multiplier
    # The site chose its noise from the budget: less noise would have overspent it.
    # (The reference is dp-accounting over the ledger's events, not medfed's accountant;
    # over orders from 2 up it may sit up to 0.5% above ours, see test_privacy_calibration.)
    events = [row.event for row in rows]
    assert reference_epsilon(events, DELTA) <= STUDY.target_epsilon * 1.005
    less = [replace(event, noise_multiplier=event.noise_multiplier * 0.9) for event in events]
    assert reference_epsilon(less, DELTA) > STUDY.target_epsilon


def test_the_policy_minimum_noise_wins_over_a_looser_budget(site_toml: Path) -> None:
    rewrite_policy(site_toml, min_noise_multiplier=2.5)

    reply = trainer_of(site_toml).train(train_request(STUDY))

    (row,) = spend_rows(site_toml)
    assert reply.noise_multiplier == row.event.noise_multiplier == 2.5
    assert reply.epsilon < STUDY.target_epsilon


@pytest.mark.parametrize(
    "accountant",
    [
        "rdp",
        pytest.param(
            "prv",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_after_the_last_planned_round_a_site_has_spent_its_target_within_5_percent(
    site_toml: Path, accountant: AccountantKind
) -> None:
    rewrite_policy(site_toml, accountant=accountant)
    trainer = trainer_of(site_toml)

    replies = [trainer.train(train_request(STUDY, k)) for k in range(1, STUDY.num_rounds + 1)]

    final = replies[-1].epsilon
    target = STUDY.target_epsilon
    assert (1 - CALIBRATION_TIGHTNESS) * target <= final <= target
    assert all(a.epsilon < b.epsilon for a, b in itertools.pairwise(replies))
    if accountant == "rdp":
        events = [row.event for row in spend_rows(site_toml)]
        assert final == pytest.approx(reference_epsilon(events, DELTA), rel=1e-3)


def test_the_officers_approval_caps_the_target(site: DemoSite) -> None:
    generous = make_study(
        rounds=2, sites=1, target_epsilon=3.0, local_steps=4, sample_rate=SAMPLE_RATE
    )
    approve(site.site_toml, generous, epsilon=1.5, officer_key=officer_of(site))
    trainer = trainer_of(site.site_toml)

    replies = [trainer.train(train_request(generous, k)) for k in (1, 2)]

    events = [row.event for row in spend_rows(site.site_toml)]
    assert (1 - CALIBRATION_TIGHTNESS) * 1.5 <= replies[-1].epsilon <= 1.5
    assert replies[-1].epsilon == pytest.approx(reference_epsilon(events, DELTA), rel=1e-3)


def test_a_train_reply_describes_the_sites_data_and_a_new_model(
    site_toml: Path, table: SiteTable
) -> None:
    request = train_request(STUDY)
    trainer = trainer_of(site_toml)

    reply = trainer.train(request)

    assert reply.site_id == SITE
    assert reply.num_examples == len(table.train_labels)
    assert reply.incoming.held_out.examples == len(table.eval_labels)
    assert reply.incoming.train_examples == len(table.train_labels)
    assert math.isfinite(reply.local_loss)
    assert reply.arrays.keys() == request.arrays.keys()
    for name, array in reply.arrays.items():
        assert array.dtype == np.float32
        assert array.shape == request.arrays[name].shape
        assert np.isfinite(array).all()
    assert any(not np.array_equal(reply.arrays[n], request.arrays[n]) for n in reply.arrays)
    # The incoming model's evaluation is that of the model as received.
    incoming = trainer.evaluate(evaluate_request(request.arrays)).result
    assert reply.incoming.held_out.loss == pytest.approx(incoming.held_out.loss, rel=1e-6)
    assert reply.incoming.train_loss == pytest.approx(incoming.train_loss, rel=1e-6)


def test_a_second_train_of_the_same_round_is_refused(site_toml: Path) -> None:
    trainer = trainer_of(site_toml)
    trainer.train(train_request(STUDY))

    with pytest.raises(SiteRefusal, match="run run-1 round 1 was already trained here"):
        trainer.train(train_request(STUDY))
    # Also from a fresh trainer (another ClientApp process) with other settings.
    with pytest.raises(SiteRefusal, match="already trained"):
        trainer_of(site_toml).train(train_request(STUDY, local_steps=9))

    assert len(spend_rows(site_toml)) == 1


def test_rounds_compose_in_the_ledger(site_toml: Path) -> None:
    trainer = trainer_of(site_toml)
    first = trainer.train(train_request(STUDY, 1))
    second = trainer.train(train_request(STUDY, 2, local_steps=6))

    rows = spend_rows(site_toml)
    assert [(row.round, row.event.steps) for row in rows] == [(1, 4), (2, 6)]
    assert [row.event.noise_multiplier for row in rows] == [
        first.noise_multiplier,
        second.noise_multiplier,
    ]
    assert second.epsilon > first.epsilon
    assert second.epsilon == pytest.approx(
        reference_epsilon([row.event for row in rows], DELTA), rel=1e-3
    )


def test_evaluate_scores_the_held_out_patients_and_spends_nothing(
    site_toml: Path, table: SiteTable
) -> None:
    reply = trainer_of(site_toml).evaluate(evaluate_request(global_arrays()))

    assert reply.site_id == SITE
    held_out = reply.result.held_out
    assert held_out.examples == len(table.eval_labels)
    assert math.isfinite(held_out.loss)
    assert 0.0 <= held_out.auroc <= 1.0
    assert 0.0 <= held_out.accuracy <= 1.0
    # The training-set loss, against BCE computed here from the same arrays.
    model = build_model("tiny", contract=CONTRACT, seed=0)
    load_arrays(model, global_arrays())
    features = torch.from_numpy(table.train_features)
    with torch.no_grad():
        logits = model(features, torch.ones(features.shape, dtype=torch.bool))["readmission"]
        expected = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, torch.from_numpy(table.train_labels).float()
        )
    assert reply.result.train_examples == len(table.train_labels)
    assert reply.result.train_loss == pytest.approx(float(expected), rel=1e-5)
    assert spend_rows(site_toml) == []


def test_held_out_metrics_below_the_minimum_cohort_are_withheld(
    site_toml: Path, table: SiteTable
) -> None:
    n_eval, n_train = len(table.eval_labels), len(table.train_labels)
    assert n_eval < n_train
    rewrite_policy(site_toml, min_cohort_k=n_eval + 1)
    trainer = trainer_of(site_toml)

    checks = [
        trainer.evaluate(evaluate_request(global_arrays())).result,
        trainer.train(train_request(STUDY)).incoming,
    ]

    for check in checks:
        assert check.held_out.examples == 0
        assert math.isnan(check.held_out.loss)
        assert math.isnan(check.held_out.auroc)
        assert math.isnan(check.held_out.accuracy)
        assert check.train_examples == n_train  # the training cohort is large enough


def test_no_metric_of_a_cohort_below_the_minimum_leaves_the_site(
    site_toml: Path, table: SiteTable
) -> None:
    rewrite_policy(site_toml, min_cohort_k=len(table.train_labels) + 1)

    try:
        check = trainer_of(site_toml).evaluate(evaluate_request(global_arrays())).result
    except SiteRefusal:
        return  # refusing the evaluation outright also keeps the cohort's loss at the site
    assert check.train_examples == 0
    assert math.isnan(check.train_loss)


def test_a_model_that_does_not_match_its_digest_is_refused(site_toml: Path) -> None:
    request = train_request(STUDY)
    tampered = {name: array.copy() for name, array in request.arrays.items()}
    tampered["heads.readmission.bias"][0] += 1e-3

    trainer = trainer_of(site_toml)
    with pytest.raises(SiteRefusal, match="does not match its announced digest"):
        trainer.train(replace(request, arrays=tampered))
    with pytest.raises(SiteRefusal, match="does not match its announced digest"):
        trainer.evaluate(replace(evaluate_request(request.arrays), arrays=tampered))
    assert spend_rows(site_toml) == []


def test_a_model_of_another_architecture_or_preset_is_refused(site_toml: Path) -> None:
    """Same names and shapes are not enough: the coordinator names what the model is."""
    request = train_request(STUDY)
    trainer = trainer_of(site_toml)
    other = f"medfed-fusion/99/small/{request.contract_sha256}"
    with pytest.raises(SiteRefusal, match="does not run"):
        trainer.train(replace(request, model_identity=other))
    with pytest.raises(SiteRefusal, match="does not run"):
        trainer.evaluate(replace(evaluate_request(request.arrays), model_identity=other))
    assert spend_rows(site_toml) == []


def test_a_contract_that_does_not_match_its_digest_is_refused(site_toml: Path) -> None:
    from medfed.client.site_api import SiteService

    other = CONTRACT.model_copy(update={"name": "other"})
    service = SiteService(site_config(site_toml))
    with pytest.raises(SiteRefusal, match="contract does not match its announced digest"):
        service.train(train_request(STUDY, contract_json=other.canonical_json()))
    with pytest.raises(SiteRefusal, match="contract is malformed"):
        service.train(train_request(STUDY, contract_json='{"tasks": []}'))
    assert spend_rows(site_toml) == []


def test_a_model_of_the_wrong_shape_is_refused_even_with_its_digest(site_toml: Path) -> None:
    arrays = global_arrays()
    arrays["heads.readmission.bias"] = np.zeros(2, dtype=np.float32)
    request = train_request(STUDY, arrays=arrays, model_sha256=arrays_sha256(arrays))

    with pytest.raises(SiteRefusal, match="does not fit the study's network"):
        trainer_of(site_toml).train(request)
    assert spend_rows(site_toml) == []


def test_a_site_with_a_broken_table_cannot_start(site_toml: Path) -> None:
    path = table_path(site_toml)
    lines = path.read_text(encoding="utf-8").splitlines()
    cells = lines[5].split(",")
    cells[2] = "heavy"  # bmi
    lines[5] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with pytest.raises(SiteRefusal, match=r"row 6, column bmi: 'heavy' is not a number"):
        trainer_of(site_toml)


def test_an_overlapping_train_of_the_same_round_is_refused(
    site_toml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = train_request(STUDY)
    first = trainer_of(site_toml)
    other_process = trainer_of(site_toml)
    real_train_steps = trainer_module.train_steps
    other_replies = []

    def meanwhile_the_other_process_trains(*args: object, **kwargs: object) -> object:
        monkeypatch.setattr(trainer_module, "train_steps", real_train_steps)
        # It passes the ledger check too, and records first.
        other_replies.append(other_process.train(request))
        return real_train_steps(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trainer_module, "train_steps", meanwhile_the_other_process_trains)

    with pytest.raises(SiteRefusal, match="trained here concurrently"):
        first.train(request)
    (row,) = spend_rows(site_toml)
    (other,) = other_replies
    assert row.event.noise_multiplier == other.noise_multiplier


def test_a_study_with_another_digest_is_another_study(site_toml: Path) -> None:
    # The approval names the study's digest: the same name with other settings is not it.
    edited = make_study(
        rounds=3, sites=1, target_epsilon=2.0, local_steps=5, sample_rate=SAMPLE_RATE
    )
    assert edited.name == STUDY.name
    assert edited.sha256() != STUDY.sha256()

    with pytest.raises(SiteRefusal, match="has no valid approval"):
        trainer_of(site_toml).train(train_request(edited))
    assert spend_rows(site_toml) == []


# --- trained groups: a site trains only what its data can teach ----------------------------


def wider_contract() -> StudyContract:
    """The demo contract plus an omics panel and a second task this site has no data for."""
    return CONTRACT.model_copy(
        update={
            "omics": OmicsPanel(genes=("TP53", "EGFR")),
            "tasks": (*CONTRACT.tasks, TaskSpec(name="mortality", kind="binary", target="died")),
        }
    )


def map_only_the_demo_columns(site_toml: Path, *, label: bool = True) -> None:
    """Give site.toml one `[[datasets]]` entry: the demo table's features and (with
    `label`) its one label."""
    dataset = DatasetConfig(
        name="patients",
        format="csv",
        paths=(table_path(site_toml).resolve(),),
        patient_id=CONTRACT.patient_id,
        numeric={feature.name: NumericSource() for feature in CONTRACT.numeric},
        targets={CONTRACT.tasks[0].target: TargetSource()} if label else {},
    )
    with site_toml.open("a", encoding="utf-8") as out:
        out.write("\n" + datasets_toml([dataset]))


def test_a_site_trains_only_the_groups_its_data_can_teach(site_toml: Path) -> None:
    map_only_the_demo_columns(site_toml)
    contract = wider_contract()
    study = make_study(rounds=3, sites=1, target_epsilon=2.0, local_steps=4, sample_rate=0.07)
    trainer = SiteTrainer(site_config(site_toml), contract)
    arrays = state_arrays(build_model("tiny", contract=contract, seed=5))
    request = train_request(
        study,
        arrays=arrays,
        contract_json=contract.canonical_json(),
        contract_sha256=contract.sha256(),
    )

    reply = trainer.train(request)

    assert reply.trained_groups == "encoders.clinical,fusion,heads.readmission"
    assert (
        reply.dataset_sha256
        == load_site_data(site_config(site_toml), contract).manifest.fingerprint
    )
    assert reply.arrays.keys() == arrays.keys()  # every array goes back, as validation expects
    for name, before in arrays.items():
        after = reply.arrays[name]
        if name.startswith(("encoders.omics.", "heads.mortality.")):
            np.testing.assert_array_equal(after, before)  # no update and no DP noise
    changed = [n for n in arrays if not np.array_equal(arrays[n], reply.arrays[n])]
    assert any(n.startswith("encoders.clinical.") for n in changed)
    assert any(n.startswith("fusion.") for n in changed)
    assert any(n.startswith("heads.readmission.") for n in changed)


def test_a_site_without_labels_for_any_task_refuses_the_contract(site_toml: Path) -> None:
    map_only_the_demo_columns(site_toml, label=False)
    contract = CONTRACT.model_copy(
        update={"tasks": (TaskSpec(name="mortality", kind="binary", target="died"),)}
    )
    with pytest.raises(SiteRefusal, match="no labels for any of the study's tasks"):
        SiteTrainer(site_config(site_toml), contract)


def test_fedprox_pulls_the_update_towards_the_global_model(site_toml: Path) -> None:
    # The same seed and noise with and without mu: the proximal pull can only shrink the
    # distance from the global model (it is a contraction towards the anchor each step).
    arrays = global_arrays()
    plain = trainer_of(site_toml).train(train_request(STUDY, run_id="plain"))
    prox = trainer_of(site_toml).train(train_request(STUDY, run_id="prox", proximal_mu=10.0))

    def distance(update: dict[str, np.ndarray]) -> float:
        return float(sum(np.sum((update[n] - arrays[n]) ** 2) for n in arrays))

    assert distance(prox.arrays) < distance(plain.arrays)


def test_an_unavailable_accelerator_is_refused_not_swapped_for_the_cpu(site_toml: Path) -> None:
    # site.toml names the Rebellions NPU, whose package is not installed here: the site
    # must say so rather than quietly train on the CPU.
    site_toml.write_text('accelerator = "rbln"\n' + site_toml.read_text(encoding="utf-8"))
    with pytest.raises(SiteRefusal, match=r"accelerator 'rbln'.*torch-rbln"):
        trainer_of(site_toml)


def test_a_reply_carries_its_own_studys_spend_not_the_datasets_total(site: DemoSite) -> None:
    site_toml = site.site_toml
    other = make_study(name="second-study", rounds=3, sites=1, target_epsilon=2.0,
                       local_steps=4, sample_rate=SAMPLE_RATE)  # fmt: skip
    approve(site_toml, other, epsilon=2.0, officer_key=officer_of(site))
    trainer = trainer_of(site_toml)
    trainer.train(train_request(STUDY, 1))
    reply = trainer.train(train_request(other, 1, run_id="run-2"))

    rows = spend_rows(site_toml)
    assert [row.study.split("@")[0] for row in rows] == [STUDY.name, "second-study"]
    own = [row.event for row in rows if row.study.startswith("second-study@")]
    assert reply.epsilon == pytest.approx(reference_epsilon(own, DELTA), rel=1e-3)
    total = ledger_of(site_toml).epsilon(fingerprint_of(site_toml), delta=DELTA)
    assert reply.epsilon < total  # the dataset's total over both studies is the officer's
