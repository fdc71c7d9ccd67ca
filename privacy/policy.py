"""The site's privacy policy and the pre-flight check run before every training round.

The pre-flight is a pure function: given the policy, what the round would spend, what
was spent before and the officer's approval, it says whether the round may run and
why not. Nothing is written; the caller records the spend only after an allowed round.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medfed.privacy.accountant import AccountantKind, epsilon_of
from medfed.privacy.events import DpSgdEvent

CapWindow = Literal["lifetime", "rolling-year"]
PRIVACY_UNIT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
ROLLING_YEAR = dt.timedelta(days=365)


class PrivacyPolicy(BaseModel):
    """The `[privacy]` block of `site.toml`: the limits the site enforces on every study."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    epsilon_cap: float = Field(gt=0, description="cap on epsilon per dataset, across all studies")
    cap_window: CapWindow = "lifetime"
    max_delta: float = Field(default=1e-5, gt=0, lt=1)
    min_noise_multiplier: float = Field(default=0.5, gt=0)
    max_grad_norm: float = Field(default=10.0, gt=0)
    min_cohort_k: int = Field(default=20, ge=1)
    require_approval: bool = True
    accountant: AccountantKind = "rdp"
    privacy_unit: str | None = Field(default=None, pattern=PRIVACY_UNIT_PATTERN)
    """The officer's name for the site's patient population, whose budget every spend
    falls on (a dataset may declare its own); unset: the site id."""
    lifetime_epsilon_cap: float | None = Field(default=None, gt=0)
    """A cap that never resets: required with `cap_window = "rolling-year"` (whose
    yearly cap forgets spends older than 365 days); with "lifetime", the same as
    `epsilon_cap` when unset."""
    delta_patients_factor: float = Field(default=10.0, ge=1.0)
    """delta must be at most 1 / (this x the noised patient count)."""
    metrics_noise_multiplier: float = Field(default=20.0, ge=1.0)
    """Gaussian noise (times the sensitivity) on every metric a site releases."""
    count_noise_std: float = Field(default=10.0, ge=1.0)
    """Gaussian noise on the patient count, released once per version of the population."""
    max_evaluations_per_run: int = Field(default=3, ge=0)
    """How many evaluate requests of one run a site answers (each is a charged release)."""
    allow_unbounded_mechanisms: bool = False
    """Let a study train with a loss whose per-patient sensitivity is unbounded (the Cox
    partial likelihood): its epsilon is then NO GUARANTEE, and ledger and reports say so."""

    @model_validator(mode="after")
    def _cap_is_sane(self) -> PrivacyPolicy:
        if self.epsilon_cap > 100:
            raise ValueError("epsilon_cap above 100 protects nothing; lower it")
        if self.cap_window == "rolling-year" and self.lifetime_epsilon_cap is None:
            raise ValueError(
                'cap_window "rolling-year" forgets spends after 365 days: set'
                " lifetime_epsilon_cap, the cap that never resets"
            )
        if self.lifetime_epsilon_cap is not None and self.lifetime_epsilon_cap < self.epsilon_cap:
            raise ValueError("lifetime_epsilon_cap must be at least epsilon_cap")
        return self

    @property
    def lifetime_cap(self) -> float:
        """The cap on all spends ever, which no window resets."""
        return self.epsilon_cap if self.lifetime_epsilon_cap is None else self.lifetime_epsilon_cap


@dataclass(frozen=True)
class PastSpend:
    """One recorded spend, as the pre-flight needs it."""

    study_key: str
    event: DpSgdEvent
    recorded_at: dt.datetime


@dataclass(frozen=True)
class PlannedRound:
    """What one round would spend at this site; `study_key` names the study in the ledger."""

    study: str
    study_key: str
    event: DpSgdEvent
    delta: float
    max_grad_norm: float
    extra: tuple[DpSgdEvent, ...] = ()
    """Releases charged with the round (its metrics), composed with `event`."""


@dataclass(frozen=True)
class Decision:
    """The pre-flight's verdict; `reason` is one sentence for the coordinator and the officer."""

    allowed: bool
    reason: str
    epsilon_dataset_after: float
    epsilon_study_after: float
    kind: Literal["ok", "policy", "approval", "budget"] = "ok"


def counted(spends: Sequence[PastSpend], window: CapWindow, now: dt.datetime) -> list[PastSpend]:
    """The spends that count against the cap: all, or those of the last 365 days."""
    if window == "lifetime":
        return list(spends)
    return [spend for spend in spends if now - spend.recorded_at < ROLLING_YEAR]


def preflight(
    policy: PrivacyPolicy,
    planned: PlannedRound,
    *,
    past: Sequence[PastSpend],
    approved_epsilon: float | None,
    now: dt.datetime,
) -> Decision:
    """May this round run? Checks the policy's limits, the approval, and both budgets.

    `approved_epsilon` is the officer's approved epsilon for this study (None: no valid
    approval). The dataset's epsilon composes every counted spend of every study; the
    study's composes this study's spends only (all of them: an approval is lifetime).
    """
    event = planned.event
    spent = (event, *planned.extra)
    in_window = counted(past, policy.cap_window, now)
    dataset_after = epsilon_of(
        [*(spend.event for spend in in_window), *spent],
        delta=planned.delta,
        accountant=policy.accountant,
    )
    lifetime_after = epsilon_of(
        [*(spend.event for spend in past), *spent],
        delta=planned.delta,
        accountant=policy.accountant,
    )
    study_after = epsilon_of(
        [*(s.event for s in past if s.study_key == planned.study_key), *spent],
        delta=planned.delta,
        accountant=policy.accountant,
    )

    def refuse(kind: Literal["policy", "approval", "budget"], reason: str) -> Decision:
        return Decision(False, reason, dataset_after, study_after, kind)

    if planned.delta > policy.max_delta:
        return refuse(
            "policy", f"delta {planned.delta:g} exceeds the site's maximum {policy.max_delta:g}"
        )
    if event.noise_multiplier < policy.min_noise_multiplier:
        return refuse(
            "policy",
            f"noise multiplier {event.noise_multiplier:g} is below the site's minimum"
            f" {policy.min_noise_multiplier:g}",
        )
    if planned.max_grad_norm > policy.max_grad_norm:
        return refuse(
            "policy",
            f"clipping norm {planned.max_grad_norm:g} exceeds the site's maximum"
            f" {policy.max_grad_norm:g}",
        )
    if policy.require_approval and approved_epsilon is None:
        return refuse(
            "approval",
            f"study {planned.study!r} has no valid approval from this site's privacy officer",
        )
    if approved_epsilon is not None and study_after > approved_epsilon:
        return refuse(
            "budget",
            f"out of budget: study {planned.study!r} would reach epsilon {study_after:.3f},"
            f" above the {approved_epsilon:g} approved",
        )
    if dataset_after > policy.epsilon_cap:
        window = "" if policy.cap_window == "lifetime" else " for the rolling year"
        return refuse(
            "budget",
            f"out of budget: the dataset would reach epsilon {dataset_after:.3f}{window},"
            f" above the site's cap {policy.epsilon_cap:g}",
        )
    if lifetime_after > policy.lifetime_cap:
        return refuse(
            "budget",
            f"out of budget: the dataset would reach a lifetime epsilon {lifetime_after:.3f},"
            f" above the site's lifetime cap {policy.lifetime_cap:g}",
        )
    return Decision(True, "within policy and budget", dataset_after, study_after)
