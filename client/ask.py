"""A site answers a query (`medfed ask`): pre-flight, charge, compute, noise, sign.

Order matters as in training (`client.privacy_gate`): the query is checked against the
study's contract, the cohort against the policy's minimum, and the whole query's
epsilon (all its releases, calibrated to the query's epsilon by the site's accountant)
is charged to the ledger, with the officer's approval where required, before the first
number leaves. Each exchange is answered once: a repeated step is refused, so noise is
never drawn twice for the same numbers. A Cox step's coefficients must lie inside the
query's L1 bound, where its stated sensitivity holds.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from pathlib import Path

import numpy as np

from medfed.analysis.answers import sensitivities
from medfed.analysis.layout import newton_width, releases_at, step_digest
from medfed.analysis.query import (
    AskQuery,
    CoxAnalysis,
    LogisticAnalysis,
    QueryError,
    check_against,
    query_from,
)
from medfed.client.ask_answers import cohort, noised, step_parts
from medfed.client.config import SiteConfig
from medfed.client.errors import BudgetRefusal, RequestError, SiteRefusal
from medfed.client.privacy_gate import QueryCharge, query_run
from medfed.client.protocol import AskReply, AskRequest
from medfed.client.site_secagg import SiteSecAgg
from medfed.client.trainer import SiteTrainer
from medfed.common import write_atomic
from medfed.model.query_names import query_names
from medfed.model.sample import PatientSample
from medfed.privacy.calibration import calibrate_noise
from medfed.privacy.errors import InfeasibleBudgetError
from medfed.privacy.receipts import ask_receipt_payload
from medfed.privacy.release import release_event
from medfed.privacy.signing import JsonValue, SigningKey

log = logging.getLogger(__name__)

ASKS_DIR = "asks"
"""Under the site's state folder: the exchanges each query run has been answered."""
L1_SLACK = 1e-9


def parse_request_query(request: AskRequest) -> AskQuery:
    """The request's query, checked against its announced digest."""
    try:
        query = query_from(request.query_json, where="the coordinator's query")
    except QueryError as exc:
        raise RequestError(str(exc)) from exc
    if query.sha256() != request.query_sha256:
        raise RequestError("the query does not match its announced digest")
    if not 0 <= request.step < query.iterations:
        raise RequestError(f"step {request.step} is outside the query's {query.iterations}")
    return query


def _betas(query: AskQuery, request: AskRequest) -> dict[int, np.ndarray]:
    """The coefficients of each Newton analysis that releases at this step."""
    try:
        raw = json.loads(request.betas_json)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise RequestError(f"betas: not JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise RequestError("betas: not an object")
    betas: dict[int, np.ndarray] = {}
    for index, analysis in enumerate(query.analyses):
        if not isinstance(analysis, CoxAnalysis | LogisticAnalysis):
            continue
        if not releases_at(analysis, request.step):
            continue
        values = raw.get(str(index), [0.0] * newton_width(analysis))
        if (
            not isinstance(values, list)
            or len(values) != newton_width(analysis)
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in values)
        ):
            raise RequestError(f"betas[{index}]: not {newton_width(analysis)} finite numbers")
        beta = np.array(values, dtype=np.float64)
        if (
            isinstance(analysis, CoxAnalysis)
            and np.abs(beta).sum() > analysis.beta_l1_bound + L1_SLACK
        ):
            raise SiteRefusal(
                f"analysis {index}: the coefficients lie outside the query's L1 bound"
                f" {analysis.beta_l1_bound:g}, where its sensitivity would not hold"
            )
        betas[index] = beta
    return betas


def noise_for(query: AskQuery, config: SiteConfig, patients: int) -> float:
    """The noise multiplier of every release of `query` at this site: the smallest whose
    releases together spend at most the query's epsilon, by the site's accountant."""
    try:
        return calibrate_noise(
            target_epsilon=query.epsilon,
            delta=query.delta,
            sample_rate=1.0,
            steps=query.releases(),
            n_patients=max(patients, 1),
            accountant=config.privacy.accountant,
        )
    except InfeasibleBudgetError as exc:
        raise BudgetRefusal(f"query {query.name}: {exc}") from exc


class AnsweredSteps:
    """The exchanges of each query run this site has answered (a JSON file per run)."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder

    def _path(self, run_id: str) -> Path:
        import hashlib

        return self._folder / f"{hashlib.sha256(run_id.encode()).hexdigest()[:32]}.json"

    def answered(self, run_id: str) -> list[int]:
        path = self._path(run_id)
        if not path.is_file():
            return []
        steps = json.loads(path.read_text(encoding="utf-8"))
        return [int(s) for s in steps]

    def mark(self, run_id: str, step: int) -> None:
        """Recorded before the answer leaves: a crash after it refuses the step again."""
        steps = sorted({*self.answered(run_id), step})
        write_atomic(self._path(run_id), json.dumps(steps).encode("utf-8"))


def _cohort(trainer: SiteTrainer, config: SiteConfig, query: AskQuery) -> list[PatientSample]:
    """The query's cohort here, or a refusal: below the policy's minimum, or above a Cox
    analysis's public bound on patients (where its sensitivity would not hold)."""
    patients = cohort(trainer.samples, query)
    k = config.privacy.min_cohort_k
    if len(patients) < k:
        raise SiteRefusal(f"the query's cohort is below the site's minimum of {k} patients")
    for analysis in query.analyses:
        if isinstance(analysis, CoxAnalysis) and len(patients) > analysis.max_patients:
            raise SiteRefusal(
                f"the query's Cox sensitivity assumes at most {analysis.max_patients} patients"
                " per site; this site's cohort is larger"
            )
    return patients


def _charge(trainer: SiteTrainer, request: AskRequest, query: AskQuery, z: float) -> None:
    """Step 0 charges the whole query (once per run); a later step needs that charge."""
    gate, unit = trainer.gate, trainer.privacy_unit
    if request.step == 0:
        event = release_event(z, releases=query.releases())
        charge = QueryCharge(request.run_id, query.name, query.sha256(), event,
                             query.epsilon, query.delta)  # fmt: skip
        gate.charge_query(unit, charge)
    elif not any(r.run_id == query_run(request.run_id) for r in trainer.ledger.unit_records(unit)):
        raise SiteRefusal(f"query run {request.run_id} was never charged here: it starts at step 0")


def answer(
    trainer: SiteTrainer,
    config: SiteConfig,
    request: AskRequest,
    *,
    signer: SigningKey,
    secagg: SiteSecAgg | None = None,
) -> AskReply:
    """This site's noised, signed answer to one exchange of a query; under secure
    aggregation (`request.secagg`) the vector stays in `secagg` and its shares go out."""
    query = parse_request_query(request)
    names = query_names(trainer.contract)
    try:
        check_against(query, names)
    except QueryError as exc:
        raise RequestError(str(exc)) from exc
    betas = _betas(query, request)
    steps = AnsweredSteps(config.state_dir / ASKS_DIR)
    if request.step in steps.answered(request.run_id):
        raise SiteRefusal(
            f"query run {request.run_id} step {request.step} was answered here already; its"
            " noise is not drawn again"
        )
    patients = _cohort(trainer, config, query)
    z = noise_for(query, config, len(trainer.samples))
    _charge(trainer, request, query, z)
    parts = step_parts(query, patients, names, request.step, betas)
    released = noised(parts, noise_multiplier=z, rng=np.random.default_rng(secrets.randbits(128)))
    steps.mark(request.run_id, request.step)
    shares, receipt = "", ""
    if request.secagg:
        if secagg is None:
            raise SiteRefusal("secure aggregation needs the site worker (`medfed site start`)")
        digest = step_digest(query.sha256(), request.step, json.loads(request.betas_json))
        masked = secagg.share_vector(
            request.run_id, request.step + 1, request.secagg,
            released / sensitivities(query, request.step),
            study_sha256=query.sha256(), model_sha256=digest,
        )  # fmt: skip
        shares, released, receipt = masked.shares, masked.vector, masked.receipt_signature
    site_id = config.site.id
    if not shares:
        payload = ask_receipt_payload(
            run_id=request.run_id, query_sha256=query.sha256(), step=request.step,
            site_id=site_id, released=released,
        )  # fmt: skip
        receipt = signer.sign(payload).hex()
    trainer.gate.audit.append("query.answered", _audit_details(request, query, z))
    approval = trainer.gate.approval_of(query.sha256())
    approved = (
        "" if approval is None
        else f"{approval.officer_key_id}|{approval.epsilon:g}|{approval.approved_at}"
    )  # fmt: skip
    return AskReply(
        site_id=site_id,
        step=request.step,
        released=released,
        noise_multiplier=z,
        epsilon=query.epsilon,
        dataset_sha256=trainer.gate.keyed_digest(trainer.dataset_fingerprint),
        receipt_signature=receipt,
        secagg=shares,
        approval=approved,
    )


def _audit_details(request: AskRequest, query: AskQuery, z: float) -> dict[str, JsonValue]:
    return {
        "run_id": request.run_id,
        "query": query.name,
        "query_sha256": query.sha256(),
        "step": request.step,
        "noise_multiplier": z,
    }
