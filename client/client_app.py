"""The Flower ClientApp: decodes the coordinator's messages, calls the trainer, encodes replies.

It imports no torch at module level (the trainer is imported per message), so a
message that is refused early costs little. A malformed or refused instruction gets
an error reply that names the reason; the coordinator lists it and goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.config import SITE_TOML, load_site_config
from client.errors import BudgetRefusal, ClientError, RequestError
from model import wire
from model.presets import PRESET_NAMES, PresetName
from privacy.errors import PrivacyError
from sites.errors import SiteError
from sites.synthetic import site_id

if TYPE_CHECKING:
    from client.protocol import ModelCheck
    from client.trainer import SiteTrainer

log = logging.getLogger(__name__)

app = ClientApp()

ERROR_CODE_REFUSED = 4001
"""The error code of a reply in which the site refuses the instruction (reason attached)."""
ERROR_CODE_OUT_OF_BUDGET = 4002
"""The error code of a refusal because the round would exceed the approval or the cap."""

REFUSALS = (wire.WireError, ClientError, SiteError, PrivacyError)
"""Errors that become a refusal reply: a bad instruction, or the site's data or privacy rules."""


def site_config_path(context: Context) -> Path:
    """This site's `site.toml`: from the SuperNode's node config, or in a simulation from
    the run config's `sites-root` and the virtual node's partition id."""
    node = context.node_config
    if "site-config" in node:
        return Path(str(node["site-config"]))
    root = str(context.run_config.get("sites-root", ""))
    if root and "partition-id" in node:
        return Path(root) / site_id(int(node["partition-id"])) / SITE_TOML
    raise RequestError(
        "this SuperNode does not say which site it is: start it with"
        " --node-config 'site-config=\"/path/to/site.toml\"'"
    )


def _trainer(context: Context) -> SiteTrainer:
    from client.trainer import SiteTrainer
    from model.contract import DEMO_CONTRACT

    return SiteTrainer(load_site_config(site_config_path(context)), DEMO_CONTRACT)


def _refusal(msg: Message, context: Context, error: Exception) -> Message:
    try:
        site = load_site_config(site_config_path(context)).site.id
    except ClientError:
        site = "unidentified site"
    code = ERROR_CODE_OUT_OF_BUDGET if isinstance(error, BudgetRefusal) else ERROR_CODE_REFUSED
    log.warning("%s refuses %s message: %s", site, msg.metadata.message_type, error)
    return Message(Error(code=code, reason=f"{site}: {error}"), reply_to=msg)


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
    }


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model at this site under DP-SGD."""
    from client.protocol import TrainRequest

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
            n_features=wire.get_value(content, wire.CONFIG, wire.N_FEATURES, int),
            local_steps=wire.get_value(content, wire.CONFIG, wire.LOCAL_STEPS, int),
            learning_rate=wire.get_value(content, wire.CONFIG, wire.LEARNING_RATE, float),
            target_epsilon=wire.get_value(content, wire.CONFIG, wire.TARGET_EPSILON, float),
            max_grad_norm=wire.get_value(content, wire.CONFIG, wire.MAX_GRAD_NORM, float),
            sample_rate=wire.get_value(content, wire.CONFIG, wire.SAMPLE_RATE, float),
            delta=wire.get_value(content, wire.CONFIG, wire.DELTA, float),
        )
        reply = _trainer(context).train(request)
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
    content = RecordDict(
        {
            wire.ARRAYS: wire.arrays_to_record(reply.arrays),
            wire.METRICS: metrics,
            wire.SITE: ConfigRecord(
                {wire.SITE_ID: reply.site_id, wire.RECEIPT_SIGNATURE: reply.receipt_signature}
            ),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's held-out patients."""
    from client.protocol import EvaluateRequest

    content = msg.content
    try:
        request = EvaluateRequest(
            run_id=wire.get_value(content, wire.CONFIG, wire.RUN_ID, str),
            round=wire.get_value(content, wire.CONFIG, wire.ROUND, int),
            arrays=wire.record_to_arrays(content),
            model_sha256=wire.get_value(content, wire.CONFIG, wire.MODEL_SHA256, str),
            preset=_preset(content),
            n_features=wire.get_value(content, wire.CONFIG, wire.N_FEATURES, int),
        )
        reply = _trainer(context).evaluate(request)
    except REFUSALS as exc:
        return _refusal(msg, context, exc)
    content = RecordDict(
        {
            wire.METRICS: MetricRecord(_check_metrics(reply.result)),
            wire.SITE: ConfigRecord({wire.SITE_ID: reply.site_id}),
        }
    )
    return Message(content=content, reply_to=msg)
