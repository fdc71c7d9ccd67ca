"""The packed ArrayRecord: one Flower object for a whole model, read back exactly, and a
decoder that answers any malformed buffer with a `WireError` naming what is wrong."""

from __future__ import annotations

import contextlib
import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

with warnings.catch_warnings():
    # flwr imports typer, which imports click helpers that click 8.5 deprecates.
    warnings.filterwarnings(
        "ignore", r"'click\.utils\.get_\w+_stream' is deprecated", DeprecationWarning
    )
    from flwr.app import Array, ArrayRecord, RecordDict

    from medfed.flower.testing import get_all_nested_objects
    from medfed.model import wire
    from medfed.model.contract import DEMO_CONTRACT
    from medfed.model.network import build_model, state_arrays
    from medfed.model.wire import (
        PACKED_KEY,
        PACKED_STYPE,
        WireError,
        arrays_to_record,
        record_to_arrays,
    )


def model_arrays() -> dict[str, np.ndarray]:
    return state_arrays(build_model("tiny", contract=DEMO_CONTRACT, seed=3))


def decode(record: ArrayRecord) -> dict[str, np.ndarray]:
    return record_to_arrays(RecordDict({wire.ARRAYS: record}))


def packed(data: bytes) -> ArrayRecord:
    return ArrayRecord(
        {PACKED_KEY: Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)}
    )


def buffer(header: object, payload: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(4, "little") + text + payload


def test_a_model_round_trips_exactly_in_order() -> None:
    arrays = model_arrays()
    back = decode(arrays_to_record(arrays, packed=True))
    assert list(back) == list(arrays)
    for name, array in arrays.items():
        assert back[name].dtype == np.float32
        assert back[name].shape == array.shape
        assert back[name].tobytes() == array.tobytes()
        assert back[name].flags.writeable


def test_a_packed_model_is_a_few_flower_objects() -> None:
    arrays = model_arrays()
    unpacked = len(get_all_nested_objects(arrays_to_record(arrays)))
    one = len(get_all_nested_objects(arrays_to_record(arrays, packed=True)))
    # The record, an Array per name and a chunk per distinct content (equal chunks are
    # one object: zero biases, unit LayerNorm weights).
    assert unpacked > len(arrays) + 1
    assert one == 3  # the record, one Array, one chunk


def test_float64_is_not_packed_and_keeps_its_dtype() -> None:
    arrays: dict[str, np.ndarray] = {"w": np.ones((2, 2)), "b": np.zeros(2, np.float32)}
    record = arrays_to_record(arrays, packed=True)
    assert PACKED_KEY not in record
    assert decode(record)["w"].dtype == np.float64


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01\x00", "shorter than its header"),
        ((10**6).to_bytes(4, "little") + b"[]", "does not fit"),
        (buffer("x"), "not a list"),
        (buffer([["w", [2]]], b"\x00" * 4), "array 'w': the packed buffer ends"),
        (buffer([["w", [1]]], b"\x00" * 8), "4 bytes after the last array"),
        (buffer([["w", [1]], ["w", [1]]], b"\x00" * 8), "occurs twice"),
        (buffer([["w", [-1]]]), "array 'w': shape"),
        (buffer([["w", [1.5]]]), "array 'w': shape"),
        (buffer([["", [1]]], b"\x00" * 4), "empty name"),
        (buffer([["w", [1]]], np.array([np.nan], "<f4").tobytes()), "array 'w' has values"),
        (buffer([["b", [1]], ["w", [1]]], b"\x00" * 4 + np.array([np.inf], "<f4").tobytes()),
         "array 'w' has values"),
        (b"\x03\x00\x00\x00\xff\xfe\xfd", "not JSON"),
        (len(b"[" * 100_000).to_bytes(4, "little") + b"[" * 100_000, "not JSON"),
    ],
)  # fmt: skip
def test_malformed_buffers_are_refused_naming_the_fault(data: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        decode(packed(data))


def test_a_packed_record_with_other_arrays_or_another_stype_is_refused() -> None:
    record = arrays_to_record({"w": np.ones(2, np.float32)}, packed=True)
    record["x"] = Array.from_numpy_ndarray(np.ones(1, np.float32))
    with pytest.raises(WireError, match="other arrays"):
        decode(record)
    odd = ArrayRecord(
        {PACKED_KEY: Array(dtype="uint8", shape=(1,), stype="numpy.ndarray", data=b"x")}
    )
    with pytest.raises(WireError, match="serialisation"):
        decode(odd)


finite = st.floats(width=32, allow_nan=False, allow_infinity=False)
named_arrays = st.dictionaries(
    st.text(min_size=1, max_size=12).filter(lambda name: name != PACKED_KEY),
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, max_side=4), elements=finite),
    max_size=5,
)


@given(named_arrays)
@settings(max_examples=60, deadline=None)
def test_any_finite_float32_arrays_round_trip(arrays: dict[str, np.ndarray]) -> None:
    back = decode(arrays_to_record(arrays, packed=True))
    assert list(back) == list(arrays)
    assert all(
        back[n].shape == a.shape and back[n].tobytes() == a.tobytes() for n, a in arrays.items()
    )


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_any_bytes_decode_or_raise_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        decode(packed(data))


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=4),
        max_leaves=12,
    ),
    st.binary(max_size=64),
)
@settings(max_examples=300, deadline=None)
def test_any_json_header_decodes_or_raises_wire_error(header: object, payload: bytes) -> None:
    with contextlib.suppress(WireError):
        decode(packed(buffer(header, payload)))
