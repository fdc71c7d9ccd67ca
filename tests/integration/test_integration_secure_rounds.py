"""Secure aggregation through the real round loop and the real ClientApp handlers of demo
sites (in-process, over a fake Grid): the coordinator's new model is checked against the
plain weighted average of the updates the sites kept (their stored replies), which the
coordinator never saw."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from medfed.client import client_app
from medfed.client.config import load_site_config
from medfed.client.reply_cache import ReplyCache
from medfed.coordinator.errors import RoundFailedError
from medfed.model import wire
from medfed.model.network import arrays_sha256
from medfed.privacy.secagg_protocol import Announcement, SignedAnnouncement
from medfed.privacy.signing import SigningKey
from tests.integration.test_integration_rounds import (
    HANDLERS,
    RUN_ID,
    Arrays,
    Consortium,
    FakeGrid,
    Reports,
    consortium,
    run,
    study,
)

pytestmark = [
    pytest.mark.usefixtures("server_identity", "status_queries"),
    pytest.mark.slow,
]


@pytest.fixture
def status_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sites answer the status query: a secure round needs each site's identity first."""
    monkeypatch.setitem(HANDLERS, MessageType.QUERY, client_app.query)  # type: ignore[arg-type]


def secure_study(**changes: Any) -> Any:
    return study(**{"secure_aggregation": True, "num_server_rounds": 1, **changes})


def stored_update(sites: Consortium, site: str, round_number: int) -> tuple[Arrays, int]:
    """The plain update a site trained (kept in its reply store, never sent)."""
    config = load_site_config(sites.site_toml(site))
    cache = ReplyCache(config.state_dir / "replies")
    path_npz, path_json = cache._paths(RUN_ID, round_number)  # the test reads the store
    meta = json.loads(path_json.read_text())
    with np.load(path_npz, allow_pickle=False) as data:
        arrays = {name: data[f"arr_{i}"] for i, name in enumerate(meta["names"])}
    return arrays, int(meta["train_examples"])


def plain_average(global_arrays: Arrays, updates: list[tuple[Arrays, int]]) -> Arrays:
    total = sum(weight for _, weight in updates)
    return {
        name: sum(arrays[name].astype(np.float64) * w for arrays, w in updates) / total
        for name in global_arrays
    }


def train_model(grid: FakeGrid, group: str = "1") -> Arrays:
    """The global model the sites received for training in round `group`."""
    return next(d.arrays for d in grid.deliveries if d.message_type == "train" and d.group == group)


def test_the_unmasked_average_equals_the_plain_average_of_the_sites_updates(
    tmp_path: Path,
) -> None:
    settings = secure_study()
    sites = consortium(tmp_path, settings)
    grid = FakeGrid(sites.contexts())
    results = run(grid, settings)
    assert results.status == "completed"
    assert sorted(results.per_round[0].participants) == sorted(sites.nodes.values())
    # Each train reply carried one array, the masked update: the coordinator saw no other.
    for delivery in grid.deliveries:
        if delivery.message_type == "train":
            record = delivery.reply.content.array_records[wire.ARRAYS]
            assert list(record) == [wire.MASKED]
            assert record[wire.MASKED].numpy().dtype == np.uint32
        else:
            assert not delivery.reply.content.array_records
    received = train_model(grid)
    expected = plain_average(
        received, [stored_update(sites, site, 1) for site in sorted(sites.nodes.values())]
    )
    final = grid.deliveries[-1].arrays  # the final evaluation carries the new model
    assert arrays_sha256(final) == results.per_round[0].model_sha256
    for name, value in expected.items():
        # Fixed point: clip 1 over 2**31 / 3 levels per site; far below float32 noise here.
        np.testing.assert_allclose(final[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def _losing(grid: FakeGrid, lost: Callable[[Message], bool]) -> None:
    """Replies to the messages `lost` picks never reach the coordinator (the site did answer)."""
    original_push = grid.push_messages

    def push(messages: Any) -> Any:
        messages = list(messages)
        ids = list(original_push(messages))
        for message, message_id in zip(messages, ids, strict=True):
            if lost(message):
                grid._replies.pop(message_id, None)
        return ids

    grid.push_messages = push  # type: ignore[method-assign]


def test_a_site_that_drops_at_the_train_step_is_recovered_below_the_threshold(
    tmp_path: Path,
) -> None:
    """hospital-2 trained and masked, but its reply (shares and masked update) is lost: the
    survivors reveal their pairwise seeds with it and the sum of the other two is exact."""
    settings = secure_study(min_sites=2)
    sites = consortium(tmp_path, settings)
    dropped = sites.node_of("hospital-2")
    grid = FakeGrid(sites.contexts())
    _losing(
        grid, lambda m: m.metadata.message_type == "train" and m.metadata.dst_node_id == dropped
    )
    results = run(grid, settings)
    assert results.status == "completed"
    record = results.per_round[0]
    assert sorted(record.participants) == ["hospital-1", "hospital-3"]
    assert "hospital-2" in record.rejected
    received = train_model(grid)
    expected = plain_average(
        received, [stored_update(sites, site, 1) for site in ("hospital-1", "hospital-3")]
    )
    final = grid.deliveries[-1].arrays
    for name, value in expected.items():
        np.testing.assert_allclose(final[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    # Each survivor revealed its seed with hospital-2 and no share of hospital-2's secrets.
    for delivery in grid.deliveries:
        if delivery.message_type == wire.SECAGG_REVEAL:
            answer = json.loads(str(delivery.reply.content.config_records[wire.SITE][wire.SECAGG]))
            assert list(answer["pairwise"]) == ["hospital-2"]
            assert "hospital-2" not in answer["seeds"]


def test_a_survivor_silent_at_the_reveal_is_not_missed_when_none_dropped(tmp_path: Path) -> None:
    settings = secure_study(min_sites=2)
    sites = consortium(tmp_path, settings)
    silent = sites.node_of("hospital-1")
    grid = FakeGrid(sites.contexts())
    _losing(
        grid,
        lambda m: (
            m.metadata.message_type == wire.SECAGG_REVEAL and m.metadata.dst_node_id == silent
        ),
    )
    results = run(grid, settings)
    assert sorted(results.per_round[0].participants) == sorted(sites.nodes.values())
    expected = plain_average(
        train_model(grid), [stored_update(sites, s, 1) for s in sorted(sites.nodes.values())]
    )
    for name, value in expected.items():
        np.testing.assert_allclose(
            grid.deliveries[-1].arrays[name], value, rtol=1e-5, atol=1e-6, err_msg=name
        )


def test_a_dropout_at_train_and_a_silence_at_reveal_abort_without_unmasking(
    tmp_path: Path,
) -> None:
    settings = secure_study(min_sites=2)
    sites = consortium(tmp_path, settings)
    dropped, silent = sites.node_of("hospital-2"), sites.node_of("hospital-3")
    grid = FakeGrid(sites.contexts())
    _losing(
        grid,
        lambda m: (
            (m.metadata.message_type, m.metadata.dst_node_id)
            in {("train", dropped), (wire.SECAGG_REVEAL, silent)}
        ),
    )
    with pytest.raises(RoundFailedError, match=r"aborted.*nothing was unmasked"):
        run(grid, settings, Reports())


def test_too_many_dropouts_at_the_train_step_abort_without_unmasking(tmp_path: Path) -> None:
    settings = secure_study(min_sites=2)
    sites = consortium(tmp_path, settings)
    gone = {sites.node_of("hospital-1"), sites.node_of("hospital-2")}
    grid = FakeGrid(sites.contexts())
    _losing(grid, lambda m: m.metadata.message_type == "train" and m.metadata.dst_node_id in gone)
    with pytest.raises(RoundFailedError, match=r"aborted.*nothing was unmasked"):
        run(grid, settings, Reports())
    # No reveal was ever asked for.
    assert not [d for d in grid.deliveries if d.message_type == wire.SECAGG_REVEAL]


def test_a_coordinator_that_shows_one_site_another_model_is_refused(tmp_path: Path) -> None:
    """A coordinator (holding its real key) announces hospital-3 a different model, then
    relays hospital-3's keys to the others as if all was well: hospital-3's own checks
    pass, but the others see that its keys name another announcement, and refuse."""
    key_path = tmp_path / "coordinator.key"
    coordinator = SigningKey.generate()
    coordinator.save(key_path)
    settings = secure_study(coordinator_key=str(key_path), min_sites=2)
    sites = consortium(tmp_path / "sites", settings)
    target = sites.node_of("hospital-3")
    grid: FakeGrid

    def forge(node: int, message: Message) -> Message:
        kind = message.metadata.message_type
        if kind not in ("train", wire.SECAGG_KEYS):
            return message
        content = message.content
        config = dict(content.config_records[wire.CONFIG])
        if kind == wire.SECAGG_KEYS and node == target:
            signed = SignedAnnouncement.from_text(str(config[wire.SECAGG]))
            fields = dict(signed.announcement.__dict__)
            fields["model_sha256"] = "f" * 64
            config[wire.SECAGG] = SignedAnnouncement.sign(
                Announcement(**fields), coordinator
            ).to_text()
        elif kind == "train" and node != target:
            # Relay hospital-3's keys (made for the other announcement) to the others.
            keys = next(
                d.reply
                for d in grid.deliveries
                if d.node == target and d.message_type == wire.SECAGG_KEYS
            )
            advert = json.loads(str(keys.content.config_records[wire.SITE][wire.SECAGG]))
            relay = json.loads(str(config[wire.SECAGG]))
            relay["adverts"].append(advert)
            config[wire.SECAGG] = json.dumps(relay)
        else:
            return message
        forged = Message(
            RecordDict({**dict(content.array_records), wire.CONFIG: ConfigRecord(config)}),
            dst_node_id=node,
            message_type=kind,
            group_id=message.metadata.group_id,
        )
        forged.metadata.__dict__["_message_id"] = message.metadata.message_id
        return forged

    grid = FakeGrid(sites.contexts(), in_transit=forge)
    with pytest.raises(RoundFailedError, match="secure aggregation aborted") as failure:
        run(grid, settings)
    assert "'hospital-3' was shown a different announcement" in str(failure.value)
    # Neither honest site dealt shares or sent anything of its update.
    for delivery in grid.deliveries:
        if delivery.message_type == "train":
            assert delivery.reply.has_error()


def test_a_model_swapped_under_a_true_announcement_is_refused(tmp_path: Path) -> None:
    settings = secure_study(min_sites=2)
    sites = consortium(tmp_path, settings)
    target = sites.node_of("hospital-1")

    def swap(node: int, message: Message) -> Message:
        if node != target or message.metadata.message_type != "train":
            return message
        content = message.content
        arrays = wire.record_to_arrays(content)
        arrays = {name: (a + 0.5).astype(np.float32) for name, a in arrays.items()}
        config = dict(content.config_records[wire.CONFIG])
        config[wire.MODEL_SHA256] = arrays_sha256(arrays)
        swapped = Message(
            RecordDict(
                {
                    wire.ARRAYS: wire.arrays_to_record(arrays, packed=True),
                    wire.CONFIG: ConfigRecord(config),
                }
            ),
            dst_node_id=node,
            message_type="train",
            group_id=message.metadata.group_id,
        )
        swapped.metadata.__dict__["_message_id"] = message.metadata.message_id
        return swapped

    grid = FakeGrid(sites.contexts(), in_transit=swap)
    results = run(grid, settings)
    record = results.per_round[0]
    assert "hospital-1" not in record.participants
    assert "not the one announced" in record.rejected["hospital-1"]


# --- keys dealt ahead: round r+1's fresh keys come back with round r's reveal -----------------


def test_later_rounds_use_keys_dealt_with_the_reveal_and_still_equal_the_plain_average(
    tmp_path: Path,
) -> None:
    settings = secure_study(num_server_rounds=3)
    sites = consortium(tmp_path, settings)
    grid = FakeGrid(sites.contexts())
    results = run(grid, settings)
    assert results.status == "completed"
    # One keys exchange, in round 1; rounds 2 and 3 are keyed by round 1's and 2's reveals.
    keys = [d for d in grid.deliveries if d.message_type == wire.SECAGG_KEYS]
    assert sorted({d.group for d in keys}) == ["1.keys"]
    reveals = [d for d in grid.deliveries if d.message_type == wire.SECAGG_REVEAL]
    assert {d.group for d in reveals} == {"1.reveal", "2.reveal", "3.reveal"}
    # The statuses of rounds 2 and 3 came with the reveals before them: one status query.
    statuses = {d.group for d in grid.deliveries if d.message_type == MessageType.QUERY}
    assert statuses == {"status-1"}
    for delivery in reveals:
        has_status = wire.METRICS in delivery.reply.content.metric_records
        assert has_status == (delivery.group != "3.reveal")
    # Each round after the first: a train and a reveal exchange, as a plain round has a
    # status and a train exchange.
    steps = [d.group for d in grid.deliveries if d.node == min(sites.nodes)]
    assert steps[steps.index("2") :] == ["2", "2.reveal", "3", "3.reveal", "final"]
    for delivery in reveals:
        answer = json.loads(str(delivery.reply.content.config_records[wire.SITE][wire.SECAGG]))
        assert ("advertisement" in answer) == (delivery.group != "3.reveal")
    # Round 3's sum, unmasked with keys dealt during round 2, is the plain weighted average.
    received = train_model(grid, "3")
    expected = plain_average(
        received, [stored_update(sites, site, 3) for site in sorted(sites.nodes.values())]
    )
    final = grid.deliveries[-1].arrays
    assert arrays_sha256(final) == results.per_round[2].model_sha256
    for name, value in expected.items():
        np.testing.assert_allclose(final[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_site_whose_dealt_ahead_keys_were_lost_makes_the_round_announced_anew(
    tmp_path: Path,
) -> None:
    settings = secure_study(num_server_rounds=2, min_sites=2)
    sites = consortium(tmp_path, settings)
    lost = sites.node_of("hospital-2")
    grid = FakeGrid(sites.contexts())
    original_push = grid.push_messages

    def push(messages: Any) -> Any:
        messages = list(messages)
        ids = list(original_push(messages))
        for message, message_id in zip(messages, ids, strict=True):
            if message.metadata.group_id == "1.reveal" and message.metadata.dst_node_id == lost:
                grid._replies.pop(message_id, None)  # its reveal and its round-2 keys are lost
        return ids

    grid.push_messages = push  # type: ignore[method-assign]
    results = run(grid, settings)
    assert results.status == "completed"
    assert sorted(results.per_round[1].participants) == sorted(sites.nodes.values())
    keys = {d.group for d in grid.deliveries if d.message_type == wire.SECAGG_KEYS}
    assert keys == {"1.keys", "2.keys"}


def test_a_coordinator_that_trains_one_site_on_another_model_after_keys_dealt_ahead_is_refused(
    tmp_path: Path,
) -> None:
    """Round 2's announcement was dealt during round 1 and names no model. The coordinator
    sends hospital-3 another model with round 2's train instruction (it would single out
    hospital-3's update in the sum). hospital-3 signs the model it got; the other sites
    check every statement before they reveal, and refuse: nothing of round 2 is unmasked."""
    settings = secure_study(num_server_rounds=2, min_sites=2)
    sites = consortium(tmp_path, settings)
    target = sites.node_of("hospital-3")

    def other_model(node: int, message: Message) -> Message:
        if node != target or message.metadata.group_id != "2":
            return message
        content = message.content
        arrays = {n: (a + 0.25).astype(a.dtype) for n, a in wire.record_to_arrays(content).items()}
        config = dict(content.config_records[wire.CONFIG])
        config[wire.MODEL_SHA256] = arrays_sha256(arrays)
        forged = Message(
            RecordDict(
                {
                    wire.ARRAYS: wire.arrays_to_record(arrays, packed=True),
                    wire.CONFIG: ConfigRecord(config),
                }
            ),
            dst_node_id=node,
            message_type="train",
            group_id="2",
        )
        forged.metadata.__dict__["_message_id"] = message.metadata.message_id
        return forged

    grid = FakeGrid(sites.contexts(), in_transit=other_model)
    with pytest.raises(RoundFailedError, match=r"round 2: secure aggregation aborted") as failure:
        run(grid, settings, Reports())
    assert "did not state that it trained from the model this site received" in str(failure.value)
    # Every site trained in round 2 (hospital-3 on the other model) and sent its update
    # masked; every site refused to reveal, so nothing of round 2 was unmasked.
    assert {d.node for d in grid.deliveries if d.group == "2"} == set(sites.nodes)
    reveals = [d for d in grid.deliveries if d.group == "2.reveal"]
    assert len(reveals) == 3 and all(d.reply.has_error() for d in reveals)
