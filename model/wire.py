"""Names of the records and keys in messages between coordinator and sites, defined once.

Both `coordinator` and `client` import this module; neither imports the other.
"""

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

# Keys of the METRICS record in a reply to a query message (the scheduler's view of a site).
IN_WINDOW: Final = "in-window"  # 1 if the site may train now, else 0
WINDOW_ENDS: Final = "window-ends"  # epoch seconds when the current window closes; 0: no end
NEXT_WINDOW_START: Final = "next-window-start"  # epoch seconds; 0 when in a window now
ACCELERATOR: Final = "accelerator"  # in the SITE record: cpu, cuda or rbln
THROUGHPUT: Final = "throughput"  # measured DP-SGD samples per second on the study's model
BUDGET_LEFT: Final = "budget-left"  # epsilon the approval and cap still allow on the dataset
PATIENTS: Final = "patients"  # training patients (the site's aggregation weight)

# Keys of the SITE record in a reply.
SITE_ID: Final = "site-id"
RECEIPT_SIGNATURE: Final = "receipt-signature"  # hex Ed25519 signature of the update receipt
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


# --- Codec between named numpy arrays / typed values and Flower records -------------
# Every value that crosses a process boundary is checked here, with the key named.

T = TypeVar("T", int, float, str)


class WireError(ValueError):
    """A message's content is malformed: a record or key missing, or a value of the wrong type."""


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays as an ArrayRecord (numpy's own .npy format; loading runs no code)."""
    return ArrayRecord(
        {name: Array.from_numpy_ndarray(np.asarray(arrays[name])) for name in arrays}
    )


def record_to_arrays(content: RecordDict, key: str = ARRAYS) -> dict[str, np.ndarray]:
    """The named arrays of `content[key]`; raise `WireError` if absent or not numpy arrays."""
    if key not in content.array_records:
        raise WireError(f"message has no array record {key!r}")
    arrays: dict[str, np.ndarray] = {}
    for name, array in content.array_records[key].items():
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
    {EVAL_AUROC, EVAL_LOSS, EVAL_ACCURACY, EVAL_C_INDEX, EVAL_RMSE, LOCAL_LOSS}
)
"""Metrics that are undefined (NaN) in honest edge cases: one class only, or no held-out rows."""
