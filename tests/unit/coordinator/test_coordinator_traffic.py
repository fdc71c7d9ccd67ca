"""The traffic log: one line per exchange with the bytes pushed and received, checked against
Flower's own serialization of each message's content; written to a run folder's file only
while a run asks for it; read back, by round, whatever a killed run left."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import numpy as np
import pytest
from flwr.app import ConfigRecord, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from medfed.coordinator import messages
from medfed.coordinator.messages import content_bytes, exchange
from medfed.coordinator.traffic import (
    TRAFFIC_LOGGER,
    ExchangeTraffic,
    read_traffic,
    traffic_written_to,
)
from medfed.flower.testing import get_all_nested_objects
from medfed.model import wire
from tests.fakesites import FakeGrid, consortium

pytestmark = pytest.mark.usefixtures("server_identity")

MODEL = {"w": np.arange(2500, dtype=np.float32), "b": np.zeros(3, np.float32)}


def flower_bytes(content: RecordDict) -> int:
    """The reference: every object Flower serializes for the content (records, arrays,
    array chunks), framing included."""
    return sum(len(item.deflate()) for item in get_all_nested_objects(content).values())


def train_content(round_number: int) -> RecordDict:
    config = ConfigRecord(
        {
            wire.ROUND: round_number,
            wire.SEED: 7,
            wire.LOCAL_STEPS: 2,
            wire.MODEL_SHA256: "m" * 64,
            wire.CONTRACT: "c" * 5000,
        }
    )
    return RecordDict({wire.ARRAYS: wire.arrays_to_record(MODEL), wire.CONFIG: config})


@pytest.mark.parametrize(
    "content",
    [
        train_content(1),
        RecordDict({wire.CONFIG: ConfigRecord({wire.SECAGG: "x" * 20_000})}),
        RecordDict({wire.METRICS: MetricRecord({"loss": 0.5, "n": 3})}),
        RecordDict(),
    ],
)
def test_content_bytes_are_flowers_serialization_without_its_framing(content: RecordDict) -> None:
    counted = content_bytes(content)
    reference = flower_bytes(content)
    objects = len(get_all_nested_objects(content))
    assert counted <= reference <= counted + 300 * objects
    if wire.ARRAYS in content:
        assert counted >= sum(array.nbytes for array in MODEL.values()) + 5000


def test_each_exchange_logs_what_was_pushed_and_what_came_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sites = consortium(**{"9003": {"silent": True}})  # its training reply never comes
    grid = cast(Grid, FakeGrid(sites))
    contents = {node: train_content(2) for node in sites}
    with traffic_written_to(tmp_path / "run" / "traffic.jsonl"):
        replies = exchange(grid, contents, message_type=MessageType.TRAIN, group="2", timeout_s=0.3)
        queries = dict.fromkeys(sites, RecordDict())
        exchange(grid, queries, message_type=MessageType.QUERY, group="status-3", timeout_s=0.3)
    train, status = read_traffic(tmp_path / "run" / "traffic.jsonl")

    assert (train.group, train.round, train.messages, train.replies) == ("2", 2, 3, 2)
    assert train.to_sites_bytes == sum(content_bytes(c) for c in contents.values())
    assert train.from_sites_bytes == sum(content_bytes(r.content) for r in replies)
    assert train.from_sites_bytes > 2 * sum(array.nbytes for array in MODEL.values())
    # hospital-1 answers a status query with an error: no content, no bytes
    assert (status.round, status.messages, status.replies) == (3, 3, 3)
    assert status.to_sites_bytes == 0 and 0 < status.from_sites_bytes < 3 * 1000
    assert [r.name for r in caplog.records if r.name == TRAFFIC_LOGGER] == [TRAFFIC_LOGGER] * 2


def test_nothing_is_counted_while_nothing_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(content: RecordDict) -> int:
        raise AssertionError("counted with no listener")

    monkeypatch.setattr(messages, "content_bytes", refuse)
    grid = cast(Grid, FakeGrid(consortium()))
    assert not logging.getLogger(TRAFFIC_LOGGER).isEnabledFor(logging.INFO)
    query = {9002: RecordDict()}
    replies = exchange(grid, query, message_type=MessageType.QUERY, group="status-1", timeout_s=0.3)
    assert len(replies) == 1
    assert logging.getLogger(TRAFFIC_LOGGER).handlers == []


@pytest.mark.parametrize(
    ("group", "round_number"),
    [("3", 3), ("status-3", 3), ("3.keys", 3), ("12.reveal", 12), ("final", None),
     ("ask-2", None), ("status-", None), ("3.", None)],
)  # fmt: skip
def test_the_round_of_an_exchange_is_read_from_its_group(
    group: str, round_number: int | None
) -> None:
    assert ExchangeTraffic(group, "train", 1, 1, 0, 0).round == round_number


def test_a_torn_or_foreign_line_is_left_out_and_a_missing_file_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "traffic.jsonl"
    whole = ExchangeTraffic("1", "train", 3, 2, 300, 200)
    path.write_text(
        "\n".join([whole.to_json(), "not json", '{"group": "2"}', "[1, 2]", whole.to_json()[:20]])
        + "\n",
        encoding="utf-8",
    )
    assert read_traffic(path) == [whole]
    assert read_traffic(tmp_path / "missing.jsonl") == []
