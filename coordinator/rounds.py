"""The round loop: plan, send the global model, validate replies, aggregate, checkpoint, report.

It talks to sites only through Flower's `Grid` (push, then poll for replies), so the
same loop runs on a deployment's SuperLink, in Flower's simulation, and in tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from medfed.common import natural_key
from medfed.coordinator.audit_chain import CoordinatorAudit, NoAudit
from medfed.coordinator.checkpoints import CHECKPOINTS_NAME, CheckpointStore
from medfed.coordinator.errors import CoordinatorError, RoundFailedError
from medfed.coordinator.grid_retry import retrying
from medfed.coordinator.messages import exchange, instruction, wait_for_sites
from medfed.coordinator.results import RoundRecord, RunResults
from medfed.coordinator.run_state import RunState, checkpoint, extend_lineage, start_or_resume
from medfed.coordinator.scheduler import RoundPlan, SchedulePolicy, plan_round
from medfed.coordinator.secure_rounds import Ahead, SecureOutcome, run_secure_round
from medfed.coordinator.site_keys import load_site_keys
from medfed.coordinator.site_status import query_statuses, status_query
from medfed.coordinator.strategies import Contribution, Strategy, make_strategy
from medfed.coordinator.study import StudySettings
from medfed.coordinator.validate import (
    ModelCheck,
    ReceiptCheck,
    Rejection,
    Sender,
    SiteEval,
    SiteUpdate,
    size_limit_bytes,
    validate_eval_reply,
    validate_train_reply,
)
from medfed.model import wire
from medfed.model.contract import StudyContract
from medfed.model.network import arrays_sha256, build_model, state_arrays
from medfed.privacy import release
from medfed.privacy.errors import PrivacyError
from medfed.privacy.signing import JsonValue, SigningKey, VerifyKey

log = logging.getLogger(__name__)

WAIT_POLL_S = 60.0
"""While too few sites can train: the longest sleep before asking them again."""

Report = Callable[[RunResults], None]


def _weighted(values: Iterable[tuple[float, int]]) -> float | None:
    pairs = [(value, weight) for value, weight in values if weight > 0 and math.isfinite(value)]
    total = sum(weight for _, weight in pairs)
    if total == 0:
        return None
    return sum(value * weight for value, weight in pairs) / total


def _split(
    results: Iterable[SiteUpdate | SiteEval | Rejection], known_sites: dict[int, str]
) -> tuple[list[SiteUpdate | SiteEval], dict[str, str]]:
    """Accepted replies (one per site) and the reasons for the rest, keyed by site id.

    `known_sites` maps node ids to site ids seen in earlier valid replies, so an error
    reply (which carries no content) is still listed under its site's name.
    """
    accepted: list[SiteUpdate | SiteEval] = []
    rejected: dict[str, str] = {}
    seen_sites: set[str] = set()
    for result in results:
        if isinstance(result, Rejection):
            site = result.site_id or known_sites.get(result.node_id, f"node-{result.node_id}")
            rejected[site] = result.reason
        elif result.site_id in seen_sites:
            rejected[result.site_id] = "a second reply from the same site in one round"
        else:
            seen_sites.add(result.site_id)
            known_sites[result.node_id] = result.site_id
            accepted.append(result)
    return accepted, rejected


MetricName = Literal["auroc", "c_index"]


def primary_metric(contract: StudyContract) -> MetricName:
    """The held-out metric a run is followed by: AUROC when the study has a binary task
    (the sites report its AUROC), else the c-index of a survival study."""
    if any(task.kind == "binary" for task in contract.tasks):
        return "auroc"
    return "c_index" if any(task.kind == "survival" for task in contract.tasks) else "auroc"


def _held_out_metric(check: ModelCheck, name: MetricName) -> float:
    return check.eval_c_index if name == "c_index" else check.eval_auroc


def _scores(
    checks: Sequence[ModelCheck], name: MetricName = "auroc"
) -> tuple[float | None, float | None]:
    """A model's training loss and held-out metric over all sites, weighted by patients."""
    pooled = release.pooled([check.eval_stats for check in checks])
    if pooled is not None and all(check.eval_stats for check in checks):
        # Every site sent its noised sufficient statistics: the figures over all their
        # patients at once (a c-index is not a sum, and is not released under DP).
        held_out = pooled.auroc if name == "auroc" else math.nan
        return _finite(pooled.train_loss), _finite(held_out)
    loss = _weighted((check.train_loss, check.num_examples) for check in checks)
    metric = _weighted((_held_out_metric(check, name), check.eval_examples) for check in checks)
    return loss, metric


def _intervals(
    checks: Mapping[str, ModelCheck],
) -> tuple[list[float] | None, dict[str, list[float]]]:
    """95% intervals of the held-out AUROC, pooled (every site sent its statistics) and
    per site, from the released histograms: post-processing, no privacy spent."""
    by_site: dict[str, list[float]] = {}
    for site, check in sorted(checks.items()):
        interval = release.vector_auroc_interval(check.eval_stats) if check.eval_stats else None
        if interval is not None:
            by_site[site] = list(interval)
    vectors = [check.eval_stats for check in checks.values()]
    pooled = None
    if vectors and all(vectors):
        total = np.sum(np.asarray(vectors, dtype=np.float64), axis=0)
        interval = release.vector_auroc_interval(total)
        pooled = None if interval is None else list(interval)
    return pooled, by_site


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Clock:
    """Wall time for the scheduler and a way to wait: a fake one in tests."""

    now: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep


def schedule_policy(study: StudySettings) -> SchedulePolicy:
    """What the scheduler reads of the study."""
    return SchedulePolicy(
        min_sites=study.min_sites,
        deadline_s=study.round_deadline_s,
        local_steps=study.local_steps,
        sample_rate=study.sample_rate,
        secure=study.secure_aggregation,
    )


def strategy_of(study: StudySettings) -> Strategy:
    """The study's strategy with its parameters."""
    return make_strategy(
        study.strategy,
        proximal_mu=study.proximal_mu,
        update_norm_bound=study.update_norm_bound or None,
        server_learning_rate=study.server_learning_rate,
        beta1=study.server_beta1,
        beta2=study.server_beta2,
        tau=study.server_tau,
    )


def run_study(
    grid: Grid,
    study: StudySettings,
    contract: StudyContract,
    *,
    run_id: str,
    report: Report,
    connect_timeout_s: float = 120.0,
    app_sha256: str = "",
    clock: Clock = Clock(),
) -> RunResults:
    """Run (or, with `study.resume`, continue) every round of `study`; report progress
    after each; return the final results.

    With `study.run_dir` set, a checkpoint is written after every round and every step is
    signed into the run folder's audit chain; `run_id` is then the id of the run the
    folder holds when resuming.
    """
    grid = retrying(grid)
    run_dir = Path(study.run_dir) if study.run_dir else None
    store = CheckpointStore(run_dir / CHECKPOINTS_NAME) if run_dir else None
    audit = (
        CoordinatorAudit.open(run_dir, signer=audit_signer(study), store=store)
        if run_dir
        else NoAudit()
    )
    strategy = strategy_of(study)
    initial = state_arrays(build_model(study.preset, contract=contract, seed=study.seed))
    state, resumed = start_or_resume(
        store, study, strategy, initial, run_id=run_id, app_sha256=app_sha256
    )
    if resumed:
        log.warning(
            "resuming run %s after round %d (this Flower run: %s)",
            state.run_id,
            state.round,
            run_id,
        )
        audit.record(
            "run.resumed",
            {"run_id": state.run_id, "after_round": state.round, "flower_run_id": run_id},
        )
    else:
        audit.record(
            "run.started",
            {
                "run_id": run_id,
                "study": study.name,
                "study_sha256": study.sha256(),
                "app_sha256": app_sha256,
                "strategy": study.strategy,
                "model_sha256": arrays_sha256(initial),
                "num_rounds": study.num_rounds,
            },
        )
        checkpoint(store, audit, study, state, strategy, None)
    results = state.results
    results.metric_name = primary_metric(contract)
    results.flower_run_id = run_id
    report(results)
    results.status = "running"
    try:
        _run_rounds(
            grid, study, contract, state, strategy, audit, report, connect_timeout_s, store, clock
        )
    except Exception as exc:
        # Whoever watches the results (the demo, `round status`) learns that the run ended.
        results.status = "failed"
        results.error = (
            str(exc) if isinstance(exc, CoordinatorError) else f"internal error: {exc!r}"
        )
        report(results)
        with contextlib.suppress(CoordinatorError):
            audit.record("run.failed", {"round": state.round + 1, "error": results.error})
        raise
    results.status = "completed"
    results.waiting_until = None
    audit.record(
        "run.finished", {"rounds": state.round, "model_sha256": arrays_sha256(state.arrays)}
    )
    report(results)
    return results


def _record_scores(
    results: RunResults, checks: Mapping[str, ModelCheck], name: MetricName = "auroc"
) -> None:
    """Scores of the model the sites just received (the initial one, or the last round's),
    over all sites and per site."""
    loss, metric = _scores(list(checks.values()), name)
    if results.per_round:
        record = results.per_round[-1]
        record.loss, record.metric, record.metric_name = loss, metric, name
        record.loss_by_site = {site: check.train_loss for site, check in sorted(checks.items())}
        record.metric_by_site = {
            site: _held_out_metric(check, name) for site, check in sorted(checks.items())
        }
        if name == "auroc":
            record.metric_ci, record.metric_ci_by_site = _intervals(checks)
    else:
        results.initial_loss, results.initial_metric = loss, metric


def _plan(
    grid: Grid,
    study: StudySettings,
    state: RunState,
    audit: CoordinatorAudit,
    report: Report,
    known_sites: dict[int, str],
    connect_timeout_s: float,
    clock: Clock,
    answered: Mapping[int, Message] | None = None,
) -> tuple[RoundPlan, dict[int, Sender], dict[int, str]]:
    """Ask the connected sites for their status and plan the round; while the plan is to
    wait, record it, sleep towards its ETA and ask again. Also returns, per node that
    answered, the site id and patients it gave (each reply is checked against them),
    and per node that did not, why. `answered`: statuses already in hand (they came with
    the round before's reveal), used for the first plan only."""
    policy = schedule_policy(study)
    recorded: dict[str, object] | None = None  # the wait last written to the audit chain
    while True:
        nodes = wait_for_sites(grid, study.min_sites, timeout_s=connect_timeout_s)
        statuses = query_statuses(
            grid, nodes, study, state.run_id, state.round + 1, known_sites, state.unqueryable,
            answered,
        )  # fmt: skip
        answered = None  # after a wait, every site is asked again
        now = clock.now()
        plan = plan_round(statuses, policy, now)
        unknown = {s.node_id: f"{s.site_id} {s.unknown_reason}" for s in statuses if not s.known}
        for reason in unknown.values():
            log.warning("round %d: status unknown: %s", state.round + 1, reason)
        if plan.action == "train":
            senders = {
                status.node_id: Sender(status.site_id, status.patients)
                for status in statuses
                if status.known
            }
            return plan, senders, unknown
        if plan.to_json() != recorded:  # one entry per change, not one per nap
            recorded = plan.to_json()
            audit.record("round.waiting", {"round": state.round + 1, **_json(recorded)})
        state.results.status = "waiting"
        state.results.waiting_until = plan.eta
        report(state.results)
        log.warning(
            "round %d: too few sites can train now (%s); waiting until %s",
            state.round + 1,
            "; ".join(f"{site}: {why}" for site, why in sorted(plan.refused.items())) or "none",
            "unknown" if plan.eta is None else plan.eta,
        )
        pause = WAIT_POLL_S if plan.eta is None else min(max(plan.eta - now, 1.0), WAIT_POLL_S)
        clock.sleep(pause)


def _json(value: dict[str, object]) -> dict[str, JsonValue]:
    return value  # type: ignore[return-value]


def _run_rounds(
    grid: Grid,
    study: StudySettings,
    contract: StudyContract,
    state: RunState,
    strategy: Strategy,
    audit: CoordinatorAudit,
    report: Report,
    connect_timeout_s: float,
    store: CheckpointStore | None,
    clock: Clock,
) -> None:
    results = state.results
    known_sites = registered_sites(study.site_nodes)
    site_keys = load_site_keys(Path(study.site_keys_dir)) if study.site_keys_dir else None
    results.signed_updates = site_keys is not None
    if site_keys is None:
        log.warning("no site-keys-dir in the run config: site updates are NOT signature-checked")
    max_bytes = size_limit_bytes(state.arrays)
    announcer = _announcer(study)
    if not study.secure_aggregation:
        log.warning(
            "SECURE AGGREGATION IS OFF for study %s: the coordinator sees each site's"
            " (DP-noised) update, not only their sum",
            study.name,
        )
        audit.record(
            "secure_aggregation.off",
            {"study": study.name, "study_sha256": study.sha256(), "from_round": state.round + 1},
        )
    elif study.update_norm_bound:
        log.warning(
            "update-norm-bound cannot be applied per site under secure aggregation; each"
            " coordinate is clipped to secagg-clip at the site instead"
        )
    ahead: Ahead | None = None  # the next round's keys, dealt during a secure round
    answered: dict[int, Message] = {}  # the next round's statuses, with the reveal
    while state.round < study.num_rounds:
        round_number = state.round + 1
        asked_at = time.monotonic()
        plan, senders, unknown = _plan(
            grid, study, state, audit, report, known_sites, connect_timeout_s, clock, answered
        )
        results.status, results.waiting_until = "running", None
        started = time.monotonic()
        audit.record("round.planned", {"round": round_number, **_json(plan.to_json())})
        for site, reason in plan.refused.items():
            audit.record("site.refused", {"round": round_number, "site": site, "reason": reason})
        for planned in plan.planned:
            audit.record(
                "site.selected",
                {
                    "round": round_number,
                    "site": planned.site_id,
                    "local_steps": planned.local_steps,
                },
            )
        round_seed = int(state.rng.integers(0, 2**31 - 1))
        contents = {
            planned.node_id: instruction(
                study,
                contract,
                state.run_id,
                round_number,
                state.arrays,
                local_steps=planned.local_steps,
                extra={wire.SEED: round_seed, **strategy.instruction_config()},
            )
            for planned in plan.planned
        }
        secure: SecureOutcome | None = None
        if study.secure_aggregation:
            secure = run_secure_round(
                grid,
                study,
                run_id=state.run_id,
                round_number=round_number,
                global_arrays=state.arrays,
                model_sha256=arrays_sha256(state.arrays),
                plan=plan,
                senders=senders,
                contents=contents,
                signer=announcer,
                site_keys=site_keys,
                unknown_reasons=unknown,
                ahead=ahead,
                deal_ahead=round_number < study.num_rounds,
                next_status=(
                    status_query(state.run_id, study, round_number + 1).config_records[wire.CONFIG]
                    if round_number < study.num_rounds
                    else None
                ),
            )
            ahead, answered = secure.ahead, secure.statuses
            updates, rejected = secure.updates, secure.rejected
            known_sites.update({u.node_id: u.site_id for u in updates})
            audit.record(
                "round.secure_aggregation",
                {
                    "round": round_number,
                    "announcement_sha256": secure.announcement_sha256,
                    "exchanges": secure.exchanges,
                    "survivors": [u.site_id for u in updates],
                },
            )
        else:
            updates, rejected = _plain_replies(
                grid, study, state, plan, senders, contents, site_keys, known_sites, max_bytes
            )
        _audit_replies(audit, round_number, updates, rejected, secure.digests if secure else None)
        if len(updates) < study.min_sites:
            reasons = "; ".join(f"{site}: {reason}" for site, reason in rejected.items())
            raise RoundFailedError(
                f"round {round_number}: {len(updates)} valid replies of {len(plan.planned)}"
                f" sites, the study needs {study.min_sites}" + (f" ({reasons})" if reasons else "")
            )
        _record_scores(
            results,
            {update.site_id: update.check for update in updates},
            primary_metric(contract),
        )
        if secure is not None:
            aggregated = strategy.from_average(state.arrays, secure.averaged, secure.trained_by)
        else:
            aggregated = strategy.aggregate(
                state.arrays,
                [
                    Contribution(u.site_id, u.arrays, u.num_examples, u.trained_groups)
                    for u in updates
                ],
            )
        for site, norm in aggregated.clipped.items():
            log.warning(
                "round %d: %s's update (norm %.4g) clipped to %g",
                round_number,
                site,
                norm,
                study.update_norm_bound,
            )
            audit.record(
                "update.clipped",
                {
                    "round": round_number,
                    "site": site,
                    "norm": norm,
                    "bound": study.update_norm_bound,
                },
            )
        state.arrays = aggregated.arrays
        record = RoundRecord(
            round=round_number,
            participants=[u.site_id for u in updates],
            local_loss=_weighted((u.local_loss, u.num_examples) for u in updates),
            epsilon_by_site={u.site_id: u.epsilon for u in updates},
            noise_by_site={u.site_id: u.noise_multiplier for u in updates},
            rejected=rejected,
            model_sha256=arrays_sha256(state.arrays),
            duration_s=round(time.monotonic() - started, 3),
            planning_s=round(started - asked_at, 3),
            refused=dict(plan.refused),
            # By the names the replies gave: a site of unknown status was planned by node id.
            local_steps_by_site={
                known_sites.get(p.node_id, p.site_id): p.local_steps for p in plan.planned
            },
            clipped=dict(aggregated.clipped),
        )
        results.sites = sorted({*results.sites, *record.participants}, key=natural_key)
        results.per_round.append(record)
        extend_lineage(
            state.lineage,
            record,
            {u.site_id: u.dataset_sha256 for u in updates if u.dataset_sha256 is not None},
        )
        audit.record(
            "round.aggregated",
            {
                "round": round_number,
                "model_sha256": record.model_sha256,
                "participants": record.participants,
                "strategy": study.strategy,
                "weights": {u.site_id: u.num_examples for u in updates},
                "trained_by": _json(dict(aggregated.trained_by)),
            },
        )
        state.round = round_number
        checkpoint(store, audit, study, state, strategy, plan.to_json())
        report(results)
    _record_scores(
        results,
        final_checks(grid, study, contract, state.run_id, state.arrays, known_sites),
        primary_metric(contract),
    )


def _plain_replies(
    grid: Grid,
    study: StudySettings,
    state: RunState,
    plan: RoundPlan,
    senders: Mapping[int, Sender],
    contents: Mapping[int, RecordDict],
    site_keys: Mapping[str, VerifyKey] | None,
    known_sites: dict[int, str],
    max_bytes: int,
) -> tuple[list[SiteUpdate], dict[str, str]]:
    """Send the plain train instructions; the valid updates and the reasons for the rest."""
    round_number = state.round + 1
    replies = exchange(
        grid,
        contents,
        message_type=MessageType.TRAIN,
        group=str(round_number),
        timeout_s=study.round_deadline_s,
    )
    receipts = (
        None
        if site_keys is None
        else ReceiptCheck(
            run_id=state.run_id,
            study_sha256=study.sha256(),
            round=round_number,
            model_sha256=arrays_sha256(state.arrays),
            site_keys=site_keys,
        )
    )
    accepted, rejected = _split(
        (
            validate_train_reply(
                r,
                state.arrays,
                receipts=receipts,
                max_bytes=max_bytes,
                sender=senders.get(r.metadata.src_node_id),
            )
            for r in replies
        ),
        known_sites,
    )
    updates = sorted(
        (update for update in accepted if isinstance(update, SiteUpdate)), key=_by_site
    )
    missing = {
        p.site_id
        for p in plan.planned
        if p.node_id not in {r.metadata.src_node_id for r in replies}
    }
    for site in sorted(missing - set(rejected)):
        rejected[known_sites.get(_node_of(plan, site), site)] = (
            f"no reply within the {study.round_deadline_s:g} s deadline (dropped)"
        )
    return updates, rejected


def _announcer(study: StudySettings) -> SigningKey:
    """The key that signs round announcements: the study's coordinator key, or one made
    for this run (sites that pinned the coordinator's key then refuse, as they should)."""
    if study.coordinator_key:
        try:
            return SigningKey.load(Path(study.coordinator_key))
        except PrivacyError as exc:
            raise CoordinatorError(f"run config coordinator-key: {exc}") from exc
    if study.secure_aggregation:
        log.warning("no coordinator-key in the run config: announcements signed by a run key")
    return SigningKey.generate()


def registered_sites(path: str) -> dict[int, str]:
    """Site ids by node id from `coordinator start`'s record of its registrations (empty
    without one): a site that never answered a query is still named by its id."""
    if not path:
        return {}
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        return {int(node): str(site) for site, node in dict(document).items()}
    except (OSError, ValueError, TypeError) as exc:
        log.warning("%s: the registered nodes cannot be read (%s); sites named by node", path, exc)
        return {}


def audit_signer(study: StudySettings) -> SigningKey | None:
    """The provisioned coordinator key that signs the audit chain (None: no key given)."""
    if not study.coordinator_key:
        return None
    try:
        return SigningKey.load(Path(study.coordinator_key))
    except PrivacyError as exc:
        raise CoordinatorError(f"run config coordinator-key: {exc}") from exc


def _node_of(plan: RoundPlan, site: str) -> int:
    return next(p.node_id for p in plan.planned if p.site_id == site)


def _audit_replies(
    audit: CoordinatorAudit,
    round_number: int,
    updates: Sequence[SiteUpdate],
    rejected: Mapping[str, str],
    masked: Mapping[str, str] | None = None,
) -> None:
    """One entry per update (under secure aggregation: the digest of the masked update
    the site signed, the only form the coordinator saw) and per rejected reply."""
    for update in updates:
        digest = arrays_sha256(update.arrays) if masked is None else masked[update.site_id]
        audit.record(
            "update.received",
            {
                "round": round_number,
                "site": update.site_id,
                **({"update_sha256": digest} if masked is None else {"masked_sha256": digest}),
                "num_examples": update.num_examples,
                "epsilon": update.epsilon,
                "noise_multiplier": update.noise_multiplier,
                "trained_groups": sorted(update.trained_groups),
                "dataset_sha256": update.dataset_sha256,
            },
        )
    for site, reason in sorted(rejected.items()):
        log.warning("round %d: reply of %s rejected: %s", round_number, site, reason)
        audit.record("update.rejected", {"round": round_number, "site": site, "reason": reason})


def _by_site(update: SiteUpdate) -> str:
    return update.site_id


def final_checks(
    grid: Grid,
    study: StudySettings,
    contract: StudyContract,
    run_id: str,
    arrays: Mapping[str, np.ndarray],
    known_sites: dict[int, str],
) -> dict[str, ModelCheck]:
    """How the final model does at every connected site (an EVALUATE message to each)."""
    content = instruction(study, contract, run_id, study.num_rounds, arrays)
    replies = exchange(
        grid,
        {node: content for node in sorted(grid.get_node_ids())},
        message_type=MessageType.EVALUATE,
        group="final",
        timeout_s=study.round_timeout_s,
    )
    accepted, rejected = _split((validate_eval_reply(reply) for reply in replies), known_sites)
    for site, reason in rejected.items():
        log.warning("final evaluation: reply of %s rejected: %s", site, reason)
    return {result.site_id: result.check for result in accepted if isinstance(result, SiteEval)}
