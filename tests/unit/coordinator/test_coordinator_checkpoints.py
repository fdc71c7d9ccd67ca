"""The checkpoint store (one SQLite transaction per round, npz without pickle) and the
status decoder (never raises on what a site sends; a bad status is 'unknown')."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.coordinator.checkpoints import Checkpoint, CheckpointStore
from medfed.coordinator.errors import CheckpointError
from medfed.coordinator.site_status import parse_status
from medfed.model import wire
from medfed.model.network import arrays_sha256

pytestmark = pytest.mark.usefixtures("server_identity")


def checkpoint(round_number: int, run_id: str = "run-1") -> Checkpoint:
    rng = np.random.default_rng(round_number)
    return Checkpoint(
        run_id=run_id,
        round=round_number,
        study_sha256="ab" * 32,
        arrays={"fusion.weight": rng.normal(size=(3, 2)).astype(np.float32)},
        strategy_state={"m/fusion.weight": rng.normal(size=(3, 2))},
        state={"rng": {"state": 2**100 + round_number}, "plan": None},
    )


def test_checkpoints_round_trip_exactly_and_the_last_one_is_loaded(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints.db")
    assert store.load() is None and store.rounds() == []
    written = [checkpoint(r) for r in (0, 1, 2)]
    for item in written:
        store.save(item)

    last = store.load()
    assert last is not None and store.rounds() == [0, 1, 2]
    assert last.round == 2 and last.run_id == "run-1" and last.state == written[2].state
    np.testing.assert_array_equal(last.arrays["fusion.weight"], written[2].arrays["fusion.weight"])
    assert last.arrays["fusion.weight"].dtype == np.float32
    np.testing.assert_array_equal(
        last.strategy_state["m/fusion.weight"], written[2].strategy_state["m/fusion.weight"]
    )
    first = store.load(1)
    assert first is not None and first.model_sha256 == arrays_sha256(written[1].arrays)


def test_a_round_is_written_once_and_a_store_holds_one_run(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints.db")
    store.save(checkpoint(1))

    with pytest.raises(CheckpointError, match="not after the last checkpoint"):
        store.save(checkpoint(1))
    with pytest.raises(CheckpointError, match="holds run run-1, not run-2"):
        store.save(checkpoint(2, run_id="run-2"))
    assert store.rounds() == [1]


def test_a_corrupted_model_is_detected_by_its_digest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints.db")
    store.save(checkpoint(1))
    other = CheckpointStore(tmp_path / "other.db")
    other.save(checkpoint(5))
    with sqlite3.connect(tmp_path / "other.db") as connection:
        (blob,) = connection.execute("SELECT model FROM checkpoints").fetchone()
    with sqlite3.connect(tmp_path / "checkpoints.db") as connection:
        connection.execute("UPDATE checkpoints SET model = ?", (blob,))

    with pytest.raises(CheckpointError, match="does not match its digest"):
        store.load()

    with sqlite3.connect(tmp_path / "checkpoints.db") as connection:
        connection.execute("UPDATE checkpoints SET model = ?", (b"not a zip",))
    with pytest.raises(CheckpointError, match="cannot be read"):
        store.load()


def query() -> Message:
    message = Message(RecordDict(), dst_node_id=42, message_type=MessageType.QUERY)
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def status_reply(site: dict[str, object], metrics: dict[str, object]) -> Message:
    return Message(
        RecordDict(
            {
                wire.SITE: ConfigRecord(site),  # type: ignore[arg-type]
                wire.METRICS: MetricRecord(metrics),  # type: ignore[arg-type]
            }
        ),
        reply_to=query(),
    )


GOOD_METRICS: dict[str, object] = {
    wire.IN_WINDOW: 1,
    wire.WINDOW_ENDS: 1.7e9,
    wire.NEXT_WINDOW_START: 0.0,
    wire.THROUGHPUT: 250.0,
    wire.BUDGET_LEFT: 1.5,
    wire.PATIENTS: 400,
}
GOOD_SITE: dict[str, object] = {wire.SITE_ID: "hospital-1", wire.ACCELERATOR: "cuda"}


def test_a_status_reply_is_read_key_by_key() -> None:
    known: dict[int, str] = {}
    status = parse_status(status_reply(GOOD_SITE, GOOD_METRICS), known)

    assert status.known and status.site_id == "hospital-1" and status.accelerator == "cuda"
    assert (status.in_window, status.window_ends, status.throughput_sps) == (True, 1.7e9, 250.0)
    assert (status.budget_left, status.patients) == (1.5, 400)
    assert known == {42: "hospital-1"}


def test_an_error_reply_is_an_unknown_status_under_the_last_known_name() -> None:
    error = Message(Error(code=0, reason="no query function"), reply_to=query())
    status = parse_status(error, {42: "hospital-9"})
    assert not status.known and status.site_id == "hospital-9"


# What a MetricRecord can carry (it refuses bools itself).
metric_values = st.one_of(
    st.integers(min_value=-(2**62), max_value=2**62),
    st.floats(allow_nan=True, allow_infinity=True),
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(sorted(GOOD_METRICS)), metric_values, max_size=6),
    st.dictionaries(
        st.sampled_from([wire.SITE_ID, wire.ACCELERATOR]),
        st.one_of(st.text(max_size=8), st.integers()),
        max_size=2,
    ),
)
def test_no_status_a_site_sends_makes_the_decoder_raise(
    metrics: dict[str, object], site: dict[str, object]
) -> None:
    status = parse_status(status_reply(site, {**GOOD_METRICS, **metrics}), {})
    if status.known:
        assert status.throughput_sps >= 0 and 0 <= status.patients <= 10_000_000
        assert np.isfinite([status.window_ends, status.budget_left, status.throughput_sps]).all()
