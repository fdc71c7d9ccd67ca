"""The site's privacy gate: it decides a round's noise, checks it against policy and budget,
and records the spend; every decision also goes to the site's audit log.

Order matters and is the point of this module: calibrate, pre-flight (refuse before
any training step), train (the caller), then record the spend before the update may
leave the site.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol

from medfed.client.config import SiteConfig
from medfed.client.errors import BudgetRefusal, SiteRefusal
from medfed.client.protocol import TrainRequest
from medfed.client.records import (
    check_site_records,
    recover_unaudited_spends,
    site_audit_log,
    write_ledger_head,
)
from medfed.model.contract import StudyContract
from medfed.privacy.accountant import epsilon_of
from medfed.privacy.approvals import Approval
from medfed.privacy.audit import AuditLog
from medfed.privacy.calibration import calibrate_noise
from medfed.privacy.errors import InfeasibleBudgetError
from medfed.privacy.events import DpSgdEvent
from medfed.privacy.heads import SPEND_EVENT
from medfed.privacy.ledger import PrivacyLedger, SpendRecord
from medfed.privacy.policy import PastSpend, PlannedRound, counted, preflight
from medfed.privacy.population import (
    NEIGHBOURING_RELATION,
    NoisyCount,
    draw_noisy_count,
    keyed_digest,
    patient_key_secret,
    patient_keys,
    population_digest,
)
from medfed.privacy.receipts import UpdateReceipt
from medfed.privacy.release import release_event
from medfed.privacy.signing import JsonValue, SigningKey, VerifyKey

log = logging.getLogger(__name__)


COUNT_STUDY = "medfed:patient-count"
"""How the ledger names the release of a unit's noised patient count."""
EVALUATION_STUDY = "medfed:evaluation"
"""How the ledger names the release of an evaluate answer."""


def metrics_run(run_id: str) -> str:
    """The ledger's run name for a round's metric releases (beside its DP-SGD spend)."""
    return f"{run_id}/metrics"


def evaluation_run(run_id: str) -> str:
    """The ledger's run name for a run's evaluate answers."""
    return f"{run_id}/evaluate"


def unbounded_tasks(contract: StudyContract) -> list[str]:
    """The contract's tasks trained with a loss whose per-patient sensitivity is
    unbounded: survival tasks with the Cox partial likelihood (whose risk sets tie every
    patient to the others, so clipping one patient's gradient bounds nothing)."""
    return [
        task.name
        for task in contract.tasks
        if task.kind == "survival" and task.survival_loss == "cox"
    ]


def cox_refusal(tasks: list[str]) -> str:
    """The one line a site gives for refusing (or not guaranteeing) Cox under DP."""
    return (
        f"no guarantee: survival task(s) {tasks} use the Cox partial likelihood, whose"
        " per-patient sensitivity is unbounded under DP-SGD; use survival_loss ="
        ' "discrete-hazard", or the officer must set allow_unbounded_mechanisms'
    )


RefusalCode = Literal["not-approved", "no-budget", "records-unverified", "no-data", "policy"]
"""Why a site's pre-flight refuses a round, as a category the coordinator may show."""

_DECISION_CODES: dict[str, RefusalCode] = {"budget": "no-budget", "approval": "not-approved"}


@dataclass(frozen=True)
class Refused:
    """A pre-flight refusal: its category and the site's own sentence."""

    code: RefusalCode
    reason: str


class RoundAsk(Protocol):
    """What the gate reads of a round: a `TrainRequest`, or a status query's description
    of the round the coordinator is about to plan."""

    @property
    def run_id(self) -> str: ...
    @property
    def study(self) -> str: ...
    @property
    def study_sha256(self) -> str: ...
    @property
    def round(self) -> int: ...
    @property
    def planned_rounds(self) -> int: ...
    @property
    def local_steps(self) -> int: ...
    @property
    def target_epsilon(self) -> float: ...
    @property
    def sample_rate(self) -> float: ...
    @property
    def delta(self) -> float: ...
    @property
    def max_grad_norm(self) -> float: ...


def study_label(name: str, sha256: str) -> str:
    """How the ledger names a study: its name and digest, so an edited study is another."""
    return f"{name}@{sha256}"


@dataclass(frozen=True)
class RoundPlan:
    """An allowed round: the noise to train with and the event it will spend."""

    event: DpSgdEvent
    delta: float
    study: str
    epsilon_study_after: float
    epsilon_dataset_after: float
    metrics: DpSgdEvent
    """The release of the round's metrics, charged with it."""
    no_guarantee: str = ""
    """Why this round's epsilon is no guarantee (an unbounded mechanism the policy
    allowed); empty when it is one."""


class PrivacyGate:
    """Calibrates, checks and records the privacy of one site's rounds."""

    def __init__(self, config: SiteConfig, ledger: PrivacyLedger) -> None:
        self._config = config
        self._ledger = ledger
        self._signer = SigningKey.load(config.signing_key_path)
        self._officer = VerifyKey.load(config.officer_public_key_path)
        self._audit = site_audit_log(config, self._signer)
        self._secret = patient_key_secret(self._signer)
        recovered = recover_unaudited_spends(config, ledger, self._audit)
        if recovered:
            log.warning("%d ledger spend(s) were missing from the audit log: audited", recovered)

    @property
    def audit(self) -> AuditLog:
        return self._audit

    def sign_receipt(self, receipt: UpdateReceipt) -> str:
        """The site's signature of an update it is about to send."""
        return receipt.sign(self._signer)

    def _approval(self, request: RoundAsk) -> Approval | None:
        return self._ledger.approval_for(
            request.study_sha256, self._officer, site_id=self._config.site.id
        )

    def _refuse(self, request: RoundAsk, reason: str, *, budget: bool) -> SiteRefusal:
        self._audit.append(
            "round refused",
            {
                "study": request.study,
                "study_sha256": request.study_sha256,
                "run_id": request.run_id,
                "round": request.round,
                "reason": reason,
            },
        )
        return BudgetRefusal(reason) if budget else SiteRefusal(reason)

    def _spend(self, spend: SpendRecord, details: dict[str, JsonValue]) -> bool:
        """Record `spend` (signed) in the ledger, then audit it under the same (dataset,
        run, round) and sign the ledger's new head: every ledger row has its audit entry,
        which `client.records.check_site_records` cross-checks. False if it was recorded
        already (nothing is written then)."""
        if not self._ledger.record(spend, signer=self._signer):
            return False
        self._audit.append(
            SPEND_EVENT,
            {"dataset": spend.dataset, "run_id": spend.run_id, "round": spend.round, **details},
        )
        write_ledger_head(self._config, self._ledger, self._signer)
        return True

    def population(self, unit: str, *, patient_ids: list[str], training: int) -> NoisyCount:
        """Register `unit`'s patients and return the noised count of its `training`
        patients for this version of the population: drawn and charged once per version
        (the same value every time after), so repeated asking averages nothing away.

        `BudgetRefusal` if the unit cannot afford the count's release."""
        store = self._ledger.population
        keys = patient_keys(self._secret, patient_ids)
        store.register(unit, keys)
        version = population_digest(keys)
        policy = self._config.privacy
        event = release_event(policy.count_noise_std)
        spend = SpendRecord(
            dataset=unit,
            study=COUNT_STUDY,
            run_id=f"count:{version[:32]}",
            round=1,
            event=event,
            delta=policy.max_delta,
        )
        count = store.noisy_count(unit, version)
        if count is None:
            past = [r.event for r in self._ledger.unit_records(unit)]
            after = epsilon_of([*past, event], delta=policy.max_delta, accountant=policy.accountant)
            if after > policy.lifetime_cap:
                raise BudgetRefusal(
                    f"out of budget: releasing the noised patient count would take privacy"
                    f" unit {unit} to epsilon {after:.3f}, above the cap {policy.lifetime_cap:g}"
                )
            drawn = draw_noisy_count(training, noise_std=policy.count_noise_std)
            count = store.store_count(NoisyCount(unit, version, drawn, policy.count_noise_std))
        # Charged before the count is used or sent, once per version (whatever delta
        # the policy names now).
        charged = any(r.run_id == spend.run_id for r in self._ledger.records(unit))
        if not charged:
            self._spend(spend, {"release": "patient count", "noise_std": count.noise_std})
        return count

    def keyed_digest(self, value: str) -> str:
        """A site-secret HMAC of `value` (what leaves the site instead of a fingerprint)."""
        return keyed_digest(self._secret, value)

    def past(self, unit: str) -> list[PastSpend]:
        """Every spend that falls on a patient of `unit`, as the pre-flight reads it."""
        return [
            PastSpend(study_key=r.study, event=r.event, recorded_at=r.recorded_at)
            for r in self._ledger.unit_records(unit)
        ]

    def _checks(self, request: RoundAsk, patients: int, contract: StudyContract) -> Refused | None:
        """Refusals that need no accounting: records, cohort, delta against N, round, Cox."""
        policy = self._config.privacy
        tampered = check_site_records(self._config, self._signer.public)
        if tampered:
            return Refused(
                "records-unverified",
                f"the site's privacy records do not check ({tampered[0]}); the privacy"
                " officer must review them before any more budget is spent",
            )
        if patients < policy.min_cohort_k:
            return Refused(
                "no-data",
                f"the dataset has about {patients} patients (noised), fewer than the site's"
                f" minimum cohort {policy.min_cohort_k}",
            )
        if request.delta > policy.max_delta:
            return Refused(
                "policy",
                f"delta {request.delta:g} exceeds the site's maximum {policy.max_delta:g}",
            )
        largest = 1 / (policy.delta_patients_factor * patients)
        if request.delta > largest:
            return Refused(
                "policy",
                f"delta {request.delta:g} is above 1/({policy.delta_patients_factor:g} x N)"
                f" = {largest:.3g} for about {patients} patients (the site's limit)",
            )
        if request.round < 1:
            return Refused("policy", f"round {request.round} is not a round number")
        if request.round > request.planned_rounds:
            return Refused(
                "policy",
                f"round {request.round} is beyond the {request.planned_rounds} rounds planned",
            )
        cox = unbounded_tasks(contract)
        if cox and not policy.allow_unbounded_mechanisms:
            return Refused("policy", cox_refusal(cox))
        return None

    def plan(
        self, request: TrainRequest, *, unit: str, count: NoisyCount, contract: StudyContract
    ) -> RoundPlan:
        """Decide this round's noise and check it; raise a refusal (audited) if it may not run.

        Every number it uses is public or already released: the study's sampling rate,
        the noised patient count, the ledger's events."""
        decided = self._decide(request, unit=unit, patients=count.public, contract=contract)
        if isinstance(decided, Refused):
            raise self._refuse(request, decided.reason, budget=decided.code == "no-budget")
        return decided

    def preflight(
        self, ask: RoundAsk, *, unit: str, patients: int, contract: StudyContract
    ) -> Refused | None:
        """The same checks as `plan`, as a dry run that writes nothing: why the site would
        refuse the round `ask` describes, or None if it would train it. The coordinator
        asks before planning a round (a status query), so no site trains for a round that
        others are bound to refuse."""
        decided = self._decide(ask, unit=unit, patients=patients, contract=contract)
        return decided if isinstance(decided, Refused) else None

    def _decide(
        self, request: RoundAsk, *, unit: str, patients: int, contract: StudyContract
    ) -> RoundPlan | Refused:
        policy = self._config.privacy
        refused = self._checks(request, patients, contract)
        if refused is not None:
            return refused
        label = study_label(request.study, request.study_sha256)
        past = self.past(unit)
        approval = self._approval(request)
        target = request.target_epsilon
        if approval is not None:
            target = min(target, approval.epsilon)
        rate = request.sample_rate  # public: never a function of the patient count
        metrics = release_event(policy.metrics_noise_multiplier)
        rounds_left = request.planned_rounds - request.round + 1
        future_metrics = release_event(policy.metrics_noise_multiplier, rounds_left)
        try:
            noise = calibrate_noise(
                target_epsilon=target,
                delta=request.delta,
                sample_rate=rate,
                steps=rounds_left * request.local_steps,
                n_patients=patients,
                accountant=policy.accountant,
                prior_events=[
                    *(spend.event for spend in past if spend.study_key == label),
                    future_metrics,
                ],
            )
        except InfeasibleBudgetError as exc:
            return Refused("no-budget", f"out of budget: {exc}")
        noise = max(noise, policy.min_noise_multiplier)
        event = DpSgdEvent(noise_multiplier=noise, sample_rate=rate, steps=request.local_steps)
        now = dt.datetime.now(dt.UTC)
        approved = None if approval is None else approval.epsilon
        decision = preflight(
            policy,
            PlannedRound(
                study=request.study,
                study_key=label,
                event=event,
                delta=request.delta,
                max_grad_norm=request.max_grad_norm,
                extra=(metrics,),
            ),
            past=past,
            approved_epsilon=approved,
            now=now,
        )
        if not decision.allowed:
            return Refused(_DECISION_CODES.get(decision.kind, "policy"), decision.reason)
        # The rest of the study as planned (its rounds left at this noise, their metrics'
        # releases and the run's final evaluation) must fit the unit's caps too: a study
        # that cannot end within them is refused now, before any step, not halfway.
        plan = [
            DpSgdEvent(noise_multiplier=noise, sample_rate=rate, steps=rounds_left * event.steps),
            future_metrics,
            metrics,
        ]
        refused = self._beyond_caps(plan, past=past, delta=request.delta, now=now)
        if refused is not None:
            return refused
        if not decision.allowed:
            return Refused(_DECISION_CODES.get(decision.kind, "policy"), decision.reason)
        return RoundPlan(
            event=event,
            delta=request.delta,
            study=label,
            epsilon_study_after=decision.epsilon_study_after,
            epsilon_dataset_after=decision.epsilon_dataset_after,
            metrics=metrics,
            no_guarantee=cox_refusal(unbounded_tasks(contract))
            if unbounded_tasks(contract)
            else "",
        )

    def _beyond_caps(
        self,
        plan: Sequence[DpSgdEvent],
        *,
        past: Sequence[PastSpend],
        delta: float,
        now: dt.datetime,
    ) -> Refused | None:
        """Why `plan` on top of `past` would take the unit above a cap, or None."""
        policy = self._config.privacy
        windowed = [spend.event for spend in counted(past, policy.cap_window, now)]
        in_window = epsilon_of([*windowed, *plan], delta=delta, accountant=policy.accountant)
        if in_window > policy.epsilon_cap:
            window = "" if policy.cap_window == "lifetime" else " for the rolling year"
            return Refused(
                "no-budget",
                f"out of budget: the dataset would reach epsilon {in_window:.3f}{window} by"
                f" the end of the study as planned, above the site's cap {policy.epsilon_cap:g}",
            )
        lifetime = epsilon_of(
            [*(spend.event for spend in past), *plan], delta=delta, accountant=policy.accountant
        )
        if lifetime > policy.lifetime_cap:
            return Refused(
                "no-budget",
                f"out of budget: the dataset would reach a lifetime epsilon {lifetime:.3f} by"
                f" the end of the study as planned, above the site's lifetime cap"
                f" {policy.lifetime_cap:g}",
            )
        return None

    def dataset_epsilon(self, unit: str, *, delta: float) -> float:
        """The unit's lifetime epsilon over every spend on its patients."""
        return epsilon_of(
            [record.event for record in self._ledger.unit_records(unit)],
            delta=delta,
            accountant=self._config.privacy.accountant,
        )

    def study_epsilon(self, unit: str, study_key: str, *, delta: float) -> float:
        """What study `study_key` (`RoundPlan.study`) has spent of the unit, by the
        policy's accountant: its rounds and their metrics' releases, which its run
        reports per site (the unit's total over every study and release is the
        officer's, in `budget show`)."""
        return epsilon_of(
            [r.event for r in self._ledger.unit_records(unit) if r.study == study_key],
            delta=delta,
            accountant=self._config.privacy.accountant,
        )

    def record(self, request: TrainRequest, plan: RoundPlan, *, unit: str) -> bool:
        """Record the round's spends (DP-SGD, then its metrics' release), signed, and
        audit them; False if the round was recorded already."""
        spend = SpendRecord(
            dataset=unit,
            study=plan.study,
            run_id=request.run_id,
            round=request.round,
            event=plan.event,
            delta=plan.delta,
        )
        details: dict[str, JsonValue] = {
            "relation": NEIGHBOURING_RELATION,
            "study": request.study,
            "study_sha256": request.study_sha256,
            "noise_multiplier": plan.event.noise_multiplier,
            "sample_rate": plan.event.sample_rate,
            "steps": plan.event.steps,
            "metrics_noise_multiplier": plan.metrics.noise_multiplier,
            "delta": plan.delta,
            "epsilon_study": plan.epsilon_study_after,
            "epsilon_dataset": plan.epsilon_dataset_after,
            **({"guarantee": plan.no_guarantee} if plan.no_guarantee else {}),
        }
        if not self._spend(spend, details):
            return False
        if plan.no_guarantee:
            self._ledger.population.add_note(unit, request.run_id, request.round, plan.no_guarantee)
        self._spend(
            replace(spend, run_id=metrics_run(request.run_id), event=plan.metrics),
            {"release": "round metrics", "study": request.study},
        )
        return True

    def charge_evaluation(self, unit: str, *, run_id: str, round_: int) -> DpSgdEvent:
        """Charge one evaluate answer (a Gaussian release of metrics) to `unit`, or refuse:
        at most the policy's evaluations per run, one per (run, round), within the caps."""
        policy = self._config.privacy
        run = evaluation_run(run_id)
        done = [r for r in self._ledger.unit_records(unit) if r.run_id == run]
        if any(r.round == round_ for r in done):
            raise SiteRefusal(
                f"run {run_id} round {round_} was evaluated here already; its noised figures"
                " were sent then and are not drawn again"
            )
        if len(done) >= policy.max_evaluations_per_run:
            raise BudgetRefusal(
                f"run {run_id} has had the {policy.max_evaluations_per_run} evaluations the"
                " site's policy answers per run"
            )
        event = release_event(policy.metrics_noise_multiplier)
        past = self.past(unit)
        now = dt.datetime.now(dt.UTC)
        windowed = [s.event for s in counted(past, policy.cap_window, now)]
        delta = policy.max_delta
        in_window = epsilon_of([*windowed, event], delta=delta, accountant=policy.accountant)
        lifetime = epsilon_of(
            [*(s.event for s in past), event], delta=delta, accountant=policy.accountant
        )
        if in_window > policy.epsilon_cap or lifetime > policy.lifetime_cap:
            raise BudgetRefusal(
                f"out of budget: an evaluation would take privacy unit {unit} to epsilon"
                f" {max(in_window, lifetime):.3f}, above the site's cap"
            )
        spend = SpendRecord(
            dataset=unit,
            study=EVALUATION_STUDY,
            run_id=run,
            round=round_,
            event=event,
            delta=delta,
        )
        self._spend(spend, {"release": "evaluation"})
        return event

    def approval_of(self, sha256: str) -> Approval | None:
        """The officer's newest valid approval of the study or query with this digest here."""
        return self._ledger.approval_for(sha256, self._officer, site_id=self._config.site.id)

    def charge_query(self, unit: str, charge: QueryCharge) -> bool:
        """Charge a whole query (`medfed ask`) to `unit` before its first answer leaves,
        or refuse: the delta the policy allows, the officer's approval of the query's
        digest (where the policy requires one) and the caps. False if this run's query
        was charged already (a later exchange of the same query spends nothing more)."""
        policy = self._config.privacy
        run = query_run(charge.run_id)
        if any(r.run_id == run for r in self._ledger.unit_records(unit)):
            return False
        if charge.delta > policy.max_delta:
            raise BudgetRefusal(
                f"the query's delta {charge.delta:g} is above the site's maximum"
                f" {policy.max_delta:g}"
            )
        label = study_label(f"ask:{charge.name}", charge.query_sha256)
        approval = self._ledger.approval_for(
            charge.query_sha256, self._officer, site_id=self._config.site.id
        )
        if approval is None and policy.require_approval:
            raise BudgetRefusal(
                f"the privacy officer has not approved query {charge.name}"
                f" ({charge.query_sha256[:12]}) at this site"
            )
        past = self.past(unit)
        now = dt.datetime.now(dt.UTC)
        windowed = [s.event for s in counted(past, policy.cap_window, now)]

        def after(events: Sequence[DpSgdEvent]) -> float:
            return epsilon_of([*events, charge.event], delta=charge.delta,
                              accountant=policy.accountant)  # fmt: skip

        if approval is not None:
            mine = [s.event for s in past if s.study_key == label]
            if after(mine) > approval.epsilon + 1e-9:
                raise BudgetRefusal(
                    f"query {charge.name} would spend epsilon {after(mine):.3f} here, above"
                    f" the {approval.epsilon:g} its approval allows"
                )
        spent = max(after(windowed), after([s.event for s in past]))
        if (
            after(windowed) > policy.epsilon_cap
            or after([s.event for s in past]) > policy.lifetime_cap
        ):
            raise BudgetRefusal(
                f"out of budget: query {charge.name} would take privacy unit {unit} to"
                f" epsilon {spent:.3f}, above the site's cap"
            )
        spend = SpendRecord(
            dataset=unit, study=label, run_id=run, round=1, event=charge.event, delta=charge.delta
        )
        details: dict[str, JsonValue] = {
            "release": "query",
            "query": charge.name,
            "query_sha256": charge.query_sha256,
            "noise_multiplier": charge.event.noise_multiplier,
            "releases": charge.event.steps,
            "epsilon_query": charge.epsilon,
            "delta": charge.delta,
        }
        return self._spend(spend, details)


def query_run(run_id: str) -> str:
    """How the ledger names a query's run (apart from any training run's id)."""
    return f"ask:{run_id}"


@dataclass(frozen=True)
class QueryCharge:
    """A whole query's privacy cost at one site: its Gaussian releases, calibrated to
    the query's epsilon by the site's accountant."""

    run_id: str
    name: str
    query_sha256: str
    event: DpSgdEvent
    epsilon: float
    delta: float
