"""The site API's bytes: one frame per request or reply, a JSON header and `.npy` blobs.

A frame is `MAGIC`, the header's length (4 bytes, big-endian), the header (UTF-8 JSON:
`{"kind": str, "fields": {name: str | int | float | bool | null}, "arrays": [name, ...]}`)
and, per array named in the header, its length (8 bytes, big-endian) and its bytes in
numpy's `.npy` format, loaded with `allow_pickle=False`. Nothing in a frame can run
code when decoded, and every malformed frame raises `CodecError`, never anything else
(a Hypothesis test feeds the decoder arbitrary bytes).

`to_frame`/`from_frame` convert between frames and the typed values of
`client.protocol`, checking every field's presence and type.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar, cast

import numpy as np

from medfed.client.errors import ClientError
from medfed.client.protocol import (
    PREFLIGHT_CODES,
    AskReply,
    AskRequest,
    EgressRules,
    EvaluateReply,
    EvaluateRequest,
    HeldOut,
    ModelCheck,
    PreflightAsk,
    QueryReply,
    QueryRequest,
    SecAggReply,
    SecAggRequest,
    TrainReply,
    TrainRequest,
)
from medfed.model.presets import PRESET_NAMES, PresetName

MAGIC: Final = b"MFW1"
MAX_FRAME_BYTES: Final = 512 * 1024 * 1024
"""The largest frame the worker takes (the gRPC channel is capped to the same)."""
MAX_HEADER_BYTES: Final = 1024 * 1024
MAX_ARRAYS: Final = 4096

Scalar = str | int | float | bool | None
T = TypeVar("T", str, int, float, bool)


class CodecError(ClientError):
    """A frame of the site API is malformed; the message says where."""


@dataclass(frozen=True)
class Frame:
    """One request or reply: its kind, scalar fields and named arrays."""

    kind: str
    fields: dict[str, Scalar] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_frame(frame: Frame) -> bytes:
    """The bytes of `frame` (see the module's docstring for the layout)."""
    header = json.dumps(
        {"kind": frame.kind, "fields": frame.fields, "arrays": list(frame.arrays)},
        separators=(",", ":"),
    ).encode("utf-8")
    parts = [MAGIC, struct.pack(">I", len(header)), header]
    for array in frame.arrays.values():
        blob = _npy(array)
        parts += [struct.pack(">Q", len(blob)), blob]
    return b"".join(parts)


def _load_npy(name: str, blob: bytes) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(blob), allow_pickle=False)
    except Exception as exc:  # numpy raises many kinds on corrupt bytes
        raise CodecError(f"array {name!r} is not a valid .npy blob: {exc}") from exc
    if not isinstance(array, np.ndarray) or array.dtype.hasobject:
        raise CodecError(f"array {name!r} is not a plain numeric array")
    return array


def _header(data: bytes) -> tuple[dict[str, Any], int]:
    if len(data) > MAX_FRAME_BYTES:
        raise CodecError(f"frame of {len(data)} bytes is over the limit of {MAX_FRAME_BYTES}")
    if len(data) < 8 or data[:4] != MAGIC:
        raise CodecError("not a medfed site-API frame (bad magic)")
    (length,) = struct.unpack(">I", data[4:8])
    if length > MAX_HEADER_BYTES or 8 + length > len(data):
        raise CodecError(f"header length {length} does not fit the frame")
    try:
        header = json.loads(data[8 : 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CodecError(f"header is not UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict) or set(header) != {"kind", "fields", "arrays"}:
        raise CodecError("header must be an object with exactly kind, fields and arrays")
    return header, 8 + length


def decode_frame(data: bytes) -> Frame:
    """The frame in `data`; raise `CodecError` for anything malformed."""
    header, offset = _header(data)
    kind, fields, names = header["kind"], header["fields"], header["arrays"]
    if not isinstance(kind, str):
        raise CodecError("header.kind must be a string")
    if not isinstance(fields, dict) or not all(
        isinstance(value, str | int | float | bool) or value is None for value in fields.values()
    ):
        raise CodecError("header.fields must map names to strings, numbers, booleans or null")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise CodecError("header.arrays must be a list of names")
    if len(names) > MAX_ARRAYS or len(set(names)) != len(names):
        raise CodecError("header.arrays has repeated names or too many arrays")
    arrays: dict[str, np.ndarray] = {}
    for name in names:
        if offset + 8 > len(data):
            raise CodecError(f"frame ends before array {name!r}")
        (length,) = struct.unpack(">Q", data[offset : offset + 8])
        offset += 8
        if offset + length > len(data):
            raise CodecError(f"array {name!r} is cut short")
        arrays[name] = _load_npy(name, data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise CodecError(f"{len(data) - offset} stray bytes after the last array")
    return Frame(kind=kind, fields=fields, arrays=arrays)


# --- typed values <-> frames ----------------------------------------------------------


def _take(frame: Frame, name: str, kind: type[T]) -> T:
    if name not in frame.fields:
        raise CodecError(f"{frame.kind}: field {name!r} is missing")
    value = frame.fields[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) is not (kind is bool) or not isinstance(value, kind):
        raise CodecError(f"{frame.kind}.{name}: expected {kind.__name__}, got {value!r}"[:200])
    return value


def _optional(frame: Frame, name: str, kind: type[T]) -> T | None:
    return None if frame.fields.get(name) is None else _take(frame, name, kind)


def _preset(frame: Frame, name: str = "preset") -> PresetName:
    preset = _take(frame, name, str)
    if preset not in PRESET_NAMES:
        raise CodecError(f"{frame.kind}.{name}: unknown preset {preset!r}")
    return cast(PresetName, preset)


def _finite(frame: Frame, name: str) -> float:
    value = _take(frame, name, float)
    if not math.isfinite(value):
        raise CodecError(f"{frame.kind}.{name}: {value} is not finite")
    return value


_REQUEST_FLOATS = ("learning_rate", "target_epsilon", "max_grad_norm", "sample_rate", "delta")


def _check_fields(fields: Mapping[str, Any]) -> dict[str, Scalar]:
    return {name: value for name, value in fields.items() if name != "arrays"}


def to_frame(value: object) -> Frame:
    """The frame of one of `client.protocol`'s values."""
    if isinstance(value, TrainRequest | EvaluateRequest):
        kind = "train" if isinstance(value, TrainRequest) else "evaluate"
        return Frame(kind, _check_fields(value.__dict__), dict(value.arrays))
    if isinstance(value, SecAggRequest):
        return Frame("secagg", dict(value.__dict__))
    if isinstance(value, SecAggReply):
        return Frame("secagg-reply", {"site_id": value.site_id, "payload": value.payload})
    if isinstance(value, QueryRequest):
        fields = {k: v for k, v in value.__dict__.items() if k != "round_ask"}
        if value.round_ask is not None:
            fields.update({f"ask_{k}": v for k, v in value.round_ask.__dict__.items()})
        return Frame("query", fields)
    if isinstance(value, QueryReply):
        return Frame("query-reply", dict(value.__dict__))
    if isinstance(value, EgressRules):
        return Frame("rules-reply", dict(value.__dict__))
    if isinstance(value, AskRequest):
        return Frame("ask", dict(value.__dict__))
    if isinstance(value, AskReply):
        fields = {k: v for k, v in value.__dict__.items() if k != "released"}
        return Frame("ask-reply", fields, {RELEASED: value.released})
    if isinstance(value, TrainReply):
        fields = _check_fields(value.__dict__)
        del fields["incoming"]
        return Frame("train-reply", {**fields, **_check(value.incoming)}, dict(value.arrays))
    if isinstance(value, EvaluateReply):
        return Frame("evaluate-reply", {"site_id": value.site_id, **_check(value.result)})
    raise TypeError(f"no frame for {type(value).__name__}")


def _check(check: ModelCheck) -> dict[str, Scalar]:
    held = check.held_out
    return {
        "train_examples": check.train_examples,
        "train_loss": check.train_loss,
        "eval_examples": held.examples,
        "eval_loss": held.loss,
        "eval_auroc": held.auroc,
        "eval_accuracy": held.accuracy,
        "eval_c_index": held.c_index,
        "eval_rmse": held.rmse,
        "stats": encode_stats(check.stats),
    }


def encode_stats(stats: tuple[float, ...]) -> str:
    """A released statistics vector as text: exact float hex, comma-separated."""
    return ",".join(float(value).hex() for value in stats)


def decode_stats(text: str) -> tuple[float, ...]:
    """The inverse of `encode_stats`; `CodecError` if a value is not a finite float."""
    if not text:
        return ()
    try:
        values = tuple(float.fromhex(part) for part in text.split(","))
    except ValueError as exc:
        raise CodecError(f"stats: not a list of numbers ({exc})") from exc
    if len(values) > 256 or not all(math.isfinite(v) for v in values):
        raise CodecError("stats: more than 256 values, or one not finite")
    return values


def _model_check(frame: Frame) -> ModelCheck:
    return ModelCheck(
        train_examples=_take(frame, "train_examples", int),
        train_loss=_take(frame, "train_loss", float),
        held_out=HeldOut(
            examples=_take(frame, "eval_examples", int),
            loss=_take(frame, "eval_loss", float),
            auroc=_take(frame, "eval_auroc", float),
            accuracy=_take(frame, "eval_accuracy", float),
            c_index=_take(frame, "eval_c_index", float),
            rmse=_take(frame, "eval_rmse", float),
        ),
        stats=decode_stats(_optional(frame, "stats", str) or ""),
    )


def train_request(frame: Frame) -> TrainRequest:
    """The train request in `frame`; `CodecError` naming the field if anything is off."""
    floats = {name: _finite(frame, name) for name in _REQUEST_FLOATS}
    return TrainRequest(
        run_id=_take(frame, "run_id", str),
        study=_take(frame, "study", str),
        study_sha256=_take(frame, "study_sha256", str),
        round=_take(frame, "round", int),
        planned_rounds=_take(frame, "planned_rounds", int),
        arrays=frame.arrays,
        model_sha256=_take(frame, "model_sha256", str),
        preset=_preset(frame),
        contract_json=_take(frame, "contract_json", str),
        contract_sha256=_take(frame, "contract_sha256", str),
        local_steps=_take(frame, "local_steps", int),
        proximal_mu=_finite(frame, "proximal_mu"),
        secagg=_optional(frame, "secagg", str) or "",
        model_identity=_optional(frame, "model_identity", str) or "",
        **floats,
    )


def evaluate_request(frame: Frame) -> EvaluateRequest:
    """The evaluate request in `frame`."""
    return EvaluateRequest(
        run_id=_take(frame, "run_id", str),
        round=_take(frame, "round", int),
        arrays=frame.arrays,
        model_sha256=_take(frame, "model_sha256", str),
        preset=_preset(frame),
        contract_json=_take(frame, "contract_json", str),
        contract_sha256=_take(frame, "contract_sha256", str),
        model_identity=_optional(frame, "model_identity", str) or "",
    )


def query_request(frame: Frame) -> QueryRequest:
    """The query in `frame` (every field may be null)."""
    preset = None if frame.fields.get("preset") is None else _preset(frame)
    return QueryRequest(
        study=_optional(frame, "study", str),
        study_sha256=_optional(frame, "study_sha256", str),
        preset=preset,
        contract_json=_optional(frame, "contract_json", str),
        contract_sha256=_optional(frame, "contract_sha256", str),
        delta=_optional(frame, "delta", float),
        round_ask=_round_ask(frame) if "ask_run_id" in frame.fields else None,
    )


def _round_ask(frame: Frame) -> PreflightAsk:
    return PreflightAsk(
        run_id=_take(frame, "ask_run_id", str),
        study=_take(frame, "ask_study", str),
        study_sha256=_take(frame, "ask_study_sha256", str),
        round=_take(frame, "ask_round", int),
        planned_rounds=_take(frame, "ask_planned_rounds", int),
        local_steps=_take(frame, "ask_local_steps", int),
        target_epsilon=_take(frame, "ask_target_epsilon", float),
        sample_rate=_take(frame, "ask_sample_rate", float),
        delta=_take(frame, "ask_delta", float),
        max_grad_norm=_take(frame, "ask_max_grad_norm", float),
    )


def train_reply(frame: Frame) -> TrainReply:
    """The worker's train reply in `frame`."""
    return TrainReply(
        site_id=_take(frame, "site_id", str),
        arrays=frame.arrays,
        local_loss=_take(frame, "local_loss", float),
        epsilon=_take(frame, "epsilon", float),
        noise_multiplier=_take(frame, "noise_multiplier", float),
        incoming=_model_check(frame),
        receipt_signature=_take(frame, "receipt_signature", str),
        trained_groups=_take(frame, "trained_groups", str),
        dataset_sha256=_take(frame, "dataset_sha256", str),
        secagg=_optional(frame, "secagg", str) or "",
        model_statement=_optional(frame, "model_statement", str) or "",
    )


SECAGG_STEPS: Final = ("keys", "reveal")


def secagg_request(frame: Frame) -> SecAggRequest:
    """A secure-aggregation step in `frame`."""
    step = _take(frame, "step", str)
    if step not in SECAGG_STEPS:
        raise CodecError(f"secagg.step: unknown step {step!r}")
    return SecAggRequest(
        step=cast(Any, step),
        run_id=_take(frame, "run_id", str),
        round=_take(frame, "round", int),
        payload=_take(frame, "payload", str),
    )


def secagg_reply(frame: Frame) -> SecAggReply:
    """The worker's answer to a secure-aggregation step (JSON only: a masked vector
    leaves with the train or query reply)."""
    if frame.arrays:
        raise CodecError("secagg-reply: no array comes with it")
    return SecAggReply(site_id=_take(frame, "site_id", str), payload=_take(frame, "payload", str))


def evaluate_reply(frame: Frame) -> EvaluateReply:
    """The worker's evaluate reply in `frame`."""
    return EvaluateReply(site_id=_take(frame, "site_id", str), result=_model_check(frame))


def query_reply(frame: Frame) -> QueryReply:
    """The worker's query reply in `frame`."""
    return QueryReply(
        site_id=_take(frame, "site_id", str),
        in_window=_take(frame, "in_window", bool),
        window_ends=_take(frame, "window_ends", float),
        next_window_start=_take(frame, "next_window_start", float),
        accelerator=_take(frame, "accelerator", str),
        throughput=_optional(frame, "throughput", float),
        budget_left=_optional(frame, "budget_left", float),
        patients=_take(frame, "patients", int),
        preflight=_preflight_code(_optional(frame, "preflight", str) or ""),
    )


def _preflight_code(code: str) -> str:
    if code and code not in PREFLIGHT_CODES:
        raise CodecError(f"query-reply.preflight: unknown code {code!r}")
    return code


def egress_rules(frame: Frame) -> EgressRules:
    """The worker's egress rules in `frame`."""
    k = _take(frame, "min_cohort_k", int)
    if k < 1:
        raise CodecError(f"{frame.kind}.min_cohort_k: {k} is below 1")
    key = _take(frame, "site_key", str)
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise CodecError(f"{frame.kind}.site_key: not a raw Ed25519 public key in hex")
    return EgressRules(site_id=_take(frame, "site_id", str), min_cohort_k=k, site_key=key)


def audit_frame(event: str, details: Mapping[str, Any]) -> Frame:
    """A request to append `event` with `details` (JSON) to the site's audit log."""
    return Frame("audit", {"event": event, "details": json.dumps(dict(details), default=str)})


def audit_request(frame: Frame) -> tuple[str, dict[str, Any]]:
    """The event and details of an audit request."""
    event = _take(frame, "event", str)
    try:
        details = json.loads(_take(frame, "details", str))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CodecError(f"audit.details is not JSON: {exc}") from exc
    if not isinstance(details, dict) or not event or len(event) > 100:
        raise CodecError("audit: needs an event name of 1-100 characters and a details object")
    return event, details


RELEASED: Final = "released"


def ask_request(frame: Frame) -> AskRequest:
    """One exchange of a query in `frame`."""
    return AskRequest(
        run_id=_take(frame, "run_id", str),
        query_json=_take(frame, "query_json", str),
        query_sha256=_take(frame, "query_sha256", str),
        contract_json=_take(frame, "contract_json", str),
        contract_sha256=_take(frame, "contract_sha256", str),
        step=_take(frame, "step", int),
        betas_json=_take(frame, "betas_json", str),
        secagg=_optional(frame, "secagg", str) or "",
    )


def ask_reply(frame: Frame) -> AskReply:
    """The worker's answer to one exchange of a query."""
    released = frame.arrays.get(RELEASED)
    if set(frame.arrays) != {RELEASED} or released is None:
        raise CodecError("ask-reply: exactly one array, the released vector, comes with it")
    if _optional(frame, "secagg", str):
        if released.dtype != np.uint32 or released.ndim != 1:
            raise CodecError("ask-reply.released: a masked vector is 1-D uint32")
    elif released.dtype != np.float64 or released.ndim != 1 or not np.isfinite(released).all():
        raise CodecError("ask-reply.released: expected a finite 1-D float64 array")
    return AskReply(
        site_id=_take(frame, "site_id", str),
        step=_take(frame, "step", int),
        released=released,
        noise_multiplier=_finite(frame, "noise_multiplier"),
        epsilon=_finite(frame, "epsilon"),
        dataset_sha256=_take(frame, "dataset_sha256", str),
        receipt_signature=_take(frame, "receipt_signature", str),
        secagg=_optional(frame, "secagg", str) or "",
        approval=_optional(frame, "approval", str) or "",
    )
