"""The round loop: send the global model, collect and validate replies, aggregate, report.

It talks to sites only through Flower's `Grid` (push, then poll for replies), so the
same loop runs on a deployment's SuperLink, in Flower's simulation, and in tests.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from coordinator.aggregate import fedavg
from coordinator.errors import CoordinatorError, RoundFailedError
from coordinator.results import RoundRecord, RunResults
from coordinator.site_keys import load_site_keys
from coordinator.study import StudySettings
from coordinator.validate import (
    ModelCheck,
    ReceiptCheck,
    Rejection,
    SiteEval,
    SiteUpdate,
    validate_eval_reply,
    validate_train_reply,
)
from model import wire
from model.contract import StudyContract
from model.network import arrays_sha256, build_model, state_arrays

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05
"""How often to ask the SuperLink for replies (Flower's own helper waits 3 s)."""

Report = Callable[[RunResults], None]


def wait_for_sites(grid: Grid, minimum: int, *, timeout_s: float) -> list[int]:
    """The connected node ids once at least `minimum` are connected; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise RoundFailedError(
                f"only {len(nodes)} of the {minimum} sites needed connected within {timeout_s:g} s"
            )
        time.sleep(0.5)


def exchange(
    grid: Grid,
    nodes: Sequence[int],
    content: RecordDict,
    *,
    message_type: str,
    group: str,
    timeout_s: float,
) -> list[Message]:
    """Send `content` to every node and return the replies that arrive before the timeout."""
    messages = [
        Message(
            content=content,
            dst_node_id=node,
            message_type=message_type,
            group_id=group,
            ttl=timeout_s,
        )
        for node in nodes
    ]
    pending = {message_id for message_id in grid.push_messages(messages) if message_id}
    replies: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
        if pending:
            time.sleep(POLL_INTERVAL_S)
    if pending:
        log.warning(
            "round %s: %d site(s) did not reply within %g s", group, len(pending), timeout_s
        )
    return replies


def _instruction(
    study: StudySettings,
    contract: StudyContract,
    run_id: str,
    round_number: int,
    arrays: Mapping[str, np.ndarray],
) -> RecordDict:
    config = ConfigRecord(
        {
            wire.RUN_ID: run_id,
            wire.STUDY: study.name,
            wire.STUDY_SHA256: study.sha256(),
            wire.ROUND: round_number,
            wire.PLANNED_ROUNDS: study.num_rounds,
            wire.TARGET_EPSILON: study.target_epsilon,
            wire.MODEL_SHA256: arrays_sha256(arrays),
            wire.PRESET: study.preset,
            wire.N_FEATURES: len(contract.numeric),
            wire.LOCAL_STEPS: study.local_steps,
            wire.LEARNING_RATE: study.learning_rate,
            wire.MAX_GRAD_NORM: study.max_grad_norm,
            wire.SAMPLE_RATE: study.sample_rate,
            wire.DELTA: study.delta,
        }
    )
    return RecordDict({wire.ARRAYS: wire.arrays_to_record(arrays), wire.CONFIG: config})


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


def _scores(checks: Sequence[ModelCheck]) -> tuple[float | None, float | None]:
    """A model's training loss and held-out AUROC over all sites, weighted by patients."""
    loss = _weighted((check.train_loss, check.num_examples) for check in checks)
    auroc = _weighted((check.eval_auroc, check.eval_examples) for check in checks)
    return loss, auroc


def run_study(
    grid: Grid,
    study: StudySettings,
    contract: StudyContract,
    *,
    run_id: str,
    report: Report,
    connect_timeout_s: float = 120.0,
) -> RunResults:
    """Run every round of `study`; report progress after each; return the final results."""
    results = RunResults(run_id=run_id, status="waiting", num_rounds=study.num_rounds)
    report(results)
    results.status = "running"
    try:
        _run_rounds(grid, study, contract, run_id, results, report, connect_timeout_s)
    except Exception as exc:
        # Whoever watches the results (the demo, `round status`) learns that the run ended.
        results.status = "failed"
        results.error = (
            str(exc) if isinstance(exc, CoordinatorError) else f"internal error: {exc!r}"
        )
        report(results)
        raise
    results.status = "completed"
    report(results)
    return results


def _record_scores(results: RunResults, checks: Sequence[ModelCheck]) -> None:
    """Scores of the model the sites just received: the initial one, or the last round's."""
    loss, auroc = _scores(checks)
    if results.per_round:
        results.per_round[-1].loss, results.per_round[-1].metric = loss, auroc
    else:
        results.initial_loss, results.initial_metric = loss, auroc


def _run_rounds(
    grid: Grid,
    study: StudySettings,
    contract: StudyContract,
    run_id: str,
    results: RunResults,
    report: Report,
    connect_timeout_s: float,
) -> None:
    global_arrays = state_arrays(build_model(study.preset, contract=contract, seed=study.seed))
    known_sites: dict[int, str] = {}
    site_keys = load_site_keys(Path(study.site_keys_dir)) if study.site_keys_dir else None
    results.signed_updates = site_keys is not None
    if site_keys is None:
        log.warning("no site-keys-dir in the run config: site updates are NOT signature-checked")
    for round_number in range(1, study.num_rounds + 1):
        started = time.monotonic()
        nodes = wait_for_sites(grid, study.min_sites, timeout_s=connect_timeout_s)
        replies = exchange(
            grid,
            nodes,
            _instruction(study, contract, run_id, round_number, global_arrays),
            message_type=MessageType.TRAIN,
            group=str(round_number),
            timeout_s=study.round_timeout_s,
        )
        receipts = (
            None
            if site_keys is None
            else ReceiptCheck(
                run_id=run_id,
                study_sha256=study.sha256(),
                round=round_number,
                model_sha256=arrays_sha256(global_arrays),
                site_keys=site_keys,
            )
        )
        accepted, rejected = _split(
            (validate_train_reply(r, global_arrays, receipts=receipts) for r in replies),
            known_sites,
        )
        updates = [update for update in accepted if isinstance(update, SiteUpdate)]
        for site, reason in rejected.items():
            log.warning("round %d: reply of %s rejected: %s", round_number, site, reason)
        if len(updates) < study.min_sites:
            reasons = "; ".join(f"{site}: {reason}" for site, reason in rejected.items())
            raise RoundFailedError(
                f"round {round_number}: {len(updates)} valid replies of {len(nodes)} sites,"
                f" the study needs {study.min_sites}" + (f" ({reasons})" if reasons else "")
            )
        _record_scores(results, [update.check for update in updates])
        global_arrays = fedavg([(update.arrays, update.num_examples) for update in updates])
        results.sites = sorted({*results.sites, *(update.site_id for update in updates)})
        results.per_round.append(
            RoundRecord(
                round=round_number,
                participants=sorted(update.site_id for update in updates),
                local_loss=_weighted((u.local_loss, u.num_examples) for u in updates),
                epsilon_by_site={u.site_id: u.epsilon for u in sorted(updates, key=_by_site)},
                noise_by_site={
                    u.site_id: u.noise_multiplier for u in sorted(updates, key=_by_site)
                },
                rejected=rejected,
                model_sha256=arrays_sha256(global_arrays),
                duration_s=round(time.monotonic() - started, 3),
            )
        )
        report(results)
    _record_scores(results, final_checks(grid, study, contract, run_id, global_arrays, known_sites))


def _by_site(update: SiteUpdate) -> str:
    return update.site_id


def final_checks(
    grid: Grid,
    study: StudySettings,
    contract: StudyContract,
    run_id: str,
    arrays: Mapping[str, np.ndarray],
    known_sites: dict[int, str],
) -> list[ModelCheck]:
    """How the final model does at every connected site (an EVALUATE message to each)."""
    nodes = sorted(grid.get_node_ids())
    replies = exchange(
        grid,
        nodes,
        _instruction(study, contract, run_id, study.num_rounds, arrays),
        message_type=MessageType.EVALUATE,
        group="final",
        timeout_s=study.round_timeout_s,
    )
    accepted, rejected = _split((validate_eval_reply(reply) for reply in replies), known_sites)
    for site, reason in rejected.items():
        log.warning("final evaluation: reply of %s rejected: %s", site, reason)
    return [result.check for result in accepted if isinstance(result, SiteEval)]
