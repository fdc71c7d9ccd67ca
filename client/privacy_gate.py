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

from medfed.client.config import SiteConfig
from medfed.client.errors import BudgetRefusal, SiteRefusal
from medfed.client.protocol import TrainRequest
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
        self._audit = AuditLog(config.audit_path, self._signer)

    @property
    def audit(self) -> AuditLog:
        return self._audit

    def sign_receipt(self, receipt: UpdateReceipt) -> str:
        """The site's signature of an update it is about to send."""
        return receipt.sign(self._signer)

    def _approval(self, request: TrainRequest) -> Approval | None:
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
        policy = self._config.privacy
        if patients < policy.min_cohort_k:
            raise self._refuse(
                request,
                f"the dataset has {patients} patients, fewer than the site's minimum cohort"
                f" {policy.min_cohort_k}",
                budget=False,
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
            raise self._refuse(
                request, f"round {request.round} is not a round number", budget=False
            )
        remaining_steps = (request.planned_rounds - request.round + 1) * request.local_steps
        if remaining_steps < request.local_steps:
            raise self._refuse(
                request,
                f"round {request.round} is beyond the {request.planned_rounds} rounds planned",
                budget=False,
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
            raise self._refuse(request, f"out of budget: {exc}", budget=True) from exc
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
            raise self._refuse(request, decision.reason, budget=decision.kind == "budget")
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
