"""The site API's frames of a query exchange: round trip, and nothing but `CodecError`."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.client import codec
from medfed.client.protocol import AskReply, AskRequest

REQUEST = AskRequest(
    run_id="7", query_json='{"name":"q"}', query_sha256="ab" * 32, contract_json="{}",
    contract_sha256="cd" * 32, step=2, betas_json='{"5": [0.1, -0.2]}',
)  # fmt: skip
REPLY = AskReply(
    site_id="hospital-1", step=2, released=np.array([1.5, -2.25, 3e5]), noise_multiplier=15.03,
    epsilon=1.0, dataset_sha256="ef" * 32, receipt_signature="01" * 64,
)  # fmt: skip


def test_an_ask_request_and_reply_survive_the_round_trip() -> None:
    request = codec.ask_request(codec.decode_frame(codec.encode_frame(codec.to_frame(REQUEST))))
    assert request == REQUEST
    reply = codec.ask_reply(codec.decode_frame(codec.encode_frame(codec.to_frame(REPLY))))
    assert reply.released.tobytes() == REPLY.released.tobytes()
    assert (reply.site_id, reply.step, reply.noise_multiplier) == ("hospital-1", 2, 15.03)


@pytest.mark.parametrize(
    "released",
    [
        np.array([1.0, np.nan]),
        np.array([1, 2], dtype=np.int64),
        np.zeros((2, 2)),
        np.array([np.inf]),
    ],
)
def test_a_reply_vector_that_is_not_finite_float64_is_refused(released: np.ndarray) -> None:
    frame = codec.to_frame(REPLY)
    frame.arrays[codec.RELEASED] = released
    with pytest.raises(codec.CodecError, match="released"):
        codec.ask_reply(codec.decode_frame(codec.encode_frame(frame)))


def test_a_reply_with_another_array_is_refused() -> None:
    frame = codec.to_frame(REPLY)
    frame.arrays["rows"] = np.ones(3)
    with pytest.raises(codec.CodecError, match="exactly one array"):
        codec.ask_reply(frame)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_after_the_header_raise_only_codec_error(tail: bytes) -> None:
    data = codec.encode_frame(codec.to_frame(REQUEST))
    for candidate in (data[: len(data) // 2] + tail, tail):
        with contextlib.suppress(codec.CodecError):
            codec.ask_request(codec.decode_frame(candidate))
