"""The codec between named arrays / typed values and Flower records."""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

with warnings.catch_warnings():
    # flwr imports typer, which imports click helpers that click 8.5 deprecates; the
    # warning is attributed to typer, which pyproject's third-party filters do not name.
    warnings.filterwarnings(
        "ignore", r"'click\.utils\.get_\w+_stream' is deprecated", DeprecationWarning
    )
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from medfed.model import wire
    from medfed.model.contract import DEMO_CONTRACT
    from medfed.model.network import build_model, state_arrays
    from medfed.model.wire import WireError, arrays_to_record, get_value, record_to_arrays

NAN_ALLOWED = {wire.EVAL_AUROC, wire.EVAL_LOSS, wire.EVAL_ACCURACY, wire.LOCAL_LOSS}
INT64 = {"min_value": -(2**63), "max_value": 2**63 - 1}


def round_trip(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return record_to_arrays(RecordDict({wire.ARRAYS: arrays_to_record(arrays)}))


def content(
    config: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None
) -> RecordDict:
    records: dict[str, ConfigRecord | MetricRecord] = {}
    if config is not None:
        records[wire.CONFIG] = ConfigRecord(config)
    if metrics is not None:
        records[wire.METRICS] = MetricRecord(metrics)
    return RecordDict(records)  # type: ignore[arg-type]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# --- Arrays ---------------------------------------------------------------------------


def test_model_arrays_round_trip() -> None:
    arrays = state_arrays(build_model("tiny", contract=DEMO_CONTRACT, seed=1))
    back = round_trip(arrays)
    assert list(back) == list(arrays)
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype
        assert back[name].shape == array.shape
        assert back[name].tobytes() == array.tobytes()


@settings(max_examples=60, deadline=None, database=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12),
        hnp.arrays(
            dtype=st.sampled_from([np.float32, np.float64, np.int64, np.int8, np.bool_]),
            shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
        ),
        max_size=4,
    )
)
def test_any_named_arrays_round_trip_bit_for_bit(arrays: dict[str, np.ndarray]) -> None:
    back = round_trip(arrays)
    assert set(back) == set(arrays)
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype
        assert back[name].shape == array.shape
        assert back[name].tobytes() == array.tobytes()


def test_non_contiguous_arrays_round_trip() -> None:
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4).T
    assert np.array_equal(round_trip({"m": matrix})["m"], matrix)


def test_missing_array_record_is_a_wire_error() -> None:
    with pytest.raises(WireError, match="'arrays'"):
        record_to_arrays(content(config={"x": 1}))


def test_array_in_another_format_is_a_wire_error() -> None:
    array = Array(dtype="float32", shape=(2,), stype="torch.raw", data=b"\x00" * 8)
    record = RecordDict({wire.ARRAYS: ArrayRecord({"w": array})})
    with pytest.raises(WireError, match="'w'"):
        record_to_arrays(record)


@pytest.mark.parametrize(
    "data",
    [
        b"hello, not numpy",
        npy_bytes(np.arange(10, dtype=np.float32))[:-5],
        npy_bytes(np.arange(10, dtype=np.float32))[:20],
        npy_bytes(np.arange(10, dtype=np.float32)).replace(b"'descr'", b"'descr "),
    ],
    ids=["garbage", "truncated-data", "truncated-header", "bad-header"],
)
def test_corrupt_array_bytes_are_a_wire_error(data: bytes) -> None:
    array = Array(dtype="float32", shape=(10,), stype="numpy.ndarray", data=data)
    with pytest.raises(WireError, match="'w'"):
        record_to_arrays(RecordDict({wire.ARRAYS: ArrayRecord({"w": array})}))


@pytest.mark.parametrize(
    "data",
    [b"", npy_bytes(np.arange(10, dtype=np.float32)).replace(b"(10,)", b"(10,(")],
    ids=["empty", "unclosed-bracket-in-header"],
)
def test_corrupt_array_bytes_never_escape_as_other_errors(data: bytes) -> None:
    array = Array(dtype="float32", shape=(10,), stype="numpy.ndarray", data=data)
    with pytest.raises(WireError, match="'w'"):
        record_to_arrays(RecordDict({wire.ARRAYS: ArrayRecord({"w": array})}))


# --- Values ---------------------------------------------------------------------------


def test_values_of_each_kind() -> None:
    message = content(
        config={wire.ROUND: 3, wire.LEARNING_RATE: 0.05, wire.RUN_ID: "run-7"},
        metrics={wire.NUM_EXAMPLES: 120},
    )
    assert get_value(message, wire.CONFIG, wire.ROUND, int) == 3
    assert get_value(message, wire.CONFIG, wire.LEARNING_RATE, float) == 0.05
    assert get_value(message, wire.CONFIG, wire.RUN_ID, str) == "run-7"
    assert get_value(message, wire.METRICS, wire.NUM_EXAMPLES, int) == 120


def test_int_is_accepted_for_float() -> None:
    value = get_value(
        content(config={wire.LEARNING_RATE: 1}), wire.CONFIG, wire.LEARNING_RATE, float
    )
    assert value == 1.0
    assert type(value) is float


def test_missing_record_is_a_wire_error() -> None:
    with pytest.raises(WireError, match="'metrics'"):
        get_value(content(config={wire.ROUND: 1}), wire.METRICS, wire.EPSILON, float)


def test_missing_key_is_a_wire_error_naming_it() -> None:
    with pytest.raises(WireError, match=wire.LOCAL_STEPS):
        get_value(content(config={wire.ROUND: 1}), wire.CONFIG, wire.LOCAL_STEPS, int)


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("3", int),
        (3.0, int),
        ("0.1", float),
        (7, str),
        (b"bytes", str),
        ([1, 2], int),
        (True, int),
        (False, float),
        (True, str),
    ],
)
def test_wrong_type_is_a_wire_error_naming_the_key(value: Any, kind: type) -> None:
    message = content(config={wire.SEED: value})
    with pytest.raises(WireError, match=f"{wire.CONFIG}.{wire.SEED}: expected {kind.__name__}"):
        get_value(message, wire.CONFIG, wire.SEED, kind)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_float_is_a_wire_error(value: float) -> None:
    with pytest.raises(WireError, match=f"{wire.NOISE_MULTIPLIER}: .* is not finite"):
        get_value(
            content(config={wire.NOISE_MULTIPLIER: value}),
            wire.CONFIG,
            wire.NOISE_MULTIPLIER,
            float,
        )
    with pytest.raises(WireError, match=f"{wire.EPSILON}: .* is not finite"):
        get_value(content(metrics={wire.EPSILON: value}), wire.METRICS, wire.EPSILON, float)


@pytest.mark.parametrize(
    "key", [wire.EVAL_AUROC, wire.EVAL_LOSS, wire.EVAL_ACCURACY, wire.LOCAL_LOSS]
)
def test_nan_is_allowed_for_metrics_undefined_in_edge_cases(key: str) -> None:
    assert math.isnan(get_value(content(metrics={key: math.nan}), wire.METRICS, key, float))


# Values a ConfigRecord can hold, with ints in the int64 range its protobuf carries.
scalar_values = st.one_of(
    st.integers(**INT64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.booleans(),
)
config_values = st.one_of(
    scalar_values,
    st.lists(st.integers(**INT64), max_size=3),
    st.lists(st.floats(), max_size=3),
    st.lists(st.text(max_size=3), max_size=3),
)
keys = st.sampled_from(
    [wire.ROUND, wire.SEED, wire.EVAL_AUROC, wire.LOCAL_LOSS, wire.EPSILON]
) | st.text(max_size=6)


@settings(max_examples=300, deadline=None, database=None)
@given(
    config=st.dictionaries(keys, config_values, max_size=5),
    record=st.sampled_from([wire.CONFIG, wire.METRICS]),
    key=keys,
    kind=st.sampled_from([int, float, str]),
)
def test_arbitrary_config_only_ever_raises_wire_error(
    config: dict[str, Any], record: str, key: str, kind: type
) -> None:
    try:
        value = get_value(content(config=config), record, key, kind)
    except WireError:
        return
    assert record == wire.CONFIG
    assert type(value) is kind
    raw = config[key]
    assert not isinstance(raw, bool)
    if kind is float:
        assert isinstance(raw, int | float)
        if key not in NAN_ALLOWED:
            assert math.isfinite(value)
        assert value == float(raw) or (math.isnan(value) and math.isnan(raw))
    else:
        assert value == raw


def test_int_too_large_for_float_is_a_wire_error() -> None:
    with pytest.raises(WireError, match=wire.LEARNING_RATE):
        get_value(
            content(config={wire.LEARNING_RATE: 10**400}), wire.CONFIG, wire.LEARNING_RATE, float
        )
