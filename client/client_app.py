"""The Flower ClientApp: a thin messenger between the coordinator and the site.

It decodes the coordinator's train, evaluate and query messages, hands them to the
site API (`client.site_api`) and encodes the answers. When the SuperNode's node config
names a `worker-socket`, the API is the site worker over its Unix socket and this module
never imports torch nor touches a data file; without one (simulation) it runs
`SiteService` in-process. Every reply passes the egress guard (`client.egress`).

A malformed or refused instruction gets an error reply that names the reason (a gone
worker too); the coordinator lists it and goes on, and the SuperNode keeps running.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from medfed.client.egress import AuditSink, egress_guard
from medfed.client.errors import (
    BudgetRefusal,
    ClientError,
    OutsideWindow,
    RequestError,
    public_reason,
)
from medfed.client.protocol import AskRequest, EgressRules, PreflightAsk, QueryRequest
from medfed.flower.apps import ClientApp
from medfed.model import wire
from medfed.model.presets import PRESET_NAMES, PresetName
from medfed.privacy.errors import PrivacyError
from medfed.sites.errors import SiteError
from medfed.sites.synthetic import site_id

if TYPE_CHECKING:
    from medfed.client.protocol import ModelCheck, SecAggStep
    from medfed.client.site_api import SiteApi

log = logging.getLogger(__name__)

WORKER_SOCKET = "worker-socket"
"""The node-config key that points the ClientApp at the site worker's socket."""
WORKER_WAIT = "worker-wait-s"
"""The node-config key for how long a message waits for a restarting worker (seconds)."""
DEFAULT_WORKER_WAIT_S = 60.0
SITE_CONFIG = "site-config"
"""The node-config key that names the site's site.toml (in-process mode)."""

ERROR_CODE_REFUSED = 4001
"""The error code of a reply in which the site refuses the instruction (reason attached)."""
ERROR_CODE_OUT_OF_BUDGET = 4002
"""The error code of a refusal because the round would exceed the approval or the cap."""
ERROR_CODE_OUTSIDE_WINDOW = 4003
"""The error code of a refusal to train outside the site's training windows (not a fault)."""

REFUSALS = (wire.WireError, ClientError, SiteError, PrivacyError)
"""Errors that become a refusal reply: a bad instruction, or the site's data or privacy rules."""


def site_config_path(context: Context) -> Path:
    """This site's `site.toml`: from the SuperNode's node config, or in a simulation from
    the run config's `sites-root` and the virtual node's partition id."""
    from medfed.client.config import SITE_TOML

    node = context.node_config
    if SITE_CONFIG in node:
        return Path(str(node[SITE_CONFIG]))
    root = str(context.run_config.get("sites-root", ""))
    if root and "partition-id" in node:
        return Path(root) / site_id(int(node["partition-id"])) / SITE_TOML
    raise RequestError(
        "this SuperNode does not say which site it is: start it with"
        " --node-config 'worker-socket=\"/path/to/worker.sock\"' (`medfed site start` does)"
        " or 'site-config=\"/path/to/site.toml\"'"
    )


def _worker_socket(context: Context) -> Path | None:
    value = context.node_config.get(WORKER_SOCKET)
    return None if value is None else Path(str(value))


def site_api(context: Context) -> SiteApi:
    """The site API for this message: the worker when one is configured, else in-process."""
    socket = _worker_socket(context)
    if socket is not None:
        from medfed.client.worker_rpc import WorkerClient

        wait_s = float(str(context.node_config.get(WORKER_WAIT, DEFAULT_WORKER_WAIT_S)))
        return WorkerClient(socket, wait_s=wait_s)
    return _in_process(site_config_path(context))


_SERVICES: dict[Path, SiteApi] = {}


def _in_process(site_toml: Path) -> SiteApi:
    """The in-process site of `site_toml`, one per site for the life of this process: its
    trainers stay warm and a secure-aggregation round's state lives across messages."""
    from medfed.client.config import load_site_config
    from medfed.client.site_api import SiteService

    key = site_toml.resolve()
    if key not in _SERVICES:
        _SERVICES[key] = SiteService(load_site_config(site_toml))
    return _SERVICES[key]


def _rules(context: Context) -> EgressRules:
    socket = _worker_socket(context)
    if socket is not None:
        from medfed.client.worker_rpc import WorkerClient

        return WorkerClient(socket).egress_rules()
    from medfed.client.config import load_site_config
    from medfed.privacy.signing import SigningKey

    config = load_site_config(site_config_path(context))
    key = SigningKey.load(config.signing_key_path).public.raw.hex()
    return EgressRules(
        site_id=config.site.id, min_cohort_k=config.privacy.min_cohort_k, site_key=key
    )


def _audit_sink(context: Context) -> AuditSink:
    socket = _worker_socket(context)
    if socket is not None:
        from medfed.client.worker_rpc import WorkerClient

        return WorkerClient(socket).audit
    from medfed.client.config import load_site_config
    from medfed.client.records import site_audit_log
    from medfed.privacy.signing import SigningKey

    config = load_site_config(site_config_path(context))
    log_ = site_audit_log(config, SigningKey.load(config.signing_key_path))
    return log_.append  # type: ignore[return-value]


GUARD = egress_guard(_rules, _audit_sink)
"""The egress guard, as this app's outermost mod (the warm executor adds its own too)."""

app = ClientApp(mods=[GUARD])


def _site_name(context: Context) -> str:
    try:
        return _rules(context).site_id
    except ClientError:
        return "unidentified site"


def _refusal(msg: Message, context: Context, error: Exception) -> Message:
    site = _site_name(context)
    if isinstance(error, BudgetRefusal):
        code = ERROR_CODE_OUT_OF_BUDGET
    elif isinstance(error, OutsideWindow):
        code = ERROR_CODE_OUTSIDE_WINDOW
    else:
        code = ERROR_CODE_REFUSED
    log.warning("%s refuses %s message: %s", site, msg.metadata.message_type, error)
    return Message(Error(code=code, reason=f"{site}: {public_reason(error)}"), reply_to=msg)


def _preset(content: RecordDict) -> PresetName:
    preset = wire.get_value(content, wire.CONFIG, wire.PRESET, str)
    if preset not in PRESET_NAMES:
        raise wire.WireError(f"config.{wire.PRESET}: unknown preset {preset!r}")
    return preset  # type: ignore[return-value]


def _check_metrics(check: ModelCheck) -> dict[str, int | float | list[int] | list[float]]:
    return {
        wire.NUM_EXAMPLES: check.train_examples,
        wire.MODEL_TRAIN_LOSS: check.train_loss,
        wire.EVAL_EXAMPLES: check.held_out.examples,
        wire.EVAL_LOSS: check.held_out.loss,
        wire.EVAL_AUROC: check.held_out.auroc,
        wire.EVAL_ACCURACY: check.held_out.accuracy,
        wire.EVAL_C_INDEX: check.held_out.c_index,
        wire.EVAL_RMSE: check.held_out.rmse,
        **({wire.EVAL_STATS: list(check.stats)} if check.stats else {}),
    }


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model at this site under DP-SGD."""
    from medfed.client.protocol import TrainRequest

    content = msg.content
    try:
        request = TrainRequest(
            run_id=wire.get_value(content, wire.CONFIG, wire.RUN_ID, str),
            study=wire.get_value(content, wire.CONFIG, wire.STUDY, str),
            study_sha256=wire.get_value(content, wire.CONFIG, wire.STUDY_SHA256, str),
            round=wire.get_value(content, wire.CONFIG, wire.ROUND, int),
            planned_rounds=wire.get_value(content, wire.CONFIG, wire.PLANNED_ROUNDS, int),
            arrays=wire.record_to_arrays(content),
            model_sha256=wire.get_value(content, wire.CONFIG, wire.MODEL_SHA256, str),
            preset=_preset(content),
            contract_json=wire.get_value(content, wire.CONFIG, wire.CONTRACT, str),
            contract_sha256=wire.get_value(content, wire.CONFIG, wire.CONTRACT_SHA256, str),
            local_steps=wire.get_value(content, wire.CONFIG, wire.LOCAL_STEPS, int),
            learning_rate=wire.get_value(content, wire.CONFIG, wire.LEARNING_RATE, float),
            target_epsilon=wire.get_value(content, wire.CONFIG, wire.TARGET_EPSILON, float),
            max_grad_norm=wire.get_value(content, wire.CONFIG, wire.MAX_GRAD_NORM, float),
            sample_rate=wire.get_value(content, wire.CONFIG, wire.SAMPLE_RATE, float),
            delta=wire.get_value(content, wire.CONFIG, wire.DELTA, float),
            proximal_mu=_optional(content, wire.PROXIMAL_MU, float) or 0.0,
            secagg=_optional(content, wire.SECAGG, str) or "",
            model_identity=_optional(content, wire.MODEL_IDENTITY, str) or "",
        )
        reply = site_api(context).train(request)
    except REFUSALS as exc:
        return _refusal(msg, context, exc)
    metrics = MetricRecord(
        {
            wire.LOCAL_LOSS: reply.local_loss,
            wire.EPSILON: reply.epsilon,
            wire.NOISE_MULTIPLIER: reply.noise_multiplier,
            **_check_metrics(reply.incoming),
        }
    )
    site = ConfigRecord(
        {
            wire.SITE_ID: reply.site_id,
            wire.RECEIPT_SIGNATURE: reply.receipt_signature,
            # a round announced ahead: the site's signed statement of the model it trained from
            **({wire.MODEL_STATEMENT: reply.model_statement} if reply.model_statement else {}),
            **({wire.SECAGG: reply.secagg} if reply.secagg else {}),
            **({wire.TRAINED_GROUPS: reply.trained_groups} if reply.trained_groups else {}),
            **({wire.DATASET_SHA256: reply.dataset_sha256} if reply.dataset_sha256 else {}),
        }
    )
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
        wire.METRICS: metrics,
        wire.SITE: site,
    }
    if reply.secagg:  # under secure aggregation the update leaves only masked
        records[wire.ARRAYS] = ArrayRecord({wire.MASKED: Array(reply.arrays[wire.MASKED])})
    else:
        records[wire.ARRAYS] = wire.arrays_to_record(reply.arrays, packed=True)
    return Message(content=RecordDict(records), reply_to=msg)


def _secagg_step(msg: Message, context: Context, step: SecAggStep) -> Message:
    """Forward one secure-aggregation step (keys or reveal: JSON only) to the site."""
    from medfed.client.protocol import SecAggRequest

    content = msg.content
    try:
        request = SecAggRequest(
            step=step,
            run_id=wire.get_value(content, wire.CONFIG, wire.RUN_ID, str),
            round=wire.get_value(content, wire.CONFIG, wire.ROUND, int),
            payload=wire.get_value(content, wire.CONFIG, wire.SECAGG, str),
        )
        reply = site_api(context).secagg(request)
    except REFUSALS as exc:
        return _refusal(msg, context, exc)
    site = ConfigRecord({wire.SITE_ID: reply.site_id, wire.SECAGG: reply.payload})
    return Message(content=RecordDict({wire.SITE: site}), reply_to=msg)


@app.train("secagg_keys")
def secagg_keys(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 1: check the announcement, answer fresh signed keys."""
    return _secagg_step(msg, context, "keys")


@app.train("secagg_reveal")
def secagg_reveal(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 3: answer what unmasks only the sum, and (asked with it)
    the next round's status, as `query` answers it."""
    reply = _secagg_step(msg, context, "reveal")
    asked = msg.content.config_records.get(wire.NEXT_STATUS)
    if asked is None or reply.has_error():
        return reply
    try:
        metrics, status = _status(RecordDict({wire.CONFIG: asked}), context)
    except REFUSALS as exc:  # the coordinator asks again before the round (`query`)
        log.warning("the next round's status, asked with the reveal, is not given: %s", exc)
        return reply
    site = ConfigRecord({**dict(reply.content.config_records[wire.SITE]), **dict(status)})
    return Message(RecordDict({wire.METRICS: metrics, wire.SITE: site}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's held-out patients."""
    from medfed.client.protocol import EvaluateRequest

    content = msg.content
    try:
        request = EvaluateRequest(
            run_id=wire.get_value(content, wire.CONFIG, wire.RUN_ID, str),
            round=wire.get_value(content, wire.CONFIG, wire.ROUND, int),
            arrays=wire.record_to_arrays(content),
            model_sha256=wire.get_value(content, wire.CONFIG, wire.MODEL_SHA256, str),
            preset=_preset(content),
            contract_json=wire.get_value(content, wire.CONFIG, wire.CONTRACT, str),
            contract_sha256=wire.get_value(content, wire.CONFIG, wire.CONTRACT_SHA256, str),
            model_identity=_optional(content, wire.MODEL_IDENTITY, str) or "",
        )
        reply = site_api(context).evaluate(request)
    except REFUSALS as exc:
        return _refusal(msg, context, exc)
    content = RecordDict(
        {
            wire.METRICS: MetricRecord(_check_metrics(reply.result)),
            wire.SITE: ConfigRecord({wire.SITE_ID: reply.site_id}),
        }
    )
    return Message(content=content, reply_to=msg)


def _optional(content: RecordDict, key: str, kind: type[wire.T]) -> wire.T | None:
    if wire.CONFIG not in content.config_records or key not in content.config_records[wire.CONFIG]:
        return None
    return wire.get_value(content, wire.CONFIG, key, kind)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the scheduler how this site stands: window, accelerator, throughput, budget."""
    try:
        metrics, site = _status(msg.content, context)
    except REFUSALS as exc:
        return _refusal(msg, context, exc)
    return Message(RecordDict({wire.METRICS: metrics, wire.SITE: site}), reply_to=msg)


def _status(content: RecordDict, context: Context) -> tuple[MetricRecord, ConfigRecord]:
    """The status (`query`) asked in `content`: its METRICS and SITE records."""
    preset = _optional(content, wire.PRESET, str)
    if preset is not None and preset not in PRESET_NAMES:
        raise wire.WireError(f"config.{wire.PRESET}: unknown preset {preset!r}")
    request = QueryRequest(
        study=_optional(content, wire.STUDY, str),
        study_sha256=_optional(content, wire.STUDY_SHA256, str),
        preset=preset,  # type: ignore[arg-type]
        contract_json=_optional(content, wire.CONTRACT, str),
        contract_sha256=_optional(content, wire.CONTRACT_SHA256, str),
        delta=_optional(content, wire.DELTA, float),
        round_ask=_round_ask(content),
    )
    reply = site_api(context).query(request)
    metrics: dict[str, int | float | list[int] | list[float]] = {
        wire.IN_WINDOW: int(reply.in_window),
        wire.WINDOW_ENDS: reply.window_ends,
        wire.NEXT_WINDOW_START: reply.next_window_start,
        wire.PATIENTS: reply.patients,
    }
    if reply.throughput is not None:
        metrics[wire.THROUGHPUT] = reply.throughput
    if reply.budget_left is not None:
        metrics[wire.BUDGET_LEFT] = reply.budget_left
    site = ConfigRecord(
        {
            wire.SITE_ID: reply.site_id,
            wire.ACCELERATOR: reply.accelerator,
            wire.PREFLIGHT: reply.preflight,
        }
    )
    return MetricRecord(metrics), site


@app.query("ask")
def ask(msg: Message, context: Context) -> Message:
    """Answer one exchange of a query (`medfed ask`) with this site's noised, signed vector."""
    content = msg.content
    try:
        request = AskRequest(
            run_id=wire.get_value(content, wire.CONFIG, wire.RUN_ID, str),
            query_json=wire.get_value(content, wire.CONFIG, wire.ASK_QUERY, str),
            query_sha256=wire.get_value(content, wire.CONFIG, wire.ASK_QUERY_SHA256, str),
            contract_json=wire.get_value(content, wire.CONFIG, wire.CONTRACT, str),
            contract_sha256=wire.get_value(content, wire.CONFIG, wire.CONTRACT_SHA256, str),
            step=wire.get_value(content, wire.CONFIG, wire.ASK_STEP, int),
            betas_json=_optional(content, wire.ASK_BETAS, str) or "{}",
            secagg=_optional(content, wire.SECAGG, str) or "",
        )
        reply = site_api(context).ask(request)
    except REFUSALS as exc:
        return _refusal(msg, context, exc)
    site: dict[str, str] = {wire.SITE_ID: reply.site_id, wire.DATASET_SHA256: reply.dataset_sha256}
    if reply.approval:
        site[wire.ASK_APPROVAL] = reply.approval
    site[wire.RECEIPT_SIGNATURE] = reply.receipt_signature
    if reply.secagg:  # the vector leaves only masked, with its sealed shares
        site[wire.SECAGG] = reply.secagg
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
        wire.METRICS: MetricRecord(
            {
                wire.NOISE_MULTIPLIER: reply.noise_multiplier,
                wire.EPSILON: reply.epsilon,
                wire.ASK_STEP: reply.step,
            }
        ),
        wire.SITE: ConfigRecord(site),  # type: ignore[arg-type]
    }
    name = wire.MASKED if reply.secagg else wire.RELEASED
    records[wire.ARRAYS] = ArrayRecord({name: Array(reply.released)})
    return Message(RecordDict(records), reply_to=msg)


def _round_ask(content: RecordDict) -> PreflightAsk | None:
    """The round a status query describes, if it describes one (a newer coordinator)."""
    if _optional(content, wire.ROUND, int) is None:
        return None
    return PreflightAsk(
        run_id=wire.get_value(content, wire.CONFIG, wire.RUN_ID, str),
        study=wire.get_value(content, wire.CONFIG, wire.STUDY, str),
        study_sha256=wire.get_value(content, wire.CONFIG, wire.STUDY_SHA256, str),
        round=wire.get_value(content, wire.CONFIG, wire.ROUND, int),
        planned_rounds=wire.get_value(content, wire.CONFIG, wire.PLANNED_ROUNDS, int),
        local_steps=wire.get_value(content, wire.CONFIG, wire.LOCAL_STEPS, int),
        target_epsilon=wire.get_value(content, wire.CONFIG, wire.TARGET_EPSILON, float),
        sample_rate=wire.get_value(content, wire.CONFIG, wire.SAMPLE_RATE, float),
        delta=wire.get_value(content, wire.CONFIG, wire.DELTA, float),
        max_grad_norm=wire.get_value(content, wire.CONFIG, wire.MAX_GRAD_NORM, float),
    )
