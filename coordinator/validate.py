"""Validation of every site reply before it may touch the global model."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from model import wire

MAX_EXAMPLES = 10_000_000
"""More patients than any one site of a consortium holds: a larger count is bogus."""


@dataclass(frozen=True)
class SiteUpdate:
    """A validated training reply."""

    node_id: int
    site_id: str
    arrays: dict[str, np.ndarray]
    num_examples: int
    train_loss: float
    epsilon: float
    eval_examples: int
    eval_auroc: float
    eval_loss: float


@dataclass(frozen=True)
class SiteEval:
    """A validated evaluation reply."""

    node_id: int
    site_id: str
    eval_examples: int
    eval_auroc: float
    eval_loss: float


@dataclass(frozen=True)
class Rejection:
    """A reply that was not used, and why."""

    node_id: int
    site_id: str | None
    reason: str


def _site_id(reply: Message) -> str | None:
    try:
        return wire.get_value(reply.content, wire.SITE, wire.SITE_ID, str)
    except (wire.WireError, ValueError):
        return None


def check_arrays(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> None:
    """Raise `WireError` unless `arrays` has exactly the reference's names, shapes and dtypes,
    with finite values."""
    missing = sorted(set(reference) - set(arrays))
    extra = sorted(set(arrays) - set(reference))
    if missing or extra:
        raise wire.WireError(f"arrays differ from the model: missing {missing}, unexpected {extra}")
    for name, expected in reference.items():
        array = arrays[name]
        if array.dtype != expected.dtype:
            raise wire.WireError(f"array {name}: dtype {array.dtype}, expected {expected.dtype}")
        if array.shape != expected.shape:
            raise wire.WireError(f"array {name}: shape {array.shape}, expected {expected.shape}")
        if not np.isfinite(array).all():
            raise wire.WireError(f"array {name}: contains NaN or Inf")


def _eval_fields(reply: Message) -> tuple[int, float, float]:
    examples = wire.get_value(reply.content, wire.METRICS, wire.EVAL_EXAMPLES, int)
    if not 0 <= examples <= MAX_EXAMPLES:
        raise wire.WireError(f"metrics.{wire.EVAL_EXAMPLES}: {examples} is out of range")
    auroc = wire.get_value(reply.content, wire.METRICS, wire.EVAL_AUROC, float)
    loss = wire.get_value(reply.content, wire.METRICS, wire.EVAL_LOSS, float)
    if not (math.isnan(auroc) or 0.0 <= auroc <= 1.0):
        raise wire.WireError(f"metrics.{wire.EVAL_AUROC}: {auroc} is not in [0, 1]")
    return examples, auroc, loss


def _error_reason(reply: Message) -> str:
    return f"site replied with an error: {reply.error.reason}"


def validate_train_reply(
    reply: Message, reference: Mapping[str, np.ndarray]
) -> SiteUpdate | Rejection:
    """A `SiteUpdate` if the reply is well-formed, else a `Rejection` with the reason."""
    node_id = reply.metadata.src_node_id
    site_id = _site_id(reply)
    if reply.has_error():
        return Rejection(node_id, site_id, _error_reason(reply))
    try:
        if site_id is None:
            raise wire.WireError(f"reply has no {wire.SITE}.{wire.SITE_ID}")
        arrays = wire.record_to_arrays(reply.content)
        check_arrays(arrays, reference)
        num_examples = wire.get_value(reply.content, wire.METRICS, wire.NUM_EXAMPLES, int)
        if not 1 <= num_examples <= MAX_EXAMPLES:
            raise wire.WireError(f"metrics.{wire.NUM_EXAMPLES}: {num_examples} is out of range")
        epsilon = wire.get_value(reply.content, wire.METRICS, wire.EPSILON, float)
        if epsilon < 0:
            raise wire.WireError(f"metrics.{wire.EPSILON}: {epsilon} is negative")
        train_loss = wire.get_value(reply.content, wire.METRICS, wire.TRAIN_LOSS, float)
        eval_examples, eval_auroc, eval_loss = _eval_fields(reply)
    except wire.WireError as exc:
        return Rejection(node_id, site_id, str(exc))
    return SiteUpdate(
        node_id,
        site_id,
        arrays,
        num_examples,
        train_loss,
        epsilon,
        eval_examples,
        eval_auroc,
        eval_loss,
    )


def validate_eval_reply(reply: Message) -> SiteEval | Rejection:
    """A `SiteEval` if the reply is well-formed, else a `Rejection` with the reason."""
    node_id = reply.metadata.src_node_id
    site_id = _site_id(reply)
    if reply.has_error():
        return Rejection(node_id, site_id, _error_reason(reply))
    try:
        if site_id is None:
            raise wire.WireError(f"reply has no {wire.SITE}.{wire.SITE_ID}")
        examples, auroc, loss = _eval_fields(reply)
    except wire.WireError as exc:
        return Rejection(node_id, site_id, str(exc))
    return SiteEval(node_id, site_id, examples, auroc, loss)
