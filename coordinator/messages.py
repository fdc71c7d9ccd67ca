"""Messages to the sites over Flower's `Grid`: wait for sites, push and poll, and the
train or evaluate instruction every site receives. Push, then poll for replies: the
same code runs on a deployment's SuperLink, in Flower's simulation and in tests. Each
exchange's payload bytes go to the traffic log (`coordinator.traffic`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from medfed.coordinator.errors import RoundFailedError
from medfed.coordinator.study import StudySettings, contract_json
from medfed.coordinator.traffic import ExchangeTraffic, counting, log_exchange
from medfed.model import wire
from medfed.model.contract import StudyContract
from medfed.model.wire import arrays_sha256

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05
"""How often to ask the SuperLink for replies (Flower's own helper waits 3 s)."""
PROGRESS_EVERY_S = 10.0
"""While replies are awaited: how often to log who has answered and who not."""


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
    contents: Mapping[int, RecordDict],
    *,
    message_type: str,
    group: str,
    timeout_s: float,
    names: Mapping[int, str] | None = None,
) -> list[Message]:
    """Send each node its content and return the replies that arrive before the timeout;
    every `PROGRESS_EVERY_S` log who is still awaited (by `names`, else node id)."""
    messages = [
        Message(
            content=content,
            dst_node_id=node,
            message_type=message_type,
            group_id=group,
            ttl=timeout_s,
        )
        for node, content in contents.items()
    ]
    began = time.monotonic()
    pushed = list(grid.push_messages(messages))
    node_of = {
        message_id: message.metadata.dst_node_id
        for message_id, message in zip(pushed, messages, strict=False)
        if message_id
    }
    pending = set(node_of)
    replies: list[Message] = []
    started = time.monotonic()
    deadline, next_report = started + timeout_s, started + PROGRESS_EVERY_S
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
        if pending and time.monotonic() >= next_report:
            next_report += PROGRESS_EVERY_S
            log.warning(
                "round %s: %d of %d sites answered after %.0f s; waiting up to %g s for %s",
                group, len(replies), len(node_of), time.monotonic() - started, timeout_s,
                _named(pending, node_of, names),
            )  # fmt: skip
        if pending:
            time.sleep(POLL_INTERVAL_S)
    if pending:
        log.warning(
            "round %s: %s did not reply within %g s",
            group, _named(pending, node_of, names), timeout_s,
        )  # fmt: skip
    if counting():
        log_exchange(
            ExchangeTraffic(
                group=group,
                message_type=message_type,
                messages=len(node_of),
                replies=len(replies),
                to_sites_bytes=sum(content_bytes(contents[node]) for node in node_of.values()),
                from_sites_bytes=sum(content_bytes(r.content) for r in replies if r.has_content()),
                seconds=round(time.monotonic() - began, 4),
            )
        )
    return replies


def content_bytes(content: RecordDict) -> int:
    """A message's payload bytes: every array's data, and every config and metric record
    as Flower serializes it (without message metadata or the transport's framing)."""
    arrays = [array for record in content.array_records.values() for array in record.values()]
    records = [*content.config_records.values(), *content.metric_records.values()]
    return sum(len(array.data) for array in arrays) + sum(len(r.deflate()) for r in records)


def _named(pending: set[str], node_of: Mapping[str, int], names: Mapping[int, str] | None) -> str:
    nodes = sorted(node_of[message_id] for message_id in pending)
    return ", ".join((names or {}).get(node, f"node-{node}") for node in nodes)


def instruction(
    study: StudySettings,
    contract: StudyContract,
    run_id: str,
    round_number: int,
    arrays: Mapping[str, np.ndarray],
    *,
    local_steps: int | None = None,
    extra: Mapping[str, int | float | str] | None = None,
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
            wire.CONTRACT: contract_json(contract),
            wire.CONTRACT_SHA256: contract.sha256(),
            wire.MODEL_IDENTITY: _identity(study, contract),
            wire.LOCAL_STEPS: study.local_steps if local_steps is None else local_steps,
            wire.LEARNING_RATE: study.learning_rate,
            wire.MAX_GRAD_NORM: study.max_grad_norm,
            wire.SAMPLE_RATE: study.sample_rate,
            wire.DELTA: study.delta,
            **(extra or {}),
        }
    )
    # One packed float32 buffer: a few Flower objects to pull instead of one per array.
    model = wire.arrays_to_record(arrays, packed=True)
    return RecordDict({wire.ARRAYS: model, wire.CONFIG: config})


def _identity(study: StudySettings, contract: StudyContract) -> str:
    from medfed.model.network import model_identity  # torch: only where a model is sent

    return model_identity(study.preset, contract)
