"""The privacy unit, the Gaussian release of metrics, the neighbouring relation and the
policy's hygiene (issue 14), each against a reference that is not medfed's own code:
dp-accounting's PLD accountant (add/remove-one), the plain sum, the exact AUROC."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent, NeighboringRelation, PoissonSampledDpEvent
from dp_accounting.pld import PLDAccountant
from pydantic import ValidationError
from sklearn.metrics import roc_auc_score

from medfed.privacy import release
from medfed.privacy.accountant import epsilon_of
from medfed.privacy.events import DpSgdEvent
from medfed.privacy.ledger import PrivacyLedger, SpendRecord
from medfed.privacy.policy import PastSpend, PlannedRound, PrivacyPolicy, preflight
from medfed.privacy.population import (
    NEIGHBOURING_RELATION,
    keyed_digest,
    patient_key_secret,
    patient_keys,
)
from medfed.privacy.release import PatientStats
from medfed.privacy.signing import SigningKey

SIGNER = SigningKey.generate()
SECRET = patient_key_secret(SIGNER)
NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


def spend(unit: str, run: str, event: DpSgdEvent) -> SpendRecord:
    return SpendRecord(dataset=unit, study="s@x", run_id=run, round=1, event=event, delta=1e-5)


# --- 1. the privacy unit -------------------------------------------------------------


def test_a_unit_renamed_over_the_same_patients_keeps_its_budget(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    patients = [f"p{i}" for i in range(50)]
    ledger.population.register("cohort-a", patient_keys(SECRET, patients))
    first = DpSgdEvent(noise_multiplier=1.0, sample_rate=0.1, steps=100)
    ledger.record(spend("cohort-a", "run-1", first), signer=SIGNER)

    # The officer (or an operator) declares a new unit over a corrected data version
    # that shares one patient: the old unit's spend still falls on it.
    ledger.population.register("cohort-b", patient_keys(SECRET, [*patients[-1:], "new"]))
    assert [r.event for r in ledger.unit_records("cohort-b")] == [first]
    # A disjoint population is another budget.
    ledger.population.register("cohort-c", patient_keys(SECRET, ["x", "y"]))
    assert ledger.unit_records("cohort-c") == []
    assert ledger.population.relation("cohort-a") == NEIGHBOURING_RELATION


def test_a_spend_of_an_older_medfed_keyed_on_a_fingerprint_counts_against_every_unit(
    tmp_path: Path,
) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    legacy = DpSgdEvent(noise_multiplier=1.0, sample_rate=0.1, steps=10)
    ledger.record(spend("ab" * 32, "old-run", legacy), signer=SIGNER)
    ledger.population.register("unit", patient_keys(SECRET, ["p"]))
    assert [r.event for r in ledger.unit_records("unit")] == [legacy]


def test_the_ledger_keeps_no_patient_id_and_its_keys_need_the_sites_secret(
    tmp_path: Path,
) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    ledger.population.register("unit", patient_keys(SECRET, ["MRN-123456"]))
    assert b"MRN-123456" not in (tmp_path / "ledger.sqlite").read_bytes()
    other = patient_key_secret(SigningKey.generate())
    assert patient_keys(other, ["MRN-123456"]) != patient_keys(SECRET, ["MRN-123456"])


# --- 2. what leaves a site: fingerprints and metrics ---------------------------------


def test_a_data_digest_sent_off_site_cannot_be_confirmed_without_the_sites_key() -> None:
    """Fingerprint confirmation: whoever knows every row but one hashes each candidate;
    a keyed digest matches none of those hashes, and without the key none can be made."""
    fingerprint = "f" * 64
    sent = keyed_digest(SECRET, fingerprint)
    assert sent != fingerprint
    assert sent != keyed_digest(patient_key_secret(SigningKey.generate()), fingerprint)


def _stats(losses: np.ndarray, scores: np.ndarray, truth: np.ndarray) -> PatientStats:
    return PatientStats(loss=losses, score=scores, truth=truth)


def test_one_patients_row_is_bounded_by_the_sensitivity() -> None:
    rng = np.random.default_rng(0)
    train = PatientStats(loss=rng.exponential(3.0, 40))
    held = _stats(rng.exponential(3.0, 30), rng.random(30), rng.integers(0, 2, 30))
    rows = release.statistics_rows(train, held)
    assert np.all(np.linalg.norm(rows, axis=1) <= release.SENSITIVITY + 1e-12)
    assert np.all((rows >= 0) & (rows <= 1))
    # The sum of rows is the plain sum of the clipped values.
    total = rows.sum(axis=0)
    assert total[release.TRAIN_COUNT] == 40
    assert total[release.TRAIN_LOSS] == pytest.approx(
        np.minimum(train.loss, release.LOSS_CLIP).sum() / release.LOSS_CLIP
    )


def test_the_auroc_of_the_histograms_is_the_exact_auroc_of_binned_scores() -> None:
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 400)
    scores = np.clip(rng.normal(0.4 + 0.2 * truth, 0.2), 0, 0.999)
    rows = release.statistics_rows(
        PatientStats(loss=np.zeros(0)), _stats(np.zeros(400), scores, truth)
    )
    total = rows.sum(axis=0)
    binned = np.floor(scores * release.BINS)
    exact = roc_auc_score(truth, binned)
    got = release.auroc_from_histograms(total[release.POSITIVES], total[release.NEGATIVES])
    assert got == pytest.approx(exact, abs=1e-12)
    # Pooled over two "sites" = one site holding both.
    half = len(truth) // 2
    site_rows = [
        release.statistics_rows(
            PatientStats(loss=np.zeros(0)), _stats(np.zeros(half), scores[s], truth[s])
        ).sum(axis=0)
        for s in (slice(0, half), slice(half, None))
    ]
    assert release.pooled_auroc(site_rows) == pytest.approx(exact, abs=1e-12)


def _advantage_bound(epsilon: float, delta: float) -> float:
    """The largest accuracy minus 1/2 of any test between neighbours under (eps, delta)-DP."""
    return (math.exp(epsilon) - 1 + 2 * delta) / (math.exp(epsilon) + 1) / 2


def test_the_differencing_attack_on_the_released_loss_is_within_epsilon() -> None:
    """The loss over all training patients with and without one patient: on main the
    exact loss gave the patient away every time; released, the attacker's accuracy over
    many trials stays within what the release's epsilon allows."""
    rng = np.random.default_rng(2)
    others = rng.exponential(0.5, 60)
    target_loss = release.LOSS_CLIP  # the most telling patient: a loss at the clip
    noise = 20.0
    with_patient = PatientStats(loss=np.append(others, target_loss))
    without = PatientStats(loss=others)
    empty = PatientStats(loss=np.zeros(0))
    threshold = (
        release.statistics_rows(with_patient, empty).sum(axis=0)[release.TRAIN_LOSS]
        + release.statistics_rows(without, empty).sum(axis=0)[release.TRAIN_LOSS]
    ) / 2
    trials = 2000
    right = 0
    for trial in range(trials):
        present = trial % 2 == 0
        rows = release.statistics_rows(with_patient if present else without, empty)
        vector = release.release(rows, noise_multiplier=noise)
        guess = vector[release.TRAIN_LOSS] > threshold
        right += guess == present
    accuracy = right / trials
    epsilon = epsilon_of([release.release_event(noise)], delta=1e-5)
    # 4 standard errors of a binomial at 1/2 over `trials`.
    slack = 4 * math.sqrt(0.25 / trials)
    assert accuracy - 0.5 <= _advantage_bound(epsilon, 1e-5) + slack
    # The exact loss (what main sent) separates them every time.
    exact_with = float(np.mean(with_patient.loss))
    exact_without = float(np.mean(without.loss))
    assert exact_with != exact_without


# --- 4. the neighbouring relation and the accountant ---------------------------------


def _pld_epsilon(events: list[DpSgdEvent], delta: float) -> float:
    accountant = PLDAccountant(
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=1e-3,
    )
    for event in events:
        gaussian = GaussianDpEvent(event.noise_multiplier)
        step = (
            gaussian
            if event.sample_rate == 1.0
            else PoissonSampledDpEvent(event.sample_rate, gaussian)
        )
        accountant.compose(step, event.steps)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(
    ("noise", "rate", "steps", "releases"),
    [(1.1, 0.05, 90, 3), (0.8, 0.02, 300, 5), (2.0, 0.1, 30, 1)],
)
def test_a_rounds_spend_and_its_releases_compose_above_pld_for_add_remove_one(
    noise: float, rate: float, steps: int, releases: int
) -> None:
    """What the ledger records for rounds (DP-SGD at the study's public rate, plus one
    Gaussian release of metrics per round, plus the count) is never accounted below the
    tight add/remove-one PLD of the same mechanisms, and not far above it."""
    events = [
        DpSgdEvent(noise_multiplier=noise, sample_rate=rate, steps=steps),
        release.release_event(20.0, releases),
        release.release_event(10.0),  # the noised count
    ]
    ours = epsilon_of(events, delta=1e-5)
    tight = _pld_epsilon(events, 1e-5)
    assert tight <= ours <= tight * 1.35 + 0.05


def test_a_gaussian_release_is_accounted_as_the_gaussian_mechanism() -> None:
    """Sampling rate 1 is no sampling: the release's RDP is alpha / (2 z^2)."""
    ours = epsilon_of([release.release_event(5.0)], delta=1e-5)
    assert ours >= _pld_epsilon([release.release_event(5.0)], 1e-5)
    orders = np.linspace(1.5, 256, 4000)
    rdp = orders / (2 * 25.0)
    by_hand = float(np.min(rdp + np.log(1 / 1e-5) / (orders - 1)))
    assert ours <= by_hand + 1e-6


# --- 5. policy hygiene --------------------------------------------------------------


def test_a_rolling_year_needs_a_lifetime_cap_that_never_resets() -> None:
    with pytest.raises(ValidationError, match="lifetime_epsilon_cap"):
        PrivacyPolicy(epsilon_cap=4.0, cap_window="rolling-year")
    policy = PrivacyPolicy(epsilon_cap=4.0, cap_window="rolling-year", lifetime_epsilon_cap=5.0)
    event = DpSgdEvent(noise_multiplier=1.0, sample_rate=0.05, steps=40)
    old = [PastSpend("s@x", event, NOW - dt.timedelta(days=400 + 400 * i)) for i in range(4)]
    # Each year alone is within the yearly cap, so the window would allow another...
    assert epsilon_of([event, event], delta=1e-5) < policy.epsilon_cap
    decision = preflight(
        policy,
        PlannedRound("s", "s@x", event, 1e-5, 1.0),
        past=old,
        approved_epsilon=50.0,
        now=NOW,
    )
    # ...but the lifetime over all of them does not.
    assert epsilon_of([event] * 5, delta=1e-5) > policy.lifetime_cap
    assert not decision.allowed and "lifetime" in decision.reason


def test_the_policy_states_its_defaults() -> None:
    policy = PrivacyPolicy(epsilon_cap=5.0)
    assert policy.delta_patients_factor == 10
    assert policy.lifetime_cap == 5.0
    assert not policy.allow_unbounded_mechanisms
