"""The site's privacy gate: it decides a round's noise, checks it against policy and budget,
and records the spend; every decision also goes to the site's audit log.

Order matters and is the point of this module: calibrate, pre-flight (refuse before
any training step), train (the caller), then record the spend before the update may
leave the site.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
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
from medfed.privacy.accountant import epsilon_of
from medfed.privacy.approvals import Approval
from medfed.privacy.audit import AuditLog
from medfed.privacy.calibration import calibrate_noise, poisson_rate
from medfed.privacy.errors import InfeasibleBudgetError
from medfed.privacy.events import DpSgdEvent
from medfed.privacy.ledger import PrivacyLedger, SpendRecord
from medfed.privacy.policy import PastSpend, PlannedRound, preflight
from medfed.privacy.receipts import UpdateReceipt
from medfed.privacy.signing import SigningKey, VerifyKey

log = logging.getLogger(__name__)


def study_label(name: str, sha256: str) -> str:
    """How the ledger names a study: its name and digest, so an edited study is another."""
    return f"{name}@{sha256}"


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


@dataclass(frozen=True)
class RoundPlan:
    """An allowed round: the noise to train with and the event it will spend."""

    event: DpSgdEvent
    delta: float
    study: str
    epsilon_study_after: float
    epsilon_dataset_after: float


class PrivacyGate:
    """Calibrates, checks and records the privacy of one site's rounds."""

    def __init__(self, config: SiteConfig, ledger: PrivacyLedger) -> None:
        self._config = config
        self._ledger = ledger
        self._signer = SigningKey.load(config.signing_key_path)
        self._officer = VerifyKey.load(config.officer_public_key_path)
        self._audit = site_audit_log(config, self._signer)
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

    def _refuse(self, request: TrainRequest, reason: str, *, budget: bool) -> SiteRefusal:
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

    def plan(self, request: TrainRequest, *, dataset: str, patients: int) -> RoundPlan:
        """Decide this round's noise and check it; raise a refusal (audited) if it may not run."""
        decided = self._decide(request, dataset=dataset, patients=patients)
        if isinstance(decided, Refused):
            raise self._refuse(request, decided.reason, budget=decided.code == "no-budget")
        return decided

    def preflight(self, ask: RoundAsk, *, dataset: str, patients: int) -> Refused | None:
        """The same checks as `plan`, as a dry run that writes nothing: why the site would
        refuse the round `ask` describes, or None if it would train it. The coordinator
        asks before planning a round (a status query), so no site trains for a round that
        others are bound to refuse."""
        decided = self._decide(ask, dataset=dataset, patients=patients)
        return decided if isinstance(decided, Refused) else None

    def _decide(self, request: RoundAsk, *, dataset: str, patients: int) -> RoundPlan | Refused:
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
                f"the dataset has {patients} patients, fewer than the site's minimum cohort"
                f" {policy.min_cohort_k}",
            )
        label = study_label(request.study, request.study_sha256)
        records = self._ledger.records(dataset)
        past = [
            PastSpend(study_key=record.study, event=record.event, recorded_at=record.recorded_at)
            for record in records
        ]
        approval = self._approval(request)
        target = request.target_epsilon
        if approval is not None:
            target = min(target, approval.epsilon)
        rate = poisson_rate(patients, request.sample_rate)
        if request.round < 1:
            return Refused("policy", f"round {request.round} is not a round number")
        remaining_steps = (request.planned_rounds - request.round + 1) * request.local_steps
        if remaining_steps < request.local_steps:
            return Refused(
                "policy",
                f"round {request.round} is beyond the {request.planned_rounds} rounds planned",
            )
        try:
            noise = calibrate_noise(
                target_epsilon=target,
                delta=request.delta,
                sample_rate=rate,
                steps=remaining_steps,
                n_patients=patients,
                accountant=policy.accountant,
                prior_events=[spend.event for spend in past if spend.study_key == label],
            )
        except InfeasibleBudgetError as exc:
            return Refused("no-budget", f"out of budget: {exc}")
        noise = max(noise, policy.min_noise_multiplier)
        event = DpSgdEvent(noise_multiplier=noise, sample_rate=rate, steps=request.local_steps)
        decision = preflight(
            policy,
            PlannedRound(
                study=request.study,
                study_key=label,
                event=event,
                delta=request.delta,
                max_grad_norm=request.max_grad_norm,
            ),
            past=past,
            approved_epsilon=None if approval is None else approval.epsilon,
            now=dt.datetime.now(dt.UTC),
        )
        if not decision.allowed:
            return Refused(_DECISION_CODES.get(decision.kind, "policy"), decision.reason)
        return RoundPlan(
            event=event,
            delta=request.delta,
            study=label,
            epsilon_study_after=decision.epsilon_study_after,
            epsilon_dataset_after=decision.epsilon_dataset_after,
        )

    def study_epsilon(self, dataset: str, study_key: str, *, delta: float) -> float:
        """What study `study_key` (`RoundPlan.study`) has spent of the dataset, by the
        policy's accountant: the study's own spend, which its run reports per site (the
        dataset's total over every study is the officer's, in `budget show`)."""
        return epsilon_of(
            [r.event for r in self._ledger.records(dataset) if r.study == study_key],
            delta=delta,
            accountant=self._config.privacy.accountant,
        )

    def record(self, request: TrainRequest, plan: RoundPlan, *, dataset: str) -> bool:
        """Record the round's spend (signed) and audit it; False if it was recorded already."""
        recorded = self._ledger.record(
            SpendRecord(
                dataset=dataset,
                study=plan.study,
                run_id=request.run_id,
                round=request.round,
                event=plan.event,
                delta=plan.delta,
            ),
            signer=self._signer,
        )
        write_ledger_head(self._config, self._ledger, self._signer)
        if recorded:
            self._audit.append(
                "budget spent",
                {
                    "dataset": dataset,
                    "study": request.study,
                    "study_sha256": request.study_sha256,
                    "run_id": request.run_id,
                    "round": request.round,
                    "noise_multiplier": plan.event.noise_multiplier,
                    "sample_rate": plan.event.sample_rate,
                    "steps": plan.event.steps,
                    "delta": plan.delta,
                    "epsilon_study": plan.epsilon_study_after,
                    "epsilon_dataset": plan.epsilon_dataset_after,
                },
            )
        return recorded
