"""The coordinator's side of a query (`medfed ask`): exchanges, sums, Newton steps.

Every exchange sends each site the query, its step and the coefficients of each Newton
analysis; every site answers one noised vector (`analysis.layout`) signed with its key.
The coordinator checks each signature against the site's registered key, sums the
vectors of the sites that answered, and turns the sums into answers
(`analysis.answers`): one-shot analyses after step 0, a Newton step per exchange for
the regressions. Sites that refuse are listed with their reason. Each answer, the sites
and their digests go to the results file, and every exchange to the signed audit chain.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from medfed.analysis.answers import NewtonState, one_shot_answer, piece_noise_var
from medfed.analysis.errors import AnalysisError
from medfed.analysis.layout import step_layout, step_width
from medfed.analysis.query import AskQuery, ContractNames, CoxAnalysis, LogisticAnalysis
from medfed.coordinator.audit_chain import CoordinatorAudit
from medfed.coordinator.errors import RoundFailedError
from medfed.coordinator.messages import exchange, wait_for_sites
from medfed.coordinator.secure_ask import betas_json, secure_step, site_ids
from medfed.coordinator.study import StudySettings
from medfed.model import wire
from medfed.model.contract import StudyContract
from medfed.model.query_names import query_names
from medfed.privacy.receipts import ask_receipt_payload
from medfed.privacy.signing import JsonValue, SigningKey, VerifyKey

log = logging.getLogger(__name__)


@dataclass
class SiteAnswer:
    """What one site said at one step."""

    site_id: str
    released: np.ndarray
    noise_multiplier: float
    epsilon: float
    dataset_sha256: str
    signature: str
    signature_checked: bool
    approval: str = ""
    """The officer's approval the site answered under (`key id|epsilon|approved at`)."""


@dataclass
class AskResults:
    """The results file of a query run: status, answers and the chain of evidence."""

    run_id: str
    query: dict[str, object]
    query_sha256: str
    status: str = "running"
    started: str = ""
    finished: str = ""
    seconds: float = 0.0
    app_sha256: str = ""
    contract_sha256: str = ""
    answers: list[dict[str, object]] = field(default_factory=list)
    sites: list[dict[str, object]] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)
    steps: list[dict[str, object]] = field(default_factory=list)
    error: str = ""
    secure_aggregation: bool = True

    def to_json(self) -> dict[str, object]:
        """The results as plain JSON (a non-finite number, which noise can make, as null)."""
        document = finite_json(dict(self.__dict__))
        assert isinstance(document, dict)
        return document


def _content(query: AskQuery, contract: StudyContract, run_id: str, step: int,
             betas: Mapping[int, list[float]]) -> RecordDict:  # fmt: skip
    config = {
        wire.RUN_ID: run_id,
        wire.ASK_QUERY: query.canonical_json(),
        wire.ASK_QUERY_SHA256: query.sha256(),
        wire.CONTRACT: contract.canonical_json(),
        wire.CONTRACT_SHA256: contract.sha256(),
        wire.ASK_STEP: step,
        wire.ASK_BETAS: json.dumps({str(k): v for k, v in betas.items()}),
    }
    return RecordDict({wire.CONFIG: ConfigRecord(config)})  # type: ignore[arg-type]


def site_keys_in(folder: str) -> dict[str, VerifyKey]:
    """The sites' registered public keys (`<site>.pub` in `folder`), by site id."""
    keys: dict[str, VerifyKey] = {}
    if folder and Path(folder).is_dir():
        for path in Path(folder).glob("*.pub"):
            try:
                keys[path.stem] = VerifyKey.load(path)
            except Exception:  # an unreadable key: that site's answers go unchecked
                log.warning("cannot read site key %s", path)
    return keys


def _read_reply(
    reply: Message, query: AskQuery, run_id: str, step: int, keys: Mapping[str, VerifyKey]
) -> SiteAnswer | str:
    """The site's answer, or why it is not one (a refusal's reason, a malformed reply)."""
    if reply.has_error():
        return reply.error.reason or f"error {reply.error.code}"
    content = reply.content
    try:
        site_id = wire.get_value(content, wire.SITE, wire.SITE_ID, str)
        released = content.array_records[wire.ARRAYS][wire.RELEASED].numpy()
        metrics = content.metric_records[wire.METRICS]
        z = float(metrics[wire.NOISE_MULTIPLIER])  # type: ignore[arg-type]
        epsilon = float(metrics[wire.EPSILON])  # type: ignore[arg-type]
        signature = wire.get_value(content, wire.SITE, wire.RECEIPT_SIGNATURE, str)
        digest = wire.get_value(content, wire.SITE, wire.DATASET_SHA256, str)
    except (KeyError, TypeError, ValueError, wire.WireError) as exc:
        return f"a malformed answer ({exc})"
    if released.dtype != np.float64 or released.shape != (step_width(query, step),):
        return f"{site_id}: an answer of {released.shape} values, not {step_width(query, step)}"
    if not (np.isfinite(released).all() and np.isfinite(z) and z > 0):
        return f"{site_id}: an answer with values that are not finite"
    checked = False
    if site_id in keys:
        payload = ask_receipt_payload(run_id=run_id, query_sha256=query.sha256(), step=step,
                                      site_id=site_id, released=released)  # fmt: skip
        try:
            if not keys[site_id].verify(payload, bytes.fromhex(signature)):
                return f"{site_id}: an answer whose signature is not the site's"
        except ValueError:
            return f"{site_id}: an answer whose signature is not hex"
        checked = True
    return SiteAnswer(site_id, released, z, epsilon, digest, signature, checked,
                      approval_in(reply))  # fmt: skip


def approval_in(reply: Message) -> str:
    """The approval a site's answer names, if any."""
    site = reply.content.config_records.get(wire.SITE)
    value = None if site is None else site.get(wire.ASK_APPROVAL)
    return value if isinstance(value, str) else ""


def _site_of(reason: str) -> tuple[str, str]:
    site, _, text = reason.partition(": ")
    return (site, text) if text else ("unknown site", reason)


@dataclass
class AskSetup:
    """What a query run needs besides the query: the study (contract, timeouts), the
    sites' registered keys and the coordinator's signing key (secure aggregation)."""

    study: StudySettings
    site_keys: dict[str, VerifyKey] = field(default_factory=dict)
    signer: SigningKey | None = None
    app_sha256: str = ""


@dataclass
class StepAnswers:
    """One exchange's outcome: the sum over the sites that answered, and who they were."""

    total: np.ndarray
    good: list[SiteAnswer]
    refused: list[tuple[str, str]]
    secure: str = ""
    """The secure exchange's announcement digest; empty for a plain exchange."""


def run_ask(
    grid: Grid,
    query: AskQuery,
    setup: AskSetup,
    *,
    run_id: str,
    report: Callable[[AskResults], None],
    audit: CoordinatorAudit,
    wait_s: float = 60.0,
) -> AskResults:
    """Run `query` over the connected sites and return (and report) its results."""
    contract = setup.study.contract
    started = time.monotonic()
    results = AskResults(run_id, json.loads(query.canonical_json()), query.sha256(),
                         started=dt.datetime.now(dt.UTC).isoformat(),
                         app_sha256=setup.app_sha256, contract_sha256=contract.sha256(),
                         secure_aggregation=query.secure_aggregation)  # fmt: skip
    audit.record("query.started", {"query": query.name, "query_sha256": query.sha256(),
                                   "app_sha256": setup.app_sha256,
                                   "secure_aggregation": query.secure_aggregation})  # fmt: skip
    report(results)
    names = query_names(contract)
    nodes = wait_for_sites(grid, query.min_sites, timeout_s=wait_s)
    by_site: dict[str, int] = {}
    if query.secure_aggregation:
        if setup.signer is None:
            raise RoundFailedError("secure aggregation needs the coordinator's signing key")
        by_site = {
            site: node for node, site in site_ids(grid, nodes, run_id, query.timeout_s).items()
        }
    newton = {
        index: NewtonState.start(analysis)
        for index, analysis in enumerate(query.analyses)
        if isinstance(analysis, CoxAnalysis | LogisticAnalysis)
    }
    for step in range(query.iterations):
        betas = {i: state.beta.tolist() for i, state in newton.items() if not state.done(step)}
        if query.secure_aggregation:
            outcome = _secure_exchange(grid, query, setup, run_id, step, betas, by_site)
        else:
            outcome = _plain_exchange(grid, query, setup, run_id, step, betas, nodes)
        for site, reason in outcome.refused:
            results.refused.append({"site": site, "step": str(step), "reason": reason})
            audit.record("site.refused", {"step": step, "site": site, "reason": reason})
        if len(outcome.good) < query.min_sites:
            raise RoundFailedError(f"step {step}: {len(outcome.good)} site(s) answered, the"
                                   f" query needs {query.min_sites}")  # fmt: skip
        _record_step(audit, results, step, outcome)
        _combine(query, names, step, outcome, newton, results)
        answered = {a.site_id for a in outcome.good}
        nodes = sorted(n for n in nodes if n not in by_site.values() or n in
                       {by_site[s] for s in answered if s in by_site})  # fmt: skip
        by_site = {s: n for s, n in by_site.items() if s in answered}
        report(results)
    for index, state in newton.items():
        try:
            if state.failure:
                raise AnalysisError(state.failure)
            results.answers.append({"index": index, **state.answer(names)})
        except UNCOMPUTABLE as exc:
            results.answers.append(not_computable(index, state.analysis.kind, exc))
    results.answers.sort(key=lambda a: int(str(a["index"])))
    results.sites = _sites(outcome.good)
    results.status, results.finished = "completed", dt.datetime.now(dt.UTC).isoformat()
    results.seconds = round(time.monotonic() - started, 3)
    audit.record("query.finished", {"query_sha256": query.sha256(), "sites": len(outcome.good),
                                    "answers_sha256": _answers_digest(results)})  # fmt: skip
    report(results)
    return results


def _plain_exchange(grid: Grid, query: AskQuery, setup: AskSetup, run_id: str, step: int,
                    betas: Mapping[int, list[float]], nodes: list[int]) -> StepAnswers:  # fmt: skip
    """Each site's noised, signed vector in the clear (`secure-aggregation = false`)."""
    contract = setup.study.contract
    contents = {node: _content(query, contract, run_id, step, betas) for node in nodes}
    replies = exchange(grid, contents, message_type=wire.ASK, group=f"ask-{step}",
                       timeout_s=query.timeout_s)  # fmt: skip
    good: list[SiteAnswer] = []
    refused: list[tuple[str, str]] = []
    for reply in replies:
        read = _read_reply(reply, query, run_id, step, setup.site_keys)
        if isinstance(read, SiteAnswer):
            good.append(read)
        else:
            refused.append(_site_of(read))
    total = np.sum([a.released for a in good], axis=0) if good else np.zeros(0)
    return StepAnswers(total, good, refused)


def _secure_exchange(
    grid: Grid, query: AskQuery, setup: AskSetup, run_id: str, step: int,
    betas: Mapping[int, list[float]], by_site: Mapping[str, int],
) -> StepAnswers:  # fmt: skip
    """Only the sum of the sites' noised vectors (`coordinator.secure_ask`)."""
    assert setup.signer is not None
    contract = setup.study.contract
    keyed, _ = betas_json(betas)
    contents = {site: _content(query, contract, run_id, step, betas) for site in by_site}
    done = secure_step(grid, setup.study, query, contents, run_id=run_id, step=step,
                       betas=keyed, nodes=by_site, signer=setup.signer,
                       site_keys=setup.site_keys or None)  # fmt: skip
    good = [
        SiteAnswer(
            site,
            np.zeros(0),
            z,
            epsilon,
            digest,
            done.masked_sha256[site],
            bool(setup.site_keys),
            done.approvals.get(site, ""),
        )
        for site, (z, epsilon, digest) in sorted(done.facts.items())
    ]
    return StepAnswers(done.total, good, sorted(done.rejected.items()), done.announcement_sha256)


def _record_step(audit: CoordinatorAudit, results: AskResults, step: int,
                 outcome: StepAnswers) -> None:  # fmt: skip
    """Each answer's digest (plain: of the vector, with the site's signature over it;
    secure: of its masked vector, whose signed receipt the coordinator checked)."""
    if outcome.secure:
        audit.record("query.secure_sum", {"step": step, "announcement": outcome.secure})
    entries: list[dict[str, JsonValue]] = [
        {
            "site": a.site_id,
            **(
                {"masked_sha256": a.signature}
                if outcome.secure
                else {
                    "released_sha256": hashlib.sha256(a.released.tobytes()).hexdigest(),
                    "signature": a.signature,
                }
            ),
            "signature_checked": a.signature_checked,
            "noise_multiplier": a.noise_multiplier,
        }
        for a in outcome.good
    ]
    results.steps.append({"step": step, "secure": bool(outcome.secure), "answers": entries})
    for entry in entries:
        audit.record("answer.received", {"step": step, **entry})


def _combine(query: AskQuery, names: ContractNames, step: int, outcome: StepAnswers,
             newton: Mapping[int, NewtonState], results: AskResults) -> None:  # fmt: skip
    """Answers from the sum, per slot: one-shot ones at step 0, a Newton step otherwise."""
    good, total = outcome.good, outcome.total
    multipliers = [a.noise_multiplier for a in good]
    for slot in step_layout(query, step):
        analysis = query.analyses[slot.index]
        summed = total[slot.start : slot.stop]
        noise = piece_noise_var(analysis, multipliers)
        try:
            if slot.newton:
                newton[slot.index].update(summed, noise, sites=len(good))
            else:
                answer = one_shot_answer(analysis, summed, noise, names)
                results.answers.append({"index": slot.index, **answer})
        except UNCOMPUTABLE as exc:  # noise can leave a sum no answer can be read from
            log.warning("analysis %d: %s", slot.index, exc)
            if slot.newton:
                newton[slot.index].failure = str(exc)
            else:
                results.answers.append(not_computable(slot.index, analysis.kind, exc))


UNCOMPUTABLE = (AnalysisError, ValueError, ArithmeticError, np.linalg.LinAlgError)
"""What turning noised sums into an answer may raise: that answer is then not computable,
and the query goes on."""


def not_computable(index: int, kind: str, error: BaseException) -> dict[str, object]:
    """An answer that could not be read from the noised sums, saying why."""
    return {"index": index, "kind": kind, "estimable": False,
            "why": f"not computable from the noised sums: {error}"}  # fmt: skip


def finite_json(value: object) -> object:
    """`value` with every non-finite float as None (JSON has no NaN or infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def _sites(good: list[SiteAnswer]) -> list[dict[str, object]]:
    return [
        {
            "site": a.site_id,
            "epsilon": a.epsilon,
            "noise_multiplier": a.noise_multiplier,
            "dataset_sha256": a.dataset_sha256,
            "signature_checked": a.signature_checked,
            "approval": _approval_json(a.approval),
        }
        for a in sorted(good, key=lambda a: a.site_id)
    ]


def _approval_json(text: str) -> dict[str, object] | None:
    parts = text.split("|")
    if len(parts) != 3:
        return None
    return {"officer_key_id": parts[0], "epsilon": float(parts[1]), "approved_at": parts[2]}


def _answers_digest(results: AskResults) -> str:
    text = json.dumps(results.answers, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
