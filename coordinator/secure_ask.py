"""One exchange of a query under secure aggregation: the coordinator learns only the sum.

The same three steps as a secure training round (`coordinator.secure_rounds`), with the
query message in place of the train message: keys (a signed announcement naming the
query's digest and this step's digest: `analysis.layout.step_digest`, so no site can be
asked something else than the others), the query message with every site's keys (each
site computes and noises its vector and answers sealed shares and the vector masked,
with its receipt), reveal.
Sites divide each coordinate by its public sensitivity before encoding (every coordinate
then moves by at most one per patient, inside the fixed-point range `ASK_CLIP`), and the
coordinator multiplies the unmasked sum back. Below the threshold nothing is unmasked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from medfed.analysis.answers import sensitivities
from medfed.analysis.layout import step_digest, step_width
from medfed.analysis.query import AskQuery
from medfed.coordinator.errors import RoundFailedError
from medfed.coordinator.messages import exchange
from medfed.coordinator.secure_rounds import Masked, SecureRound, sealed_shares
from medfed.coordinator.study import StudySettings
from medfed.coordinator.validate import ReceiptCheck
from medfed.model import wire
from medfed.privacy.errors import PrivacyError, SecAggAbort
from medfed.privacy.secagg_protocol import (
    Advertisement,
    Announcement,
    SealedShare,
    SignedAnnouncement,
    dumps,
    unmask_weighted_sum,
)
from medfed.privacy.signing import SigningKey, VerifyKey

ASK_CLIP = float(2**20)
"""Per coordinate, in units of its sensitivity, the largest value a site encodes (about a
million patients' worth); the sum's resolution is `ASK_CLIP * sites / 2**31`."""


@dataclass
class SecureStep:
    """What a secure exchange gives the query: the sum, and each survivor's facts."""

    total: np.ndarray
    facts: dict[str, tuple[float, float, str]] = field(default_factory=dict)
    """Per survivor: (noise multiplier, epsilon, keyed data-version digest)."""
    rejected: dict[str, str] = field(default_factory=dict)
    announcement_sha256: str = ""
    masked_sha256: dict[str, str] = field(default_factory=dict)
    approvals: dict[str, str] = field(default_factory=dict)
    """Per survivor, the officer's approval its answer named."""


def site_ids(grid: Grid, nodes: list[int], run_id: str, timeout_s: float) -> dict[int, str]:
    """Each node's site id, from a bare status query (no study: nothing is loaded)."""
    content = RecordDict({wire.CONFIG: ConfigRecord({wire.RUN_ID: run_id})})
    replies = exchange(grid, dict.fromkeys(nodes, content), message_type="query",
                       group="ask-identities", timeout_s=timeout_s)  # fmt: skip
    ids: dict[int, str] = {}
    for reply in replies:
        if not reply.has_error():
            try:
                ids[reply.metadata.src_node_id] = wire.get_value(
                    reply.content, wire.SITE, wire.SITE_ID, str
                )
            except wire.WireError:
                continue
    return ids


def threshold_of(query: AskQuery, sites: int) -> int:
    """More than half the sites, and at least the query's minimum and 2."""
    return max(2, query.min_sites, sites // 2 + 1)


def _approval(reply: Message) -> str:
    site = reply.content.config_records.get(wire.SITE)
    value = None if site is None else site.get(wire.ASK_APPROVAL)
    return value if isinstance(value, str) else ""


def _facts(reply: Message) -> tuple[float, float, str]:
    metrics = reply.content.metric_records[wire.METRICS]
    z, epsilon = float(metrics[wire.NOISE_MULTIPLIER]), float(metrics[wire.EPSILON])  # type: ignore[arg-type]
    if not (np.isfinite(z) and z > 0 and np.isfinite(epsilon) and epsilon > 0):
        raise PrivacyError("the answer's noise multiplier or epsilon is not a positive number")
    return z, epsilon, wire.get_value(reply.content, wire.SITE, wire.DATASET_SHA256, str)


def secure_step(
    grid: Grid,
    study: StudySettings,
    query: AskQuery,
    contents: Mapping[str, RecordDict],
    *,
    run_id: str,
    step: int,
    betas: Mapping[str, list[float]],
    nodes: Mapping[str, int],
    signer: SigningKey,
    site_keys: Mapping[str, VerifyKey] | None,
) -> SecureStep:
    """Play one secure exchange with the sites of `nodes` (site id -> node id)."""
    sites = tuple(sorted(nodes))
    digest = step_digest(query.sha256(), step, dict(betas))
    try:
        announcement = Announcement(run_id=run_id, study_sha256=query.sha256(), round=step + 1,
                                    model_sha256=digest, sites=sites,
                                    threshold=threshold_of(query, len(sites)), clip=ASK_CLIP,
                                    weight_cap=1)  # fmt: skip
    except PrivacyError as exc:
        raise RoundFailedError(f"step {step}: {exc}") from exc
    receipts = (
        None if site_keys is None
        else ReceiptCheck(run_id, query.sha256(), step + 1, digest, site_keys)
    )  # fmt: skip
    timed = study.model_copy(update={"round_timeout_s": query.timeout_s})  # the query's wait
    secure = SecureRound(grid, timed, announcement,
                         SignedAnnouncement.sign(announcement, signer).to_text(),
                         dict(nodes), receipts, {})  # fmt: skip
    adverts = secure.keys()
    shares, masked, facts, approvals = _deal(secure, adverts, contents, step_width(query, step))
    survivors = sorted(masked)
    reveals = secure.reveal(sorted(adverts), shares, survivors).reveals
    try:
        total = unmask_weighted_sum(announcement, adverts, masked, reveals)
    except SecAggAbort as exc:
        raise RoundFailedError(f"step {step}: secure aggregation aborted ({exc})") from exc
    except PrivacyError as exc:
        raise RoundFailedError(f"step {step}: secure aggregation failed: {exc}") from exc
    from medfed.privacy.secagg_protocol import masked_sha256

    return SecureStep(
        total * sensitivities(query, step),
        {site: facts[site] for site in survivors},
        {site: reason[:400] for site, reason in secure.rejected.items()},
        announcement.sha256(),
        {site: masked_sha256(masked[site]) for site in survivors},
        {site: approvals[site] for site in survivors if site in approvals},
    )


def _deal(
    secure: SecureRound,
    adverts: Mapping[str, Advertisement],
    contents: Mapping[str, RecordDict],
    size: int,
) -> tuple[
    dict[str, list[SealedShare]], dict[str, Masked], dict[str, tuple[float, float, str]],
    dict[str, str],
]:  # fmt: skip
    """Step 2: the query message with every site's keys; sealed shares and the masked
    vector back (signed for this step's announced digest)."""
    relay = dumps({"announcement": secure.signed_text,
                   "adverts": [adverts[s].to_json() for s in sorted(adverts)]})  # fmt: skip
    a = secure.announcement
    messages = {}
    for site in sorted(adverts):
        config = {
            **dict(contents[site].config_records[wire.CONFIG]),
            wire.SECAGG: relay,
            # What the site's receipt over its masked vector names (its egress guard checks).
            wire.ROUND: a.round, wire.STUDY_SHA256: a.study_sha256,
            wire.MODEL_SHA256: a.model_sha256,
        }  # fmt: skip
        messages[site] = RecordDict({wire.CONFIG: ConfigRecord(config)})
    replies = secure.exchange("ask", messages, wire.ASK, secure.study.round_timeout_s)
    shares: dict[str, list[SealedShare]] = {}
    masked: dict[str, Masked] = {}
    facts: dict[str, tuple[float, float, str]] = {}
    approvals: dict[str, str] = {}
    for site, reply in replies.items():
        try:
            vector = secure.masked_vector(site, reply, size)
            facts[site] = _facts(reply)
            shares[site] = sealed_shares(reply, site, set(adverts) - {site})
            approvals[site] = _approval(reply)
        except (PrivacyError, wire.WireError, KeyError, TypeError, ValueError) as exc:
            secure.rejected[site] = f"ask: {exc}"
            shares.pop(site, None)
            continue
        masked[site] = vector
    secure.need(len(masked), "answered with a masked vector")
    return shares, masked, facts, approvals


def betas_json(betas: Mapping[int, list[float]]) -> tuple[dict[str, list[float]], str]:
    """The coefficients as the message carries them, and their JSON."""
    keyed = {str(k): v for k, v in betas.items()}
    return keyed, json.dumps(keyed)
