"""The site API's frames: round trips of every value, and a decoder that arbitrary or
corrupted bytes never crash with anything but `CodecError`."""

from __future__ import annotations

import contextlib
import io
import json
import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.client import codec
from medfed.client.codec import CodecError, Frame
from medfed.client.protocol import HeldOut, ModelCheck, QueryReply, QueryRequest, TrainReply
from tests.sitekit import global_arrays, make_study, train_request

STUDY = make_study()


def test_a_train_request_survives_the_round_trip_bit_for_bit() -> None:
    request = train_request(STUDY, 2, run_id="run-x")
    decoded = codec.train_request(codec.decode_frame(codec.encode_frame(codec.to_frame(request))))
    assert {k: v for k, v in decoded.__dict__.items() if k != "arrays"} == {
        k: v for k, v in request.__dict__.items() if k != "arrays"
    }
    assert decoded.arrays.keys() == request.arrays.keys()
    for name, array in request.arrays.items():
        assert decoded.arrays[name].dtype == array.dtype
        assert np.array_equal(decoded.arrays[name], array)


def test_a_train_reply_keeps_nan_metrics_and_arrays() -> None:
    reply = TrainReply(
        site_id="hospital-1",
        arrays=global_arrays(),
        local_loss=0.5,
        epsilon=1.25,
        noise_multiplier=1.1,
        incoming=ModelCheck(7, 0.7, HeldOut(0, math.nan, math.nan, math.nan)),
        receipt_signature="ab" * 64,
    )
    back = codec.train_reply(codec.decode_frame(codec.encode_frame(codec.to_frame(reply))))
    assert back.epsilon == 1.25 and back.incoming.train_examples == 7
    assert math.isnan(back.incoming.held_out.auroc)
    assert set(back.arrays) == set(reply.arrays)


def test_query_values_round_trip_with_nulls() -> None:
    request = QueryRequest(
        study="s", study_sha256=None, preset="tiny", contract_json="{}", contract_sha256="ab"
    )
    assert codec.query_request(codec.decode_frame(codec.encode_frame(codec.to_frame(request)))) == (
        request
    )
    reply = QueryReply("h", True, 12.0, 0.0, "cpu", None, 1.5, 40)
    assert codec.query_reply(codec.decode_frame(codec.encode_frame(codec.to_frame(reply)))) == reply


def _frame_bytes(header: object, blobs: list[bytes] = []) -> bytes:  # noqa: B006
    raw = json.dumps(header).encode()
    parts = [codec.MAGIC, struct.pack(">I", len(raw)), raw]
    for blob in blobs:
        parts += [struct.pack(">Q", len(blob)), blob]
    return b"".join(parts)


def test_an_object_array_is_refused_without_unpickling() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    data = _frame_bytes({"kind": "train", "fields": {}, "arrays": ["x"]}, [buffer.getvalue()])
    with pytest.raises(CodecError, match="'x'"):
        codec.decode_frame(data)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"round": "1"}, "round: expected int"),
        ({"round": True}, "round: expected int"),
        ({"learning_rate": float("inf")}, "learning_rate"),
        ({"preset": "huge"}, "unknown preset"),
    ],
)
def test_a_mistyped_field_is_named(fields: dict[str, object], match: str) -> None:
    frame = codec.to_frame(train_request(STUDY))
    broken = Frame(frame.kind, {**frame.fields, **fields}, frame.arrays)  # type: ignore[dict-item]
    with pytest.raises(CodecError, match=match):
        codec.train_request(codec.decode_frame(codec.encode_frame(broken)))


def test_a_missing_field_is_named() -> None:
    frame = codec.to_frame(train_request(STUDY))
    fields = dict(frame.fields)
    del fields["model_sha256"]
    with pytest.raises(CodecError, match="model_sha256"):
        codec.train_request(Frame(frame.kind, fields, frame.arrays))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_codec_error(data: bytes) -> None:
    for payload in (data, codec.MAGIC + data):
        try:
            frame = codec.decode_frame(payload)
        except CodecError:
            continue
        for parse in (codec.train_request, codec.query_request, codec.train_reply):
            with contextlib.suppress(CodecError):
                parse(frame)


VALID = codec.encode_frame(codec.to_frame(train_request(STUDY)))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(VALID) - 1), st.integers(0, 255), st.integers(0, len(VALID)))
def test_corrupted_or_cut_frames_raise_only_codec_error(at: int, byte: int, cut: int) -> None:
    data = bytearray(VALID)
    data[at] = byte
    for payload in (bytes(data), VALID[:cut]):
        with contextlib.suppress(CodecError):
            codec.train_request(codec.decode_frame(payload))


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=12),
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
        max_size=8,
    ),
    st.sampled_from(["train", "evaluate", "query", "train-reply", "query-reply", "audit"]),
)
def test_well_framed_headers_with_any_fields_raise_only_codec_error(
    fields: dict[str, object], kind: str
) -> None:
    frame = codec.decode_frame(_frame_bytes({"kind": kind, "fields": fields, "arrays": []}))
    parsers = (
        codec.train_request, codec.evaluate_request, codec.query_request, codec.train_reply,
        codec.evaluate_reply, codec.query_reply, codec.egress_rules, codec.audit_request,
    )  # fmt: skip
    for parse in parsers:
        with contextlib.suppress(CodecError):
            parse(frame)
