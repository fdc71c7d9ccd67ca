"""The egress guard: what may leave the site in a reply, decided by the site's code.

It is a middleware around the ClientApp (Flower's mods are the model: one callable
type, `ReplyMod`, chained by `chain`). The site's own warm executor wraps whatever
ClientApp the coordinator shipped with it, so a ClientApp that tries to send more
than the contract allows is stopped even if it leaves the guard out of its own mods.

What passes, and nothing else:

- a train reply's `arrays` record, only if it holds exactly the instruction's array
  names with the same shapes, as finite float32 (the study's model; nothing more), and
  the site's signed receipt covers exactly these arrays for this run, study, round and
  model: only the site worker, which trained them, holds the key to sign one, so arrays
  that code in this process (the app) filled in itself do not leave. A masked update
  (secure aggregation) leaves only with the receipt for the study and model its mask
  step names (those of the round's signed announcement);
- the `metrics` record's whitelisted keys for that message type (`model.wire`), as
  single numbers (and the noised statistics vector `eval-stats`, a short list of
  finite floats); aggregates over training patients only when the reply's patient
  count is at least the policy's `min_cohort_k`, held-out aggregates only when the
  held-out count is. The site's code computes every such figure from a DP release
  charged to its ledger (`privacy.release`); k is a second, coarser line, not the
  privacy mechanism;
- the `site` record's site id (this site's), receipt signature (hex), accelerator and a
  status reply's pre-flight category (one of `PREFLIGHT_CODES`, or empty);
- a query's answer (`query.ask`): one finite float64 vector named `released`, of the
  length the query's layout gives that step, only if the site's receipt signature covers
  exactly it for this run, query, step and site (`client.protocol.ask_receipt_payload`),
  with its noise multiplier, epsilon and step;
- an error reply's code, and its reason cut to `MAX_REASON_CHARS`.

Everything else is dropped and the drop is written to the site's audit log. A train
reply whose arrays do not match is blocked whole: it becomes an error reply.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from functools import reduce

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from medfed.client.errors import public_reason
from medfed.client.protocol import PREFLIGHT_CODES, EgressRules
from medfed.model import wire
from medfed.model.device_kinds import DEVICE_KINDS
from medfed.privacy.errors import PrivacyError
from medfed.privacy.receipts import UpdateReceipt, ask_receipt_payload
from medfed.privacy.secagg_protocol import masked_sha256
from medfed.privacy.signing import VerifyKey

log = logging.getLogger(__name__)

ConfigValue = (
    int
    | float
    | str
    | bytes
    | bool
    | list[int]
    | list[float]
    | list[str]
    | list[bytes]
    | list[bool]
)
Handler = Callable[[Message, Context], Message]
"""A ClientApp, or a ClientApp already wrapped in mods."""
ReplyMod = Callable[[Message, Context, Handler], Message]
"""A middleware: gets the instruction and the next handler, returns the reply (Flower's `Mod`)."""

ERROR_CODE_BLOCKED = 4010
"""The code of the error reply that replaces a reply the guard blocked whole."""
MAX_REASON_CHARS = 400
_HEX_SIGNATURE = re.compile(r"[0-9a-f]{128}")
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-f]*")
_APPROVAL = re.compile(r"[0-9a-f]{16}\|[0-9.e+-]{1,24}\|[0-9T:+.\-]{10,40}")
"""A query's approval as the site reports it: officer key id, epsilon, approval time."""
_GROUPS = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)?(,[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)?)*")
"""`trained-groups`: comma-separated parameter group names (`encoders.clinical,fusion`)."""

TRAIN_POPULATION_METRICS = frozenset({wire.LOCAL_LOSS, wire.MODEL_TRAIN_LOSS})
"""Aggregates over the training patients: sent only for at least k of them."""
HELD_OUT_METRICS = frozenset(
    {
        wire.EVAL_LOSS,
        wire.EVAL_AUROC,
        wire.EVAL_ACCURACY,
        wire.EVAL_C_INDEX,
        wire.EVAL_RMSE,
    }
)
"""Aggregates over the held-out patients: sent only for at least k of them."""
ALLOWED_METRICS: dict[str, frozenset[str]] = {
    MessageType.TRAIN: frozenset(
        {
            wire.NUM_EXAMPLES,
            wire.EPSILON,
            wire.NOISE_MULTIPLIER,
            wire.EVAL_EXAMPLES,
            wire.EVAL_STATS,
        }
        | TRAIN_POPULATION_METRICS
        | HELD_OUT_METRICS
    ),
    MessageType.EVALUATE: frozenset({wire.NUM_EXAMPLES, wire.EVAL_EXAMPLES, wire.EVAL_STATS})
    | TRAIN_POPULATION_METRICS
    | HELD_OUT_METRICS,
    wire.ASK: frozenset({wire.NOISE_MULTIPLIER, wire.EPSILON, wire.ASK_STEP}),
    MessageType.QUERY: frozenset(
        {
            wire.IN_WINDOW,
            wire.WINDOW_ENDS,
            wire.NEXT_WINDOW_START,
            wire.THROUGHPUT,
            wire.BUDGET_LEFT,
            wire.PATIENTS,
        }
    ),
}


AuditSink = Callable[[str, dict[str, object]], None]
"""Where the guard reports what it dropped (the site's audit log)."""


def chain(handler: Handler, mods: Sequence[ReplyMod]) -> Handler:
    """`handler` wrapped in `mods`; the first mod is the outermost (sees the final reply)."""

    def wrap(inner: Handler, mod: ReplyMod) -> Handler:
        return lambda message, context: mod(message, context, inner)

    return reduce(wrap, reversed(mods), handler)


def _category(message: Message) -> str:
    return message.metadata.message_type.split(".", 1)[0]


def _arrays_problem(instruction: Message, arrays: dict[str, np.ndarray]) -> str | None:
    """Why the reply's arrays are not the instruction's model; None if they are."""
    try:
        expected = wire.record_to_arrays(instruction.content)
    except wire.WireError:
        return "the instruction carried no model to compare the update with"
    names = list(arrays)
    if sorted(names) != sorted(expected):
        extra = sorted(set(names) - set(expected))[:5]
        missing = sorted(set(expected) - set(names))[:5]
        return f"array names differ from the model's (extra {extra}, missing {missing})"
    for name, values in arrays.items():
        if values.dtype != np.float32 or values.shape != expected[name].shape:
            return (
                f"array {name!r} is {values.dtype} {values.shape}, the model's is float32"
                f" {expected[name].shape}"
            )
        if not np.isfinite(values).all():
            return f"array {name!r} is not finite float32"
    return None


def _action(message: Message) -> str:
    parts = message.metadata.message_type.split(".", 1)
    return parts[1] if len(parts) == 2 else ""


def _secagg_instruction(instruction: Message) -> bool:
    """A train instruction under secure aggregation: its update may leave only masked."""
    config = instruction.content.config_records.get(wire.CONFIG)
    return config is not None and wire.SECAGG in config


def _masked_problem(record: ArrayRecord) -> str | None:
    """Why a secure reply's arrays are not one masked vector; None if they are."""
    if list(record) != [wire.MASKED]:
        return f"a masked update is one array named {wire.MASKED!r}"
    array = record[wire.MASKED].numpy()
    if array.dtype != np.uint32 or array.ndim != 1:
        return f"the masked update is {array.dtype} {array.shape}, not 1-D uint32"
    return None


def _secagg_payload_ok(action: str, value: object, site_id: str) -> bool:
    """The JSON of a secure-aggregation reply holds only keys, ciphertexts and shares of
    this site's own round: the structure is checked here, the crypto by the protocol."""
    if not isinstance(value, str) or len(value) > wire.MAX_SECAGG_CHARS:
        return False
    try:
        payload = json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        return False
    if action == "":  # the train step: sealed shares this site dealt
        return isinstance(payload, list) and all(
            isinstance(item, dict)
            and set(item) == {"owner", "holder", "nonce", "ciphertext"}
            and item["owner"] == site_id
            and all(isinstance(v, str) and len(v) <= 4096 for v in item.values())
            and all(_HEX.fullmatch(item[k]) for k in ("nonce", "ciphertext"))
            for item in payload
        )
    if action == "secagg_keys":
        return isinstance(payload, dict) and payload.get("site_id") == site_id
    if action == "secagg_reveal":  # with the next round's keys when they are dealt ahead
        if not isinstance(payload, dict):
            return False
        advert = payload.get("advertisement", {"site_id": site_id})
        return (
            payload.get("holder") == site_id
            and {"holder", "seeds", "pairwise"} <= set(payload)
            and set(payload) <= {"holder", "seeds", "pairwise", "advertisement"}
            and isinstance(advert, dict)
            and advert.get("site_id") == site_id
        )
    return False


def _count(metrics: MetricRecord, key: str) -> int:
    value = metrics.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _stats_ok(value: object) -> bool:
    """A released statistics vector: a short list of finite floats."""
    return (
        isinstance(value, list)
        and 0 < len(value) <= wire.MAX_EVAL_STATS
        and all(isinstance(v, float) and math.isfinite(v) for v in value)
    )


def _filter_metrics(
    category: str, metrics: MetricRecord, rules: EgressRules, dropped: list[str]
) -> MetricRecord:
    allowed = ALLOWED_METRICS.get(category, frozenset())
    training = _count(metrics, wire.NUM_EXAMPLES)
    held_out = _count(metrics, wire.EVAL_EXAMPLES)
    kept: dict[str, int | float | list[int] | list[float]] = {}
    for key, value in metrics.items():
        scalar = isinstance(value, int | float) and not isinstance(value, bool)
        if key == wire.EVAL_STATS and key in allowed and _stats_ok(value):
            kept[key] = value  # the noised release itself (`privacy.release`)
        elif key not in allowed or not scalar:
            dropped.append(f"metrics.{key}")
        elif key in TRAIN_POPULATION_METRICS and training < rules.min_cohort_k:
            dropped.append(f"metrics.{key} (over {training} < k patients)")
        elif (
            key in HELD_OUT_METRICS
            and held_out < rules.min_cohort_k
            and not (isinstance(value, float) and math.isnan(value))  # withheld: says nothing
        ):
            dropped.append(f"metrics.{key} (over {held_out} < k patients)")
        else:
            kept[key] = value
    return MetricRecord(kept)


def _filter_site(
    record: ConfigRecord, rules: EgressRules, dropped: list[str], action: str = ""
) -> ConfigRecord:
    kept: dict[str, ConfigValue] = {}
    for key, value in record.items():
        ok = (
            (key == wire.SITE_ID and value == rules.site_id)
            or (key in (wire.RECEIPT_SIGNATURE, wire.MODEL_STATEMENT) and isinstance(value, str)
                and _HEX_SIGNATURE.fullmatch(value) is not None)
            or (key == wire.ACCELERATOR and value in DEVICE_KINDS)
            # A site-secret HMAC of the data version, never the data's own fingerprint.
            or (key == wire.DATASET_SHA256 and isinstance(value, str)
                and _HEX_SHA256.fullmatch(value) is not None)
            or (key == wire.TRAINED_GROUPS and isinstance(value, str)
                and len(value) <= MAX_REASON_CHARS and _GROUPS.fullmatch(value) is not None)
            or (key == wire.SECAGG and _secagg_payload_ok(action, value, rules.site_id))
            # A status reply's pre-flight: "" (it would train) or one category, no text.
            or (key == wire.PREFLIGHT and (value == "" or value in PREFLIGHT_CODES))
            # The officer's approval a query ran under: policy, not patient data.
            or (key == wire.ASK_APPROVAL and isinstance(value, str)
                and _APPROVAL.fullmatch(value) is not None)
        )  # fmt: skip
        if ok:
            kept[key] = str(value)
        else:
            dropped.append(f"site.{key}")
    return ConfigRecord(kept)


def filter_reply(
    instruction: Message, reply: Message, rules: EgressRules
) -> tuple[Message, list[str]]:
    """The reply as it may leave the site, and what was dropped from it (empty if nothing)."""
    dropped: list[str] = []
    if reply.has_error():
        reason = reply.error.reason or ""
        if len(reason) > MAX_REASON_CHARS:
            dropped.append(f"error reason beyond {MAX_REASON_CHARS} characters")
        error = Error(code=reply.error.code, reason=reason[:MAX_REASON_CHARS])
        return Message(error, reply_to=instruction), dropped
    category, action = _category(instruction), _action(instruction)
    secure = category == MessageType.TRAIN and (action != "" or _secagg_instruction(instruction))
    content = reply.content
    asked = instruction.metadata.message_type == wire.ASK
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {}
    for name in content:
        if name == wire.ARRAYS and asked and _secagg_instruction(instruction):
            record = content.array_records.get(name)
            if record is None:
                return _blocked(instruction, "answer blocked: no masked vector"), ["arrays"]
            problem = _masked_problem(record) or _receipt_problem(
                _round_facts(instruction), masked_sha256(record[wire.MASKED].numpy()),
                _receipt_signature(content), rules,
            )  # fmt: skip
            if problem is not None:
                return _blocked(instruction, f"answer blocked: {problem}"), [f"arrays: {problem}"]
            records[name] = record
        elif name == wire.ARRAYS and asked and name in content.array_records:
            problem = _answer_problem(instruction, content.array_records[name], content, rules)
            if problem is not None:
                return _blocked(instruction, f"answer blocked: {problem}"), [f"arrays: {problem}"]
            records[name] = content.array_records[name]
        elif (
            name == wire.ARRAYS and category == MessageType.TRAIN and name in content.array_records
        ):
            record = content.array_records[name]
            signature = _receipt_signature(content)
            if secure:
                problem = (
                    _masked_problem(record) or _receipt_problem(
                        _round_facts(instruction),
                        masked_sha256(record[wire.MASKED].numpy()), signature, rules,
                    )
                    if action == ""
                    else "under secure aggregation an update leaves only masked"
                )  # fmt: skip
            else:
                problem = _plain_update_problem(instruction, record, signature, rules)
            if problem is not None:
                return _blocked(instruction, f"update blocked: {problem}"), [f"arrays: {problem}"]
            records[name] = record
        elif name == wire.METRICS and name in content.metric_records:
            allowed_category = category if action == "" else "secagg"  # steps carry no metrics
            if action == "secagg_reveal" and wire.NEXT_STATUS in instruction.content:
                allowed_category = MessageType.QUERY  # the next round's status, asked with it
            allowed_category = wire.ASK if asked else allowed_category
            records[name] = _filter_metrics(
                allowed_category, content.metric_records[name], rules, dropped
            )
        elif name == wire.SITE and name in content.config_records:
            # a secure query's first reply carries sealed shares, as a secure train reply
            step = ("" if _secagg_instruction(instruction) else "plain-answer") if asked else action
            records[name] = _filter_site(content.config_records[name], rules, dropped, step)
        else:
            dropped.append(f"record {name!r}")
    if asked and _secagg_instruction(instruction):
        site = records.get(wire.SITE)
        if wire.ARRAYS not in records:
            return _blocked(instruction, "a secure answer without its masked vector"), dropped
        if not (isinstance(site, ConfigRecord) and wire.SECAGG in site):
            return _blocked(instruction, "a secure answer without its sealed shares"), dropped
    elif asked and wire.ARRAYS not in records:
        return _blocked(instruction, "an answer without its released vector"), dropped
    if category == MessageType.TRAIN:
        site = records.get(wire.SITE)
        if secure and not (isinstance(site, ConfigRecord) and wire.SECAGG in site):
            return _blocked(instruction, "a secure-aggregation reply without its payload"), dropped
        if secure and action == "" and wire.ARRAYS not in records:
            return _blocked(instruction, "a secure train reply without the masked update"), dropped
        if not secure and wire.ARRAYS not in records:
            return _blocked(instruction, "a train reply without the model update"), dropped
        if action == "" and _count(
            content.metric_records.get(wire.METRICS, MetricRecord()), wire.NUM_EXAMPLES
        ) < (rules.min_cohort_k):
            return _blocked(instruction, "an update over fewer than k patients"), dropped
    return Message(RecordDict(records), reply_to=instruction), dropped


def _plain_update_problem(
    instruction: Message, record: ArrayRecord, signature: str, rules: EgressRules
) -> str | None:
    """Why a plain update may not leave (not the instruction's model, or not the site's
    signed update); its arrays are read once, packed or not."""
    try:
        arrays = wire.record_arrays(record)
    except wire.WireError as exc:
        return f"the update's arrays cannot be read: {exc}"
    return _arrays_problem(instruction, arrays) or _receipt_problem(
        _round_facts(instruction), wire.arrays_sha256(arrays), signature, rules
    )


def _answer_problem(
    instruction: Message, record: ArrayRecord, content: RecordDict, rules: EgressRules
) -> str | None:
    """Why a query's answer may not leave (not one finite float64 vector, or not the one
    the site's worker signed for this run, query and step), or None."""
    from medfed.analysis.layout import step_width
    from medfed.analysis.query import QueryError, query_from

    if list(record) != [wire.RELEASED]:
        return f"an answer is one array named {wire.RELEASED!r}"
    values = record[wire.RELEASED].numpy()
    if values.dtype != np.float64 or values.ndim != 1 or not np.isfinite(values).all():
        return f"the answer is {values.dtype} {values.shape}, not a finite 1-D float64 vector"
    config = instruction.content.config_records.get(wire.CONFIG)
    facts = None if config is None else (
        config.get(wire.RUN_ID), config.get(wire.ASK_QUERY), config.get(wire.ASK_STEP)
    )  # fmt: skip
    if facts is None or not isinstance(facts[0], str) or not isinstance(facts[1], str):
        return "the instruction does not name its run and query"
    step = facts[2]
    if not isinstance(step, int) or isinstance(step, bool):
        return "the instruction does not name its step"
    try:
        query = query_from(facts[1], where="the instruction")
    except QueryError:
        return "the instruction's query does not parse"
    if values.shape[0] != step_width(query, step):
        expected = step_width(query, step)
        return f"the answer has {values.shape[0]} values, the query's step has {expected}"
    try:
        public = VerifyKey.from_raw(bytes.fromhex(rules.site_key))
        signature = bytes.fromhex(_receipt_signature(content))
    except (ValueError, PrivacyError):
        return "the answer carries no readable signature, or the site's key is unknown"
    payload = ask_receipt_payload(run_id=facts[0], query_sha256=query.sha256(), step=step,
                                  site_id=rules.site_id, released=values)  # fmt: skip
    if not public.verify(payload, signature):
        return "the answer is not one the site's worker computed and signed for this step"
    return None


def _receipt_signature(content: RecordDict) -> str:
    site = content.config_records.get(wire.SITE)
    value = None if site is None else site.get(wire.RECEIPT_SIGNATURE)
    return value if isinstance(value, str) else ""


def _round_facts(instruction: Message) -> tuple[str, str, int, str] | None:
    """(run id, study SHA-256, round, model SHA-256) that a train instruction, or a
    secure query, names (the announced study and model), or None."""
    config = instruction.content.config_records.get(wire.CONFIG)
    if config is None:
        return None
    run_id, study, round_, model = (
        config.get(key) for key in (wire.RUN_ID, wire.STUDY_SHA256, wire.ROUND, wire.MODEL_SHA256)
    )
    if not (isinstance(run_id, str) and isinstance(study, str) and isinstance(model, str)):
        return None
    if not isinstance(round_, int) or isinstance(round_, bool):
        return None
    return run_id, study, round_, model


def _receipt_problem(
    facts: tuple[str, str, int, str] | None, update_sha256: str, signature: str, rules: EgressRules
) -> str | None:
    """Why the update with this digest is not one the site's worker signed for this round
    (its receipt, `privacy.receipts`), or None: code in this process (the app) holds no
    key to sign one, so arrays it made up do not leave."""
    if facts is None:
        return "the instruction does not name its run, study, round and model"
    try:
        public = VerifyKey.from_raw(bytes.fromhex(rules.site_key))
    except (ValueError, PrivacyError):
        return "the site's public key is unknown to the guard"
    run_id, study, round_, model = facts
    receipt = UpdateReceipt(run_id, study, round_, model, update_sha256, rules.site_id)
    if not receipt.verify(public, signature):
        return "the update is not one the site's worker trained and signed for this round"
    return None


def _blocked(instruction: Message, reason: str) -> Message:
    return Message(
        Error(code=ERROR_CODE_BLOCKED, reason=f"egress guard: {reason}"[:MAX_REASON_CHARS]),
        reply_to=instruction,
    )


def egress_guard(
    rules_of: Callable[[Context], EgressRules], audit_of: Callable[[Context], AuditSink]
) -> ReplyMod:
    """The guard as a `ReplyMod`: `rules_of` and `audit_of` find the site from the context
    (its node config), so one guard serves whichever site runs it."""

    def guard(message: Message, context: Context, call_next: Handler) -> Message:
        reply = call_next(message, context)
        try:
            rules = (
                EgressRules(site_id="", min_cohort_k=1, site_key="")
                if reply.has_error()
                else rules_of(context)
            )
        except Exception as exc:  # fail closed: without the site's rules nothing leaves
            log.error("egress guard cannot read the site's rules: %s", exc)
            return _blocked(message, f"cannot read the site's rules: {public_reason(exc)}")
        guarded, dropped = filter_reply(message, reply, rules)
        if dropped:
            log.warning("egress guard dropped %s", ", ".join(dropped))
            _audit(
                audit_of,
                context,
                "egress blocked",
                {
                    "message_type": message.metadata.message_type,
                    "run_id": message.metadata.run_id,
                    "group_id": message.metadata.group_id,
                    "dropped": list(dropped),
                    "blocked_whole": guarded.has_error() and not reply.has_error(),
                },
            )
        return guarded

    return guard


def _audit(
    audit_of: Callable[[Context], AuditSink],
    context: Context,
    event: str,
    details: dict[str, object],
) -> None:
    """Write the drop to the site's audit log; a log that cannot be written is logged
    loudly, but the (already filtered) reply still goes."""
    try:
        audit_of(context)(event, details)
    except Exception as exc:
        log.error("egress guard could not write the audit log: %s (%s)", exc, details)
