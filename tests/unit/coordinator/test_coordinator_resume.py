"""The round loop with deterministic fake sites over an in-memory Grid: a run killed
mid-round and resumed ends with the same model as an uninterrupted one; the audit chain
verifies after it and names an edited entry; the scheduler's wait, a straggler, the norm
bound and modality-aware averaging as the loop applies them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message, MessageType

from medfed.coordinator.audit_chain import AUDIT_NAME, PUBLIC_KEY_NAME
from medfed.coordinator.checkpoints import CHECKPOINTS_NAME, CheckpointStore
from medfed.coordinator.errors import CheckpointError
from medfed.model import wire
from medfed.model.network import arrays_sha256
from medfed.privacy.audit import verify_audit_log
from medfed.privacy.signing import VerifyKey
from tests.fakesites import NOW, FakeClock, FakeGrid, FakeSite, Killed, consortium, run, study

pytestmark = pytest.mark.usefixtures("server_identity")

Arrays = dict[str, np.ndarray]


def assert_same(a: Arrays, b: Arrays) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def audit_entries(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / AUDIT_NAME).read_text().splitlines()]


@pytest.mark.parametrize("kill_round", [1, 3])
def test_a_run_killed_mid_round_and_resumed_ends_with_the_uninterrupted_model(
    tmp_path: Path, kill_round: int
) -> None:
    reference_grid = FakeGrid(consortium())
    run(reference_grid, study(tmp_path / "reference"))

    run_dir = tmp_path / "killed"
    killed = FakeGrid(consortium(), kill_at=(MessageType.TRAIN, str(kill_round)))
    with pytest.raises(Killed):
        run(killed, study(run_dir))
    assert CheckpointStore(run_dir / CHECKPOINTS_NAME).rounds() == list(range(kill_round))

    resumed_grid = FakeGrid(consortium())
    results = run(resumed_grid, study(run_dir, resume=True), run_id="flower-run-2")

    assert results.status == "completed"
    assert results.run_id == "run-1"  # the run keeps its id: sites see the same (run, round)
    assert results.resumed_from == [kill_round - 1]
    assert [r.round for r in results.per_round] == [1, 2, 3, 4]
    assert_same(resumed_grid.final_model(), reference_grid.final_model())
    # The coordinator's RNG came back too: the resumed rounds were sent the same seeds.
    assert killed.seeds() + resumed_grid.seeds() == reference_grid.seeds()
    last = CheckpointStore(run_dir / CHECKPOINTS_NAME).load()
    assert last is not None and last.round == 4
    assert_same(last.arrays, reference_grid.final_model())

    # The chain verifies across the kill, and records the resumption.
    public = VerifyKey.load(run_dir / PUBLIC_KEY_NAME)
    verification = verify_audit_log(run_dir / AUDIT_NAME, public)
    assert verification.ok, verification.first_bad
    events = [entry["event"] for entry in audit_entries(run_dir)]
    assert events[0] == "run.started"
    assert events.count("run.resumed") == 1
    assert events[-1] == "run.finished"
    assert events.count("round.aggregated") == 4


def test_an_edited_deleted_or_reordered_audit_entry_is_named(tmp_path: Path) -> None:
    run(FakeGrid(consortium()), study(tmp_path, num_server_rounds=2))
    path, public = tmp_path / AUDIT_NAME, VerifyKey.load(tmp_path / PUBLIC_KEY_NAME)
    lines = path.read_bytes().split(b"\n")[:-1]
    aggregated = next(i for i, line in enumerate(lines) if b'"round.aggregated"' in line)

    edited = list(lines)
    edited[aggregated] = edited[aggregated].replace(b'"round":1', b'"round":7')
    path.write_bytes(b"\n".join(edited) + b"\n")
    bad = verify_audit_log(path, public).first_bad
    assert bad is not None and bad[0] == aggregated + 1 and "signature" in bad[1]

    path.write_bytes(b"\n".join(lines[:3] + lines[4:]) + b"\n")
    bad = verify_audit_log(path, public).first_bad
    assert bad is not None and bad[0] == 4

    path.write_bytes(b"\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + b"\n")
    bad = verify_audit_log(path, public).first_bad
    assert bad is not None and bad[0] == 2


def test_checkpoints_carry_the_lineage_of_their_model(tmp_path: Path) -> None:
    run(FakeGrid(consortium()), study(tmp_path, num_server_rounds=2), clock=FakeClock().clock())

    last = CheckpointStore(tmp_path / CHECKPOINTS_NAME).load()
    assert last is not None
    lineage = last.state["lineage"]
    assert lineage["run_id"] == "run-1"
    assert lineage["study_sha256"] == study(tmp_path, num_server_rounds=2).sha256()
    assert [r["round"] for r in lineage["rounds"]] == [1, 2]
    assert lineage["rounds"][-1]["model_sha256"] == arrays_sha256(last.arrays)
    assert lineage["sites"]["hospital-2"] == {
        "datasets": ["dhospital-2"],
        "rounds": [1, 2],
        "epsilon": pytest.approx(0.2),
        "delta": 1e-5,
    }
    # The strategy's server optimiser state is in the checkpoint, one moment per array.
    assert {k.split("/", 1)[0] for k in last.strategy_state} == {"m", "v"}


def test_a_run_folder_is_not_reused_for_a_new_run_and_resume_checks_the_study(
    tmp_path: Path,
) -> None:
    run(FakeGrid(consortium()), study(tmp_path, num_server_rounds=1))

    with pytest.raises(CheckpointError, match="already holds run run-1"):
        run(FakeGrid(consortium()), study(tmp_path, num_server_rounds=1))
    with pytest.raises(CheckpointError, match="another study"):
        run(FakeGrid(consortium()), study(tmp_path, num_server_rounds=2, resume=True))
    with pytest.raises(CheckpointError, match="nothing to resume"):
        run(FakeGrid(consortium()), study(tmp_path / "empty", resume=True))


def test_the_loop_waits_for_windows_then_sizes_steps_by_throughput(tmp_path: Path) -> None:
    # Only hospital-2 is in its window; hospital-3's opens in an hour.
    sites = consortium(
        **{"9001": {"status": {wire.IN_WINDOW: 0, wire.NEXT_WINDOW_START: NOW + 7200}},
           "9003": {"status": {wire.IN_WINDOW: 0, wire.NEXT_WINDOW_START: NOW + 3600,
                               wire.THROUGHPUT: 4.0}}}
    )  # fmt: skip
    fake = FakeClock()
    statuses_by_time: list[float] = []

    def opening_query(message: Message, site: FakeSite = sites[9003]) -> Message:
        statuses_by_time.append(fake.now_s)
        if fake.now_s >= NOW + 3600:
            site.status = {wire.THROUGHPUT: 4.0}
        return FakeSite.query(site, message)

    sites[9003].query = opening_query  # type: ignore[method-assign]
    grid = FakeGrid(sites)

    results = run(grid, study(tmp_path, num_server_rounds=1), clock=fake.clock())

    assert results.status == "completed"
    assert fake.now_s == pytest.approx(NOW + 3600)  # slept until the ETA, in 60 s naps
    assert max(fake.sleeps) <= 60.0
    (record,) = results.per_round
    assert record.participants == ["hospital-2", "hospital-3"]
    assert record.refused == {"hospital-1": "outside its training window"}
    # 0.1 * 80 = 8 samples a step at 4 samples/s: 2 s a step, 4 s of a 5 s deadline: 2 steps.
    assert record.local_steps_by_site == {"hospital-2": 6, "hospital-3": 2}
    events = [entry["event"] for entry in audit_entries(tmp_path)]
    assert len(fake.sleeps) == 60  # an hour in one-minute naps, asking the sites each time
    assert events.count("round.waiting") == 1  # the same wait is written once
    assert "site.refused" in events


def test_a_straggler_is_dropped_and_a_poisoned_update_is_clipped_and_flagged(
    tmp_path: Path,
) -> None:
    # Honest updates have a norm near 4 here; hospital-3's is scaled x100.
    sites = consortium(**{"9001": {"silent": True, "status": {}}, "9003": {"scale": 100.0}})
    settings = study(tmp_path, num_server_rounds=1, round_timeout_s=0.3,
                     strategy="fedavg", update_norm_bound=10.0)  # fmt: skip

    results = run(FakeGrid(sites), settings)

    (record,) = results.per_round
    assert record.participants == ["hospital-2", "hospital-3"]
    assert record.rejected == {"hospital-1": "no reply within the 0.3 s deadline (dropped)"}
    assert list(record.clipped) == ["hospital-3"]
    flagged = [e for e in audit_entries(tmp_path) if e["event"] == "update.clipped"]
    assert [e["details"]["site"] for e in flagged] == ["hospital-3"]


def test_a_site_without_a_group_leaves_it_to_the_others(tmp_path: Path) -> None:
    sites = consortium(**{"9002": {"trained_groups": "fusion,heads.readmission"}})
    grid = FakeGrid(sites)

    run(grid, study(None, num_server_rounds=1, strategy="fedavg"))

    replies = {}
    for node, site in sites.items():
        (message,) = [m for m in grid.sent if m.metadata.dst_node_id == node
                      and m.metadata.message_type == MessageType.TRAIN]  # fmt: skip
        replies[site.site_id] = wire.record_to_arrays(site.train(message).content)
    final = grid.final_model()
    for name in final:
        takers = ["hospital-1", "hospital-3"] if name.startswith("encoders.") else list(replies)
        weights = {s.site_id: s.patients for s in sites.values() if s.site_id in takers}
        expected = sum(replies[s][name].astype(np.float64) * w for s, w in weights.items())
        expected = expected / sum(weights.values())
        np.testing.assert_allclose(final[name], expected, rtol=1e-6, err_msg=name)


def test_a_site_that_cannot_answer_the_status_query_is_asked_once(tmp_path: Path) -> None:
    grid = FakeGrid(consortium())  # hospital-1 answers queries with an error

    run(grid, study(None, num_server_rounds=3, strategy="fedavg"))

    queried = [
        m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == MessageType.QUERY
    ]
    assert queried.count(9001) == 1
    assert queried.count(9002) == queried.count(9003) == 3
    # It still trained every round, with the study's steps.
    trained = [
        m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == MessageType.TRAIN
    ]
    assert trained.count(9001) == 3


def test_fedprox_sends_its_mu_and_each_site_its_planned_steps_and_the_rounds_seed() -> None:
    grid = FakeGrid(consortium())

    run(grid, study(None, num_server_rounds=2, strategy="fedprox", proximal_mu=0.3))

    trains = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert len(trains) == 6
    for message in trains:
        config = message.content.config_records[wire.CONFIG]
        assert config[wire.PROXIMAL_MU] == 0.3
        assert config[wire.LOCAL_STEPS] == 6
    seeds = {m.metadata.group_id: set() for m in trains}  # type: dict[str, set[object]]
    for message in trains:
        seeds[message.metadata.group_id].add(message.content.config_records[wire.CONFIG][wire.SEED])
    assert all(len(values) == 1 for values in seeds.values())  # one seed per round
    assert seeds["1"] != seeds["2"]


def test_a_resume_the_server_app_refuses_marks_the_run_failed_keeping_its_rounds(
    tmp_path: Path,
) -> None:
    from flwr.app import Context, RecordDict

    from medfed.coordinator import server_app
    from medfed.coordinator.errors import CoordinatorError
    from medfed.coordinator.results import RoundRecord, RunResults, read_results, write_results

    stale = RunResults(run_id="run-1", status="running", num_rounds=4)
    stale.per_round.append(RoundRecord(round=1, participants=["hospital-2"]))
    write_results(tmp_path / "results.json", stale)
    config = {
        **study(tmp_path / "empty", resume=True).to_run_config(),
        "results-path": str(tmp_path / "results.json"),
    }
    context = Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config=config)

    with pytest.raises(CoordinatorError, match="nothing to resume"):
        server_app.main(FakeGrid(consortium()), context)  # type: ignore[arg-type]

    results = read_results(tmp_path / "results.json")
    assert results is not None and results.status == "failed"
    assert results.error is not None and "nothing to resume" in results.error
    assert [r.round for r in results.per_round] == [1]
