"""Asking the sites for their status before a round (a Flower `query` message).

A site answers with the METRICS keys of `model.wire` (in window, window end, next
window, throughput, budget left, patients) and its accelerator in the SITE record. A
site that replies with an error (its software predates the query), malformed content,
or not at all within the timeout has an *unknown* status: the scheduler still plans
it with the study's default steps, and the site itself refuses what it may not do.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from medfed.coordinator.messages import exchange
from medfed.coordinator.scheduler import PREFLIGHT_REASONS, SiteStatus
from medfed.coordinator.study import StudySettings, contract_json
from medfed.model import wire

log = logging.getLogger(__name__)

MAX_PATIENTS = 10_000_000
"""As `validate.MAX_EXAMPLES`: a larger count is bogus."""


def status_query(run_id: str, study: StudySettings, round_number: int = 0) -> RecordDict:
    """The content of a status query: which run and study the site is asked about, and
    (round_number >= 1) the round about to be planned, for the site's pre-flight."""
    round_fields: dict[str, int | float] = {}
    if round_number >= 1:
        round_fields = {
            wire.ROUND: round_number,
            wire.PLANNED_ROUNDS: study.num_rounds,
            wire.TARGET_EPSILON: study.target_epsilon,
            wire.MAX_GRAD_NORM: study.max_grad_norm,
        }
    return RecordDict(
        {
            wire.CONFIG: ConfigRecord(
                {
                    wire.RUN_ID: run_id,
                    wire.STUDY: study.name,
                    wire.STUDY_SHA256: study.sha256(),
                    wire.PRESET: study.preset,
                    wire.DELTA: study.delta,
                    wire.CONTRACT: contract_json(study.contract),
                    wire.CONTRACT_SHA256: study.contract.sha256(),
                    wire.SAMPLE_RATE: study.sample_rate,
                    wire.LOCAL_STEPS: study.local_steps,
                    **round_fields,
                }
            )
        }
    )


def unknown_status(node_id: int, known_sites: dict[int, str], reason: str) -> SiteStatus:
    """The status of a site that did not say: named as last seen, else by its node id."""
    return SiteStatus(
        node_id, known_sites.get(node_id, f"node-{node_id}"), known=False, unknown_reason=reason
    )


def parse_status(reply: Message, known_sites: dict[int, str]) -> SiteStatus:
    """The site's status from its reply, or an unknown status if it is an error or malformed."""
    node_id = reply.metadata.src_node_id
    if reply.has_error():
        log.info("node %s answered the status query with an error: %s", node_id, reply.error.reason)
        return unknown_status(
            node_id, known_sites, f"answered the status query with an error: {reply.error.reason}"
        )
    content = reply.content

    def metric(key: str, kind: type[wire.T]) -> wire.T:
        return wire.get_value(content, wire.METRICS, key, kind)

    try:
        site_id = wire.get_value(content, wire.SITE, wire.SITE_ID, str)
        accelerator = wire.get_value(content, wire.SITE, wire.ACCELERATOR, str)
        in_window = metric(wire.IN_WINDOW, int)
        patients = metric(wire.PATIENTS, int)
        throughput = metric(wire.THROUGHPUT, float)
        preflight = ""
        if wire.PREFLIGHT in content.config_records[wire.SITE]:
            preflight = wire.get_value(content, wire.SITE, wire.PREFLIGHT, str)
        if preflight and preflight not in PREFLIGHT_REASONS:
            raise wire.WireError(f"site.{wire.PREFLIGHT}: unknown category {preflight!r}")
        if in_window not in (0, 1):
            raise wire.WireError(f"metrics.{wire.IN_WINDOW}: {in_window} is not 0 or 1")
        if not 0 <= patients <= MAX_PATIENTS:
            raise wire.WireError(f"metrics.{wire.PATIENTS}: {patients} is out of range")
        if throughput < 0:
            raise wire.WireError(f"metrics.{wire.THROUGHPUT}: {throughput} is negative")
        status = SiteStatus(
            node_id=node_id,
            site_id=site_id,
            in_window=bool(in_window),
            window_ends=metric(wire.WINDOW_ENDS, float),
            next_window_start=metric(wire.NEXT_WINDOW_START, float),
            accelerator=accelerator,
            throughput_sps=throughput,
            budget_left=metric(wire.BUDGET_LEFT, float),
            patients=patients,
            preflight=preflight,
        )
    except wire.WireError as exc:
        log.warning("node %s sent a malformed status (%s); its status is unknown", node_id, exc)
        return unknown_status(node_id, known_sites, f"sent a malformed status: {exc}")
    known_sites[node_id] = site_id
    return status


def query_statuses(
    grid: Grid,
    nodes: Sequence[int],
    study: StudySettings,
    run_id: str,
    round_number: int,
    known_sites: dict[int, str],
    unqueryable: set[int],
    answered_before: Mapping[int, Message] | None = None,
) -> list[SiteStatus]:
    """Each node's status. Without secure aggregation, a node that answered a query with
    an error cannot answer it (its software has no such function) and is added to
    `unqueryable`, not to be asked again in this run: each query costs a ClientApp start
    at the site, and a site of unknown status is planned anyway. A secure round plans no
    site of unknown status, so there a node is asked again each round: one error reply
    (a worker restarting, a simulated ClientApp that raised) would otherwise leave it
    out of every later round, and a study that needs it could never go on.

    `answered_before`: status replies already in hand (a secure round's reveal carried
    the next round's statuses); only the other nodes are asked, and none when there are
    none."""
    answered: dict[int, Message] = {
        node: reply for node, reply in (answered_before or {}).items() if node in nodes
    }
    asked = [node for node in nodes if node not in unqueryable and node not in answered]
    replies = (
        exchange(
            grid,
            {node: status_query(run_id, study, round_number) for node in asked},
            message_type=MessageType.QUERY,
            group=f"status-{round_number}",
            timeout_s=study.round_deadline_s,
            names=known_sites,
        )
        if asked
        else []
    )
    answered.update({reply.metadata.src_node_id: reply for reply in replies})
    if not study.secure_aggregation:
        unqueryable.update(node for node, reply in answered.items() if reply.has_error())
    silent = f"did not answer the status query within {study.round_deadline_s:g} s"
    return [
        parse_status(answered[node], known_sites)
        if node in answered
        else unknown_status(
            node,
            known_sites,
            "its software answers no status query" if node in unqueryable else silent,
        )
        for node in nodes
    ]
