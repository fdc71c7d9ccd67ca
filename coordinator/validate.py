"""Validation of every site reply before it may touch the global model."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Message, RecordDict

from medfed.coordinator.strategies import parameter_groups
from medfed.model import wire
from medfed.model.network import arrays_sha256
from medfed.privacy import release
from medfed.privacy.receipts import UpdateReceipt
from medfed.privacy.signing import VerifyKey

MAX_EXAMPLES = 10_000_000
"""More patients than any one site of a consortium holds: a larger count is bogus."""

SIZE_SLACK = 1.1
"""A reply's arrays may weigh this much more than the float32 model (npy headers)..."""
SIZE_MARGIN_BYTES = 64 * 1024
"""...plus this, so a tiny model's per-array headers still fit."""


def size_limit_bytes(reference: Mapping[str, np.ndarray]) -> int:
    """The most bytes a reply's arrays may hold: the float32 model, 10% and 64 KiB more.

    Flower itself accepts messages of up to 2 GB; checking the size before the arrays
    are decoded keeps an oversized reply from being copied into numpy at all.
    """
    float32_bytes = sum(int(array.size) * 4 for array in reference.values())
    return int(float32_bytes * SIZE_SLACK) + SIZE_MARGIN_BYTES


def payload_bytes(content: RecordDict) -> int:
    """The bytes of every array in `content`, counted from Flower's `Array` objects
    without decoding them."""
    return sum(
        len(array.data) for record in content.array_records.values() for array in record.values()
    )


@dataclass(frozen=True)
class Sender:
    """What the coordinator learnt of a node from its status this round: the site id it
    gave and the patients it holds (an upper bound on the examples it can train on)."""

    site_id: str
    patients: int


@dataclass(frozen=True)
class ModelCheck:
    """How the model a site received did there: on its training and held-out patients."""

    num_examples: int
    train_loss: float
    eval_examples: int
    eval_auroc: float
    eval_loss: float
    eval_c_index: float = math.nan
    """A survival task's held-out concordance (NaN when the study has none)."""
    eval_stats: tuple[float, ...] = ()
    """The site's noised statistics vector (`privacy.release`), to pool across sites."""


@dataclass(frozen=True)
class SiteUpdate:
    """A validated training reply."""

    node_id: int
    site_id: str
    arrays: dict[str, np.ndarray]
    local_loss: float
    epsilon: float
    noise_multiplier: float
    check: ModelCheck
    trained_groups: frozenset[str] = frozenset()
    """The parameter groups the site trained (every group of the model unless it said)."""
    dataset_sha256: str | None = None
    """The fingerprint of the data it trained on, if the site sent one."""

    @property
    def num_examples(self) -> int:
        """Patients the update was trained on: its weight in FedAvg."""
        return self.check.num_examples


@dataclass(frozen=True)
class SiteEval:
    """A validated evaluation reply."""

    node_id: int
    site_id: str
    check: ModelCheck


@dataclass(frozen=True)
class ReceiptCheck:
    """What the coordinator knows of a round, to check each site's signed update receipt."""

    run_id: str
    study_sha256: str
    round: int
    model_sha256: str
    site_keys: Mapping[str, VerifyKey]

    def problem(self, site_id: str, arrays: Mapping[str, np.ndarray], signature: str) -> str | None:
        """Why the receipt of a plain update does not verify, or None if it does."""
        return self.digest_problem(site_id, arrays_sha256(arrays), signature)

    def digest_problem(self, site_id: str, update_sha256: str, signature: str) -> str | None:
        """Why the receipt of the update with this digest does not verify (a masked
        update's digest under secure aggregation), or None if it does."""
        public = self.site_keys.get(site_id)
        if public is None:
            return f"{site_id} is not a registered site (no signing key for it)"
        receipt = UpdateReceipt(
            run_id=self.run_id,
            study_sha256=self.study_sha256,
            round=self.round,
            model_sha256=self.model_sha256,
            update_sha256=update_sha256,
            site_id=site_id,
        )
        if not receipt.verify(public, signature):
            return (
                "the update's signature does not verify: altered in transit, replayed from"
                " another round or run, or trained on another model"
            )
        return None


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


def _optional_site_value(reply: Message, key: str) -> str | None:
    records = reply.content.config_records
    if wire.SITE not in records or key not in records[wire.SITE]:
        return None
    return wire.get_value(reply.content, wire.SITE, key, str)


def _trained_groups(reply: Message, names: frozenset[str]) -> frozenset[str]:
    """The groups the reply says it trained, each a group of the model; default all."""
    listed = _optional_site_value(reply, wire.TRAINED_GROUPS)
    if listed is None:
        return names
    groups = frozenset(group.strip() for group in listed.split(",") if group.strip())
    unknown = sorted(groups - names)
    if unknown:
        raise wire.WireError(f"{wire.SITE}.{wire.TRAINED_GROUPS}: unknown groups {unknown}")
    if not groups:
        raise wire.WireError(f"{wire.SITE}.{wire.TRAINED_GROUPS}: names no group")
    return groups


def _model_check(reply: Message, max_examples: int = MAX_EXAMPLES) -> ModelCheck:
    def metric(key: str, kind: type[wire.T]) -> wire.T:
        return wire.get_value(reply.content, wire.METRICS, key, kind)

    num_examples = metric(wire.NUM_EXAMPLES, int)
    if not 1 <= num_examples <= MAX_EXAMPLES:
        raise wire.WireError(f"metrics.{wire.NUM_EXAMPLES}: {num_examples} is out of range")
    if num_examples > max_examples:
        raise wire.WireError(
            f"metrics.{wire.NUM_EXAMPLES}: {num_examples} is more than the {max_examples}"
            " patients the site reported holding"
        )
    eval_examples = metric(wire.EVAL_EXAMPLES, int)
    if not 0 <= eval_examples <= MAX_EXAMPLES:
        raise wire.WireError(f"metrics.{wire.EVAL_EXAMPLES}: {eval_examples} is out of range")
    train_loss = metric(wire.MODEL_TRAIN_LOSS, float)
    # NaN: not released (a loss with no bounded per-patient part, or too few patients).
    if not (math.isnan(train_loss) or 0 <= train_loss < math.inf):
        raise wire.WireError(
            f"metrics.{wire.MODEL_TRAIN_LOSS}: {train_loss} is negative or infinite"
        )
    auroc = metric(wire.EVAL_AUROC, float)
    if not (math.isnan(auroc) or 0.0 <= auroc <= 1.0):
        raise wire.WireError(f"metrics.{wire.EVAL_AUROC}: {auroc} is not in [0, 1]")
    c_index = math.nan
    if wire.EVAL_C_INDEX in reply.content.metric_records.get(wire.METRICS, {}):
        c_index = metric(wire.EVAL_C_INDEX, float)
        if not (math.isnan(c_index) or 0.0 <= c_index <= 1.0):
            raise wire.WireError(f"metrics.{wire.EVAL_C_INDEX}: {c_index} is not in [0, 1]")
    return ModelCheck(
        num_examples,
        train_loss,
        eval_examples,
        auroc,
        metric(wire.EVAL_LOSS, float),
        c_index,
        _eval_stats(reply),
    )


def _eval_stats(reply: Message) -> tuple[float, ...]:
    """The optional noised statistics vector: `release.WIDTH` finite floats, or none."""
    metrics = reply.content.metric_records.get(wire.METRICS)
    if metrics is None or wire.EVAL_STATS not in metrics:
        return ()
    value = metrics[wire.EVAL_STATS]
    if (
        not isinstance(value, list)
        or len(value) != release.WIDTH
        or not all(isinstance(v, float) and math.isfinite(v) for v in value)
    ):
        raise wire.WireError(f"metrics.{wire.EVAL_STATS}: not {release.WIDTH} finite numbers")
    return tuple(float(v) for v in value)


def _error_reason(reply: Message) -> str:
    return f"site replied with an error: {reply.error.reason}"


def _check_size(content: RecordDict, max_bytes: int | None) -> None:
    if max_bytes is None:
        return
    size = payload_bytes(content)
    if size > max_bytes:
        raise wire.WireError(
            f"oversized update: its arrays hold {size} bytes, the limit is {max_bytes}"
        )


def validate_train_reply(
    reply: Message,
    reference: Mapping[str, np.ndarray],
    *,
    receipts: ReceiptCheck | None = None,
    max_bytes: int | None = None,
    sender: Sender | None = None,
    secure: bool = False,
) -> SiteUpdate | Rejection:
    """A `SiteUpdate` if the reply is well-formed, else a `Rejection` with the reason.

    With `secure` (secure aggregation's train step) the reply's one array is the masked
    update, which `coordinator.secure_rounds` checks with its receipt; no update arrays.

    Given `receipts`, the update must be signed by its site for this run, round and
    model; given `max_bytes`, its arrays must not weigh more (checked before they are
    decoded); given `sender`, the reply must name the site its node answered the
    status query as, with no more examples than the patients it reported.
    """
    node_id = reply.metadata.src_node_id
    site_id = _site_id(reply)
    if reply.has_error():
        return Rejection(node_id, site_id, _error_reason(reply))
    if sender is not None and site_id is not None and site_id != sender.site_id:
        # Listed under the name its node gave, not the one it claims.
        return Rejection(
            node_id,
            sender.site_id,
            f"the reply names site {site_id!r}, but node {node_id} answered this round's"
            f" status as {sender.site_id!r}",
        )
    try:
        if site_id is None:
            raise wire.WireError(f"reply has no {wire.SITE}.{wire.SITE_ID}")
        _check_size(reply.content, max_bytes)
        if secure:
            record = reply.content.array_records.get(wire.ARRAYS)
            if set(reply.content.array_records) - {wire.ARRAYS} or (
                record is not None and list(record) != [wire.MASKED]
            ):
                raise wire.WireError("under secure aggregation an update must not come unmasked")
            arrays: dict[str, np.ndarray] = {}
        else:
            arrays = wire.record_to_arrays(reply.content)
            check_arrays(arrays, reference)
        if receipts is not None and not secure:
            signature = wire.get_value(reply.content, wire.SITE, wire.RECEIPT_SIGNATURE, str)
            problem = receipts.problem(site_id, arrays, signature)
            if problem is not None:
                raise wire.WireError(problem)
        epsilon = wire.get_value(reply.content, wire.METRICS, wire.EPSILON, float)
        if epsilon < 0:
            raise wire.WireError(f"metrics.{wire.EPSILON}: {epsilon} is negative")
        noise = wire.get_value(reply.content, wire.METRICS, wire.NOISE_MULTIPLIER, float)
        if noise <= 0:
            raise wire.WireError(f"metrics.{wire.NOISE_MULTIPLIER}: {noise} is not positive")
        local_loss = wire.get_value(reply.content, wire.METRICS, wire.LOCAL_LOSS, float)
        check = _model_check(
            reply, MAX_EXAMPLES if sender is None or sender.patients <= 0 else sender.patients
        )
        groups = _trained_groups(reply, parameter_groups(reference))
        dataset = _optional_site_value(reply, wire.DATASET_SHA256)
    except wire.WireError as exc:
        return Rejection(node_id, site_id, str(exc))
    return SiteUpdate(node_id, site_id, arrays, local_loss, epsilon, noise, check, groups, dataset)


def validate_eval_reply(reply: Message) -> SiteEval | Rejection:
    """A `SiteEval` if the reply is well-formed, else a `Rejection` with the reason."""
    node_id = reply.metadata.src_node_id
    site_id = _site_id(reply)
    if reply.has_error():
        return Rejection(node_id, site_id, _error_reason(reply))
    try:
        if site_id is None:
            raise wire.WireError(f"reply has no {wire.SITE}.{wire.SITE_ID}")
        check = _model_check(reply)
    except wire.WireError as exc:
        return Rejection(node_id, site_id, str(exc))
    return SiteEval(node_id, site_id, check)
