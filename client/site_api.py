"""The site API: one interface, two transports.

`SiteApi` is what a ClientApp calls for a train, evaluate or query message. `SiteService`
implements it in-process on top of `SiteTrainer` (simulation, tests, and inside the
site worker); `client.worker_rpc.WorkerClient` implements it over gRPC on the worker's
Unix socket. Both answer a declined request by raising a `SiteRefusal` (an
`OutsideWindow` outside the training windows, a `BudgetRefusal` when out of budget).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from medfed.client.config import SiteConfig
from medfed.client.errors import OutsideWindow, SiteRefusal
from medfed.client.protocol import (
    AskReply,
    AskRequest,
    EgressRules,
    EvaluateReply,
    EvaluateRequest,
    PreflightAsk,
    QueryReply,
    QueryRequest,
    SecAggReply,
    SecAggRequest,
    TrainReply,
    TrainRequest,
)
from medfed.client.records import site_audit_log
from medfed.client.reply_cache import ReplyCache
from medfed.client.site_secagg import SiteSecAgg
from medfed.client.windows import in_window, next_window_start, window_end
from medfed.model.contract import StudyContract
from medfed.privacy.accountant import epsilon_of
from medfed.privacy.policy import PastSpend, counted
from medfed.privacy.signing import JsonValue, SigningKey, VerifyKey
from medfed.sites.errors import SiteError

if TYPE_CHECKING:
    from medfed.client.trainer import SiteTrainer

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class SiteApi(Protocol):
    """What a site answers; raises a `client.errors.ClientError` for a request it declines."""

    def train(self, request: TrainRequest) -> TrainReply: ...

    def evaluate(self, request: EvaluateRequest) -> EvaluateReply: ...

    def query(self, request: QueryRequest) -> QueryReply: ...

    def secagg(self, request: SecAggRequest) -> SecAggReply: ...

    def ask(self, request: AskRequest) -> AskReply: ...

    def egress_rules(self) -> EgressRules: ...

    def audit(self, event: str, details: Mapping[str, JsonValue]) -> None: ...


def accelerator_kind(config: SiteConfig) -> str:
    """The accelerator this site trains on. The CPU until `site.toml` names one (the
    sites package adds `accelerator`); never a silent fallback once it does."""
    return str(getattr(config, "accelerator", None) or "cpu")


def _public_patients(trainer: SiteTrainer) -> int:
    """The trainer's noised patient count; 0 when the unit cannot afford releasing it."""
    try:
        return trainer.patients
    except SiteRefusal as exc:
        log.warning("not reporting a patient count: %s", exc)
        return 0


class SiteService:
    """The site API in-process: windows, then the trainer (pre-flight, DP-SGD, ledger).

    Calls are serialised: one round trains at a time, and the ledger's SQLite file is
    used from one thread at a time.
    """

    def __init__(
        self, config: SiteConfig, contract: StudyContract | None = None, *, clock: Clock = utc_now
    ) -> None:
        self._config = config
        self._trainers: dict[str, SiteTrainer] = {}
        self._default: str | None = None
        self._clock = clock
        self._lock = threading.Lock()
        signer = SigningKey.load(config.signing_key_path)
        self._signer = signer
        self._audit = site_audit_log(config, signer)
        self._site_key = signer.public.raw.hex()
        self._replies = ReplyCache(config.state_dir / "replies")
        self._secagg = SiteSecAgg(config)
        if contract is not None:  # warm up for a contract known in advance
            self._default = contract.sha256()
            self._trainer_of(contract)

    @property
    def trainer(self) -> SiteTrainer:
        """The trainer of the contract given at start, else of the last one asked for."""
        if self._default is None:
            raise SiteRefusal("no study has asked this site for anything yet")
        return self._trainers[self._default]

    def _trainer_of(self, contract: StudyContract) -> SiteTrainer:
        """The warm trainer of `contract` (its data read and encoded once), built on first use.
        Every trainer shares the site's one ledger."""
        from medfed.client.trainer import SiteTrainer  # torch: only where the service runs

        key = contract.sha256()
        if key not in self._trainers:
            ledger = next(iter(self._trainers.values())).ledger if self._trainers else None
            self._trainers[key] = SiteTrainer(self._config, contract, ledger=ledger)
        self._default = key
        return self._trainers[key]

    def _trainer_for(self, contract_json: str, contract_sha256: str) -> SiteTrainer:
        from medfed.client.study_contract import decode_contract

        if contract_sha256 in self._trainers:
            cached = self._trainers[contract_sha256]
            if contract_json == cached.contract.canonical_json():
                self._default = contract_sha256
                return cached
        return self._trainer_of(decode_contract(contract_json, contract_sha256))

    def _check_window(self) -> None:
        now = self._clock()
        if in_window(self._config.windows, now):
            return
        opens = next_window_start(self._config.windows, now)
        when = "no window opens in the next days" if opens is None else f"next {opens.isoformat()}"
        raise OutsideWindow(f"outside the site's training windows ({when})")

    def train(self, request: TrainRequest) -> TrainReply:
        """Train one round, if inside a training window (else `OutsideWindow`).

        The identical instruction again (a coordinator resumed mid-round) gets the reply
        sent before, stored before it left, and spends nothing. Under secure aggregation
        (`request.secagg`) the update leaves only masked, with its sealed shares.
        """
        with self._lock:
            reply = self._train(request)
            return reply if not request.secagg else self._secagg.share(request, reply)

    def _train(self, request: TrainRequest) -> TrainReply:
        self._check_window()
        stored = self._replies.get(request)
        if stored is not None:
            log.info("run %s round %d: resending the stored reply", request.run_id, request.round)
            return stored
        log.info("training run %s round %d", request.run_id, request.round)
        started = time.perf_counter()
        trainer = self._trainer_for(request.contract_json, request.contract_sha256)
        reply = trainer.train(request)
        try:
            self._replies.put(request, reply)
        except OSError as exc:
            # The spend is recorded and the update is good: send it. Only a resend
            # of this round would be refused, as before replies were stored.
            log.warning(
                "could not store run %s round %d's reply: %s", request.run_id, request.round, exc
            )
        log.info(
            "trained run %s round %d in %.3f s",
            request.run_id, request.round, time.perf_counter() - started,
        )  # fmt: skip
        return reply

    def secagg(self, request: SecAggRequest) -> SecAggReply:
        """A keys or reveal step of a secure-aggregation round."""
        if request.step == "keys":
            return self._secagg.keys(request)
        return self._secagg.reveal(request)

    def evaluate(self, request: EvaluateRequest) -> EvaluateReply:
        """Evaluate the global model (allowed outside windows: little compute). Each
        answer is a DP release charged to the site's privacy unit, rate-limited by policy."""
        with self._lock:
            trainer = self._trainer_for(request.contract_json, request.contract_sha256)
            return trainer.evaluate(request)

    def query(self, request: QueryRequest) -> QueryReply:
        """The site's status for the scheduler."""
        now = self._clock()
        windows = self._config.windows
        inside = in_window(windows, now)
        ends = window_end(windows, now) if inside else None
        opens = None if inside else next_window_start(windows, now)
        accelerator = accelerator_kind(self._config)
        throughput = None
        with self._lock:
            trainer = None
            if request.contract_json is not None and request.contract_sha256 is not None:
                try:
                    trainer = self._trainer_for(request.contract_json, request.contract_sha256)
                except SiteError as exc:
                    if request.round_ask is None:
                        raise
                    # the reason (file, row, value) stays here; the coordinator sees "no-data"
                    log.warning("the study's data does not load: %s", exc)
            elif self._default is not None:
                trainer = self._trainers[self._default]
            if request.preset is not None and trainer is not None:
                from medfed.client.throughput import ThroughputCache, TrainingSetup

                throughput = ThroughputCache(self._config.state_dir).get(
                    request.preset, trainer.contract, TrainingSetup.of(self._config)
                )
            budget = None
            if request.study_sha256 is not None and trainer is not None:
                budget = self._budget_left(trainer, request, now)
            patients = 0 if trainer is None else _public_patients(trainer)
            preflight = ""
            if request.round_ask is not None:
                preflight = self._preflight(trainer, request.round_ask, inside)
        return QueryReply(
            site_id=self._config.site.id,
            in_window=inside,
            window_ends=0.0 if ends is None else ends.timestamp(),
            next_window_start=0.0 if opens is None else opens.timestamp(),
            accelerator=accelerator,
            throughput=throughput,
            budget_left=budget,
            patients=patients,
            preflight=preflight,
        )

    def _preflight(self, trainer: SiteTrainer | None, ask: PreflightAsk, inside: bool) -> str:
        """The category of why this site would refuse the round `ask` describes ("" if it
        would train it): the gate's own checks, as a dry run."""
        if not inside:
            return "outside-window"
        if trainer is None:
            return "no-data"
        refused = trainer.preflight(ask)
        if refused is None:
            return ""
        log.info("pre-flight of run %s round %d: %s", ask.run_id, ask.round, refused.reason)
        return refused.code

    def ask(self, request: AskRequest) -> AskReply:
        """One exchange of a query (`client.ask`): allowed outside training windows (a
        query computes sums, no training), charged to the ledger before it leaves."""
        from medfed.client.ask import answer

        with self._lock:
            trainer = self._trainer_for(request.contract_json, request.contract_sha256)
            return answer(trainer, self._config, request, signer=self._signer, secagg=self._secagg)

    def egress_rules(self) -> EgressRules:
        """What the egress guard enforces for this site."""
        return EgressRules(
            site_id=self._config.site.id,
            min_cohort_k=self._config.privacy.min_cohort_k,
            site_key=self._site_key,
        )

    def audit(self, event: str, details: Mapping[str, JsonValue]) -> None:
        """Append an event to the site's signed audit log (the guard reports drops here)."""
        self._audit.append(event, details)

    def _budget_left(self, trainer: SiteTrainer, request: QueryRequest, now: dt.datetime) -> float:
        """Epsilon this study may still spend here: the least of what the dataset's cap
        and the officer's approval (if the policy requires one) leave."""
        from medfed.client.privacy_gate import study_label

        policy = self._config.privacy
        delta = request.delta if request.delta is not None else policy.max_delta
        records = trainer.ledger.unit_records(trainer.privacy_unit)
        spends = [PastSpend(r.study, r.event, r.recorded_at) for r in records]
        in_cap = counted(spends, policy.cap_window, now)
        dataset_eps = epsilon_of(
            [s.event for s in in_cap], delta=delta, accountant=policy.accountant
        )
        lifetime_eps = epsilon_of(
            [s.event for s in spends], delta=delta, accountant=policy.accountant
        )
        left = min(policy.epsilon_cap - dataset_eps, policy.lifetime_cap - lifetime_eps)
        label = study_label(request.study or "", request.study_sha256 or "")
        approval = trainer.ledger.approval_for(
            request.study_sha256 or "",
            VerifyKey.load(self._config.officer_public_key_path),
            site_id=self._config.site.id,
        )
        if approval is not None:
            study_events = [s.event for s in spends if s.study_key == label]
            study_eps = epsilon_of(study_events, delta=delta, accountant=policy.accountant)
            left = min(left, approval.epsilon - study_eps)
        elif policy.require_approval:
            left = 0.0
        return max(0.0, left)
