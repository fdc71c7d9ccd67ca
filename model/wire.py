"""Names of the records and keys in messages between coordinator and sites, defined once.

Both `coordinator` and `client` import this module; neither imports the other.
"""

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Final, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

# Records in a message's RecordDict.
ARRAYS: Final = "arrays"
CONFIG: Final = "config"
METRICS: Final = "metrics"
SITE: Final = "site"

# Keys of the CONFIG record sent with a train or evaluate instruction.
RUN_ID: Final = "run-id"
STUDY: Final = "study"  # the study's name
STUDY_SHA256: Final = "study-sha256"  # the study's digest: what an officer's approval names
ROUND: Final = "round"
PLANNED_ROUNDS: Final = "planned-rounds"
TARGET_EPSILON: Final = "target-epsilon"  # epsilon the study asks of each site, all rounds
MODEL_SHA256: Final = "model-sha256"
LOCAL_STEPS: Final = "local-steps"
LEARNING_RATE: Final = "learning-rate"
NOISE_MULTIPLIER: Final = "noise-multiplier"  # in replies: the noise the site chose
MAX_GRAD_NORM: Final = "max-grad-norm"
SAMPLE_RATE: Final = "sample-rate"
DELTA: Final = "delta"
SEED: Final = "seed"
PRESET: Final = "preset"
CONTRACT: Final = "contract"  # the study's data contract, canonical JSON
CONTRACT_SHA256: Final = "contract-sha256"  # `StudyContract.sha256()`: the site checks it
MODEL_IDENTITY: Final = "model-identity"  # `model.network.model_identity(preset, contract)`
MAX_CONTRACT_BYTES: Final = 1024 * 1024  # a contract's JSON above this is refused unread
PROXIMAL_MU: Final = "proximal-mu"  # FedProx's mu: the site adds (mu/2)||w - w_global||^2

# Secure aggregation (`privacy.secagg_protocol`): the steps' message types, and the JSON
# each carries: in a train instruction's CONFIG, and in a reply's SITE record.
SECAGG: Final = "secagg"
SECAGG_KEYS: Final = "train.secagg_keys"  # CONFIG: run-id, round, secagg (the announcement)
NEXT_STATUS: Final = "next-status"
"""A reveal's second CONFIG record: the status query of the next round (its answer comes
back with the reveal, so a secure round needs no status exchange of its own)."""
SECAGG_REVEAL: Final = "train.secagg_reveal"  # CONFIG: run-id, round, secagg (survivors)
MASKED: Final = "masked"  # the one uint32 array of a secure reply's ARRAYS record
MAX_SECAGG_CHARS: Final = 16 * 1024 * 1024

# Keys of the METRICS record in a reply to a query message (the scheduler's view of a site).
IN_WINDOW: Final = "in-window"  # 1 if the site may train now, else 0
WINDOW_ENDS: Final = "window-ends"  # epoch seconds when the current window closes; 0: no end
NEXT_WINDOW_START: Final = "next-window-start"  # epoch seconds; 0 when in a window now
ACCELERATOR: Final = "accelerator"  # in the SITE record: cpu, cuda or rbln
THROUGHPUT: Final = "throughput"  # measured DP-SGD samples per second on the study's model
BUDGET_LEFT: Final = "budget-left"  # epsilon the approval and cap still allow on the dataset
PATIENTS: Final = "patients"  # training patients (the site's aggregation weight)
# In the SITE record: "" if the site's pre-flight of the round the query described passed,
# else its category (`client.protocol.PREFLIGHT_CODES`); absent from older sites.
PREFLIGHT: Final = "preflight"

# A query (`medfed ask`): its message type, the CONFIG keys of each exchange, and the
# reply's one array (the noised vector, `analysis.layout`); the reply's METRICS carry
# NOISE_MULTIPLIER, EPSILON and ASK_STEP, its SITE record the receipt signature.
ASK: Final = "query.ask"
ASK_QUERY: Final = "ask-query"  # the query's canonical JSON (`analysis.query.AskQuery`)
ASK_QUERY_SHA256: Final = "ask-query-sha256"
ASK_STEP: Final = "ask-step"  # the exchange, from 0
ASK_BETAS: Final = "ask-betas"  # JSON: analysis index -> the Newton analysis's coefficients
RELEASED: Final = "released"
MAX_ASK_VALUES: Final = 1_000_000
ASK_APPROVAL: Final = "ask-approval"  # SITE record: the officer's `key id|epsilon|approved at`

# Keys of the SITE record in a reply.
SITE_ID: Final = "site-id"
RECEIPT_SIGNATURE: Final = "receipt-signature"  # hex Ed25519 signature of the update receipt
MODEL_STATEMENT: Final = "model-statement"  # hex Ed25519: the model a secure site trained from
# Parameter groups the update trained, comma-separated (`encoders.clinical,fusion,heads.x`);
# absent: every group. A site without a modality's data leaves that encoder out, so the
# coordinator does not average its untouched copy into the others' updates.
TRAINED_GROUPS: Final = "trained-groups"
DATASET_SHA256: Final = "dataset-sha256"  # optional: the fingerprint of the data trained on

# Keys of the METRICS record in a reply.
NUM_EXAMPLES: Final = "num-examples"  # training patients; FedAvg's weight
LOCAL_LOSS: Final = "local-loss"  # mean DP-SGD mini-batch loss over the local steps
EPSILON: Final = "epsilon"  # the site's cumulative epsilon on this dataset
# How the model the site received does there (both replies carry these):
MODEL_TRAIN_LOSS: Final = "model-train-loss"  # its loss on the training patients
EVAL_EXAMPLES: Final = "eval-examples"
EVAL_LOSS: Final = "eval-loss"
EVAL_AUROC: Final = "eval-auroc"
EVAL_ACCURACY: Final = "eval-accuracy"
EVAL_C_INDEX: Final = "eval-c-index"  # a survival task's held-out concordance
EVAL_RMSE: Final = "eval-rmse"  # a regression task's held-out root mean squared error
# The site's one noised release these figures derive from (`privacy.release.LAYOUT`): the
# coordinator sums the sites' vectors into pooled held-out figures.
EVAL_STATS: Final = "eval-stats"
MAX_EVAL_STATS: Final = 64


# --- Codec between named numpy arrays / typed values and Flower records -------------
# Every value that crosses a process boundary is checked here, with the key named.

T = TypeVar("T", int, float, str)


class WireError(ValueError):
    """A message's content is malformed: a record or key missing, or a value of the wrong type."""


PACKED_KEY: Final = "#packed"
"""The one key of a packed ArrayRecord ('#' is in no parameter name of the network)."""

PACKED_STYPE: Final = "medfed.packed-f32.v1"
"""A packed model: a 4-byte little-endian header length, a JSON header listing each array's
name and shape in order, then their float32 little-endian values back to back."""

_MAX_HEADER_BYTES = 1 << 20


def arrays_to_record(arrays: Mapping[str, np.ndarray], *, packed: bool = False) -> ArrayRecord:
    """Named numpy arrays as an ArrayRecord.

    Unpacked (the default): one Flower `Array` per name, each in numpy's .npy format
    (loading runs no code). Packed: all arrays in one `Array` (`PACKED_STYPE`), which
    Flower moves as one object (plus one chunk per 5 MB) instead of two per array: a
    tiny model's message is then 4 requests instead of about 50. Only float32 arrays
    are packed; any other dtype falls back to unpacked. `record_to_arrays` reads both.
    """
    values = {name: np.asarray(arrays[name]) for name in arrays}
    if packed and all(value.dtype == np.float32 for value in values.values()):
        return ArrayRecord({PACKED_KEY: _pack(values)})
    return ArrayRecord({name: Array.from_numpy_ndarray(value) for name, value in values.items()})


def _pack(arrays: Mapping[str, np.ndarray]) -> Array:
    header = json.dumps([[name, list(value.shape)] for name, value in arrays.items()]).encode()
    parts = [len(header).to_bytes(4, "little"), header]
    parts += [np.ascontiguousarray(value, dtype="<f4").tobytes() for value in arrays.values()]
    data = b"".join(parts)
    return Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)


def _layout(data: bytes) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    """The packed arrays' names and shapes, and where their values start in `data`."""
    if len(data) < 4:
        raise WireError("packed arrays: the buffer is shorter than its header length")
    size = int.from_bytes(data[:4], "little")
    if size > min(_MAX_HEADER_BYTES, len(data) - 4):
        raise WireError(f"packed arrays: a header of {size} bytes does not fit the buffer")
    try:
        entries = json.loads(data[4 : 4 + size])
    except (ValueError, RecursionError) as exc:  # a bad encoding is a ValueError too
        raise WireError(f"packed arrays: the header is not JSON ({exc})") from exc
    if not isinstance(entries, list):
        raise WireError("packed arrays: the header is not a list of [name, shape]")
    layout: list[tuple[str, tuple[int, ...]]] = []
    for index, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise WireError(f"packed arrays: header entry {index} is not [name, shape]")
        name, shape = entry
        if not name or not isinstance(shape, list):
            raise WireError(f"array {name!r}: an empty name or a shape that is not a list")
        if not all(type(n) is int and 0 <= n < 2**31 for n in shape) or len(shape) > 32:
            raise WireError(f"array {name!r}: shape {shape} is not a list of sizes")
        layout.append((name, tuple(shape)))
    names = [name for name, _ in layout]
    if len(set(names)) != len(names):
        raise WireError(f"packed arrays: a name occurs twice in {sorted(names)[:10]}")
    return layout, 4 + size


def _unpack(array: Array) -> dict[str, np.ndarray]:
    """The named float32 arrays of a packed `Array`; `WireError` naming the array at fault."""
    if array.dtype != "uint8" or tuple(array.shape) != (len(array.data),):
        raise WireError(f"packed arrays: dtype {array.dtype} shape {array.shape}, not bytes")
    data = array.data
    layout, offset = _layout(data)
    arrays: dict[str, np.ndarray] = {}
    for name, shape in layout:
        count = math.prod(shape)
        if offset + 4 * count > len(data):
            raise WireError(f"array {name!r}: the packed buffer ends before its {count} values")
        values = np.frombuffer(data, dtype="<f4", count=count, offset=offset).reshape(shape)
        if not np.isfinite(values).all():
            raise WireError(f"array {name!r} has values that are not finite")
        arrays[name] = values.astype(np.float32)  # a writable, native-order copy
        offset += 4 * count
    if offset != len(data):
        raise WireError(f"packed arrays: {len(data) - offset} bytes after the last array")
    return arrays


def record_to_arrays(content: RecordDict, key: str = ARRAYS) -> dict[str, np.ndarray]:
    """The named arrays of `content[key]` (packed or not); raise `WireError` naming the
    array if absent, malformed, or (packed) not finite float32."""
    if key not in content.array_records:
        raise WireError(f"message has no array record {key!r}")
    return record_arrays(content.array_records[key])


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The named arrays of an ArrayRecord written by `arrays_to_record`, packed or not."""
    if PACKED_KEY in record:
        if len(record) != 1:
            raise WireError(f"a packed array record has other arrays beside {PACKED_KEY!r}")
        array = record[PACKED_KEY]
        if array.stype != PACKED_STYPE:
            raise WireError(f"packed arrays: serialisation {array.stype!r}, not {PACKED_STYPE!r}")
        return _unpack(array)
    arrays: dict[str, np.ndarray] = {}
    for name, array in record.items():
        try:
            arrays[name] = array.numpy()
        except Exception as exc:  # numpy's decoder raises many kinds on corrupt bytes
            raise WireError(f"array {name!r} is not a valid numpy array: {exc}") from exc
    return arrays


def _record(content: RecordDict, record: str) -> ConfigRecord | MetricRecord:
    if record in content.config_records:
        return content.config_records[record]
    if record in content.metric_records:
        return content.metric_records[record]
    raise WireError(f"message has no record {record!r}")


def get_value(content: RecordDict, record: str, key: str, kind: type[T]) -> T:
    """`content[record][key]` as `kind`; raise `WireError` naming the key if absent or mistyped.

    Ints are accepted where floats are asked for; floats must be finite; bools are
    never taken for numbers.
    """
    values = _record(content, record)
    if key not in values:
        raise WireError(f"record {record!r} has no key {key!r}")
    value = values[key]
    if isinstance(value, bool):
        raise WireError(f"{record}.{key}: expected {kind.__name__}, got bool")
    if kind is float and isinstance(value, int):
        try:
            value = float(value)
        except OverflowError as exc:
            raise WireError(f"{record}.{key}: {value} is too large") from exc
    if not isinstance(value, kind):
        raise WireError(f"{record}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value) and key not in _NAN_ALLOWED:
        raise WireError(f"{record}.{key}: {value} is not finite")
    return value


_NAN_ALLOWED = frozenset(
    {EVAL_AUROC, EVAL_LOSS, EVAL_ACCURACY, EVAL_C_INDEX, EVAL_RMSE, LOCAL_LOSS, MODEL_TRAIN_LOSS}
)
"""Metrics that are undefined (NaN) in honest edge cases: one class only, or no held-out rows."""


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """A digest of named arrays, independent of dict order: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        for field in (name.encode(), str(array.dtype).encode(), str(array.shape).encode()):
            # Each field is length-prefixed, so no two different inputs frame alike.
            digest.update(len(field).to_bytes(8, "big"))
            digest.update(field)
        data = array.tobytes()
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


_GROUPED_PREFIXES = ("encoders", "heads")


def parameter_group(name: str) -> str:
    """The group of parameter `name`: `encoders.<modality>`, `heads.<task>`, else its first
    part (`fusion`). Sites train, and the coordinator aggregates, group by group."""
    parts = name.split(".")
    if parts[0] in _GROUPED_PREFIXES and len(parts) > 2:
        return ".".join(parts[:2])
    return parts[0]
