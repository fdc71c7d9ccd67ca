"""run_study end to end in-process: the real round loop, over a fake Grid, against the real
ClientApp handlers of demo sites (synthetic table, keys, site.toml, the officer's approval
of the study, privacy ledger) that live in tmp_path."""

from __future__ import annotations

import itertools
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Context, Error, Message, MessageType, RecordDict

from medfed.client import client_app
from medfed.client.config import SITE_TOML
from medfed.client.errors import DATA_REASON
from medfed.consortium import DemoSite, approve
from medfed.coordinator.errors import RoundFailedError
from medfed.coordinator.results import RunResults
from medfed.coordinator.rounds import run_study
from medfed.coordinator.study import StudySettings
from medfed.model import wire
from medfed.model.contract import DEMO_CONTRACT as CONTRACT
from medfed.model.network import arrays_sha256, build_model, state_arrays
from medfed.privacy import release
from medfed.privacy.ledger import PrivacyLedger
from tests.reference_table import SiteTable
from tests.references import dp_accounting_epsilon
from tests.sitekit import (
    POLICY,
    break_table,
    ledger_of,
    node_context,
    officer_of,
    table_of,
    table_path,
    training_records,
    unit_of,
    write_sites,
)

pytestmark = pytest.mark.usefixtures("server_identity")

RUN_ID = "run-integration"
DELTA = 1e-5
HANDLERS: Mapping[str, Callable[[Message, Context], Message]] = {
    MessageType.TRAIN: client_app.train,
    MessageType.EVALUATE: client_app.evaluate,
    wire.SECAGG_KEYS: client_app.secagg_keys,
    wire.SECAGG_REVEAL: client_app.secagg_reveal,
}

Arrays = dict[str, np.ndarray]
InTransit = Callable[[int, Message], Message]


@dataclass
class Delivery:
    """One instruction as a site received it, and the site's reply."""

    node: int
    message_type: str
    group: str
    arrays: Arrays
    reply: Message


@dataclass
class FakeGrid:
    """A Grid in memory: each pushed instruction goes straight to its node's ClientApp handler.

    `in_transit` may replace a message on its way to a node; nodes in `silent` get their
    instructions but their replies never arrive.
    """

    contexts: Mapping[int, Context]
    in_transit: InTransit | None = None
    silent: frozenset[int] = frozenset()
    deliveries: list[Delivery] = field(default_factory=list)
    pushed: int = 0
    _replies: dict[str, Message] = field(default_factory=dict)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            self.pushed += 1
            message.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's InMemoryGrid
            node = message.metadata.dst_node_id
            handler = HANDLERS.get(message.metadata.message_type)
            if handler is None:
                # As Flower answers a message type the ClientApp registers no function for
                # (the status query, until the site side answers it).
                reply = Message(Error(code=0, reason="no handler"), reply_to=message)
                self._replies[message.metadata.message_id] = reply
                ids.append(message.metadata.message_id)
                continue
            delivered = self.in_transit(node, message) if self.in_transit else message
            reply = handler(delivered, self.contexts[node])
            self.deliveries.append(
                Delivery(
                    node,
                    message.metadata.message_type,
                    message.metadata.group_id,
                    wire.record_to_arrays(delivered.content)
                    if wire.ARRAYS in delivered.content.array_records
                    else {},
                    reply,
                )
            )
            if node not in self.silent:
                self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def train_deliveries(self, group: int) -> list[Delivery]:
        return [
            d
            for d in self.deliveries
            if d.message_type == MessageType.TRAIN and d.group == str(group)
        ]

    def final_deliveries(self) -> list[Delivery]:
        return [d for d in self.deliveries if d.message_type == MessageType.EVALUATE]


# --- setting up a consortium ------------------------------------------------------------------


@dataclass(frozen=True)
class Consortium:
    root: Path
    nodes: dict[int, str]  # node id -> site id
    sites: dict[str, DemoSite]

    def site_toml(self, site: str) -> Path:
        return self.sites[site].site_toml

    def node_of(self, site: str) -> int:
        return next(node for node, name in self.nodes.items() if name == site)

    def table(self, site: str) -> SiteTable:
        return table_of(self.site_toml(site))

    def table_path(self, site: str) -> Path:
        return table_path(self.site_toml(site))

    def contexts(self) -> dict[int, Context]:
        """Each SuperNode names its site.toml in its node config."""
        return {
            node: node_context(node, {"site-config": str(self.site_toml(site))})
            for node, site in self.nodes.items()
        }

    def simulation_contexts(self, settings: StudySettings) -> dict[int, Context]:
        """Flower's simulation: virtual nodes know only their partition; the run config
        names the folder that holds every site."""
        run_config = {**settings.to_run_config(), "sites-root": str(self.root)}
        return {
            node: node_context(
                node,
                {
                    "partition-id": int(site.removeprefix("hospital-")) - 1,
                    "num-partitions": len(self.nodes),
                },
                run_config,
            )
            for node, site in self.nodes.items()
        }

    def ledger(self, site: str) -> PrivacyLedger:
        return ledger_of(self.site_toml(site))


def consortium(tmp_path: Path, settings: StudySettings, n_sites: int = 3) -> Consortium:
    """Demo sites under tmp_path, each with `settings` approved at its target epsilon."""
    sites = write_sites(tmp_path, settings, n_sites=n_sites, seed=21)
    # Node ids as a SuperLink hands them out: large and unordered.
    return Consortium(
        tmp_path,
        {7_000 + 13 * (n_sites - i): s.site_id for i, s in enumerate(sites)},
        {s.site_id: s for s in sites},
    )


TARGET_EPSILON = 2.0


def study(**changes: Any) -> StudySettings:
    config = {
        "study-name": "integration",
        "num-server-rounds": 3,
        "local-steps": 5,
        "learning-rate": 0.1,
        "target-epsilon": TARGET_EPSILON,
        "max-grad-norm": 1.0,
        "delta": DELTA,
        "sample-rate": 0.1,
        "min-sites": 3,
        "round-timeout-s": 30.0,
        "seed": 7,
        # These tests check each site's plain update; secure rounds have their own file.
        "secure-aggregation": False,
    }
    config.update({key.replace("_", "-"): value for key, value in changes.items()})
    return StudySettings.from_run_config(config)


class Reports:
    """Snapshots of every report run_study makes."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, object]] = []

    def __call__(self, results: RunResults) -> None:
        self.snapshots.append(results.to_json())

    @property
    def statuses(self) -> list[object]:
        return [snapshot["status"] for snapshot in self.snapshots]


def run(grid: FakeGrid, settings: StudySettings, reports: Reports | None = None) -> RunResults:
    return run_study(
        grid,  # type: ignore[arg-type]
        settings,
        CONTRACT,
        run_id=RUN_ID,
        report=reports if reports is not None else Reports(),
        connect_timeout_s=5.0,
    )


# --- independent references -------------------------------------------------------------------


def metric(reply: Message, key: str, kind: type[Any]) -> Any:
    return wire.get_value(reply.content, wire.METRICS, key, kind)


def reference_fedavg(deliveries: Sequence[Delivery]) -> Arrays:
    """Plain weighted mean of the sites' replied arrays, in float64."""
    weights = [metric(d.reply, wire.NUM_EXAMPLES, int) for d in deliveries]
    arrays = [wire.record_to_arrays(d.reply.content) for d in deliveries]
    return {
        name: sum(a[name].astype(np.float64) * w for a, w in zip(arrays, weights, strict=True))
        / sum(weights)
        for name in arrays[0]
    }


reference_epsilon = dp_accounting_epsilon


def weighted(pairs: Iterable[tuple[float, int]]) -> float:
    pairs = [(value, weight) for value, weight in pairs if np.isfinite(value) and weight > 0]
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)


def assert_arrays_close(actual: Arrays, expected: Arrays) -> None:
    assert actual.keys() == expected.keys()
    for name in actual:
        assert actual[name].dtype == np.float32
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=name)


# --- the tests --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_study_runs_every_round_with_every_site(tmp_path: Path) -> None:
    settings = study()
    sites = consortium(tmp_path, settings)
    grid = FakeGrid(sites.contexts())
    reports = Reports()

    results = run(grid, settings, reports)

    # Every round, every site took part and no reply was rejected.
    assert results.status == "completed"
    assert results.rounds_completed == 3
    assert results.sites == sorted(sites.nodes.values())
    for record in results.per_round:
        assert record.participants == sorted(sites.nodes.values())
        assert record.rejected == {}
    assert all(not d.reply.has_error() for d in grid.deliveries)
    assert reports.statuses[0] == "waiting"
    assert reports.statuses[-1] == "completed"
    assert [s["rounds_completed"] for s in reports.snapshots[1:4]] == [1, 2, 3]

    # Round 1 starts from the study's seeded model; each later round from fedavg of the last.
    initial = state_arrays(build_model("tiny", contract=CONTRACT, seed=7))
    for delivery in grid.train_deliveries(1):
        assert arrays_sha256(delivery.arrays) == arrays_sha256(initial)
    for round_number in (2, 3):
        expected = reference_fedavg(grid.train_deliveries(round_number - 1))
        for delivery in grid.train_deliveries(round_number):
            assert_arrays_close(delivery.arrays, expected)
        assert results.per_round[round_number - 2].model_sha256 == arrays_sha256(
            grid.train_deliveries(round_number)[0].arrays
        )

    # The final global model is fedavg of the last round's site arrays.
    final = grid.final_deliveries()
    assert sorted(d.node for d in final) == sorted(sites.nodes)
    expected_final = reference_fedavg(grid.train_deliveries(3))
    for delivery in final:
        assert_arrays_close(delivery.arrays, expected_final)
    assert results.per_round[-1].model_sha256 == arrays_sha256(final[0].arrays)

    # Each site's weight is its own count of training patients, as the site releases it:
    # DP-noised (Gaussian, the policy's count_noise_std, 10 by default), so within 6 std.
    for delivery in grid.train_deliveries(1):
        table = sites.table(sites.nodes[delivery.node])
        weight = metric(delivery.reply, wire.NUM_EXAMPLES, int)
        assert abs(weight - len(table.train_labels)) <= 60

    # The held-out AUROC and the training loss are pooled over all sites' patients from
    # the noised sufficient statistics each site released (summed vectors): checked here
    # pair by pair of score bins, and as summed clipped losses over summed counts.
    def summed(deliveries: Sequence[Delivery]) -> np.ndarray:
        vectors = [metric(d.reply, wire.EVAL_STATS, list) for d in deliveries]
        assert all(len(v) == release.WIDTH for v in vectors)
        return np.sum(np.asarray(vectors, dtype=np.float64), axis=0)

    def auroc_of(deliveries: Sequence[Delivery]) -> float:
        total = summed(deliveries)
        pos = np.clip(total[release.POSITIVES], 0, None)
        neg = np.clip(total[release.NEGATIVES], 0, None)
        pairs = sum(
            pos[i] * neg[j] * (1.0 if i > j else 0.5 if i == j else 0.0)
            for i in range(release.BINS)
            for j in range(release.BINS)
        )
        return float(pairs / (pos.sum() * neg.sum()))

    assert results.initial_metric == pytest.approx(auroc_of(grid.train_deliveries(1)))
    assert results.per_round[0].metric == pytest.approx(auroc_of(grid.train_deliveries(2)))
    assert results.per_round[2].metric == pytest.approx(auroc_of(final))
    # Each pooled AUROC comes with its 95% interval, and each site's with its own.
    for record in results.per_round:
        assert record.metric_ci is not None and record.metric is not None
        assert record.metric_ci[0] <= record.metric <= record.metric_ci[1]
        assert sorted(record.metric_ci_by_site) == sorted(sites.nodes.values())

    def loss_of(deliveries: Sequence[Delivery]) -> float:
        total = summed(deliveries)
        mean = total[release.TRAIN_LOSS] * release.LOSS_CLIP / total[release.TRAIN_COUNT]
        return float(min(max(mean, 0.0), release.LOSS_CLIP))

    # A round's loss is the new global model's, as the sites report it when they next
    # receive it; its local loss is the mean DP-SGD loss of the round itself.
    assert results.initial_loss == pytest.approx(loss_of(grid.train_deliveries(1)))
    assert results.per_round[0].loss == pytest.approx(loss_of(grid.train_deliveries(2)))
    assert results.per_round[2].loss == pytest.approx(loss_of(final))
    assert results.per_round[0].local_loss == pytest.approx(
        weighted(
            (metric(d.reply, wire.LOCAL_LOSS, float), metric(d.reply, wire.NUM_EXAMPLES, int))
            for d in grid.train_deliveries(1)
        )
    )


@pytest.mark.slow
def test_epsilon_per_site_grows_each_round_and_matches_its_ledger(tmp_path: Path) -> None:
    settings = study(min_sites=2)
    sites = consortium(tmp_path, settings, n_sites=2)
    grid = FakeGrid(sites.contexts())

    results = run(grid, settings)

    for site in sites.nodes.values():
        epsilons = [record.epsilon_by_site[site] for record in results.per_round]
        assert all(a < b for a, b in itertools.pairwise(epsilons)), epsilons

        unit = unit_of(sites.site_toml(site))
        ledger = sites.ledger(site)
        rows = training_records(ledger)
        assert [(r.study, r.run_id, r.round, r.event.steps) for r in rows] == [
            (f"{settings.name}@{settings.sha256()}", RUN_ID, k, 5) for k in (1, 2, 3)
        ]
        every = ledger.records()
        assert {r.dataset for r in every} == {unit}  # nothing spent on any other unit
        assert epsilons[-1] < ledger.epsilon(unit, delta=DELTA)  # the unit's adds the count
        # The reference composes the study's events: each round's DP-SGD spend and its
        # metrics' release, with the noise the site chose.
        for k, epsilon in enumerate(epsilons, start=1):
            upto = [r.event for r in every if "@" in r.study and r.round <= k]
            assert epsilon == pytest.approx(reference_epsilon(upto, DELTA), rel=1e-3)


@pytest.mark.slow
def test_each_site_reports_the_noise_it_recorded_and_ends_at_the_target(tmp_path: Path) -> None:
    settings = study(min_sites=2)
    sites = consortium(tmp_path, settings, n_sites=2)
    grid = FakeGrid(sites.contexts())

    results = run(grid, settings)

    for node, site in sites.nodes.items():
        rows = training_records(sites.ledger(site))
        assert [row.round for row in rows] == [1, 2, 3]
        for record, row in zip(results.per_round, rows, strict=True):
            (delivery,) = [d for d in grid.train_deliveries(record.round) if d.node == node]
            replied = metric(delivery.reply, wire.NOISE_MULTIPLIER, float)
            assert record.noise_by_site[site] == replied == row.event.noise_multiplier
            assert replied >= POLICY.min_noise_multiplier
        # Calibrated over the planned rounds: the study (its rounds and their metrics'
        # releases) ends within 5% below the target; the site's total adds its count.
        study_events = [r.event for r in sites.ledger(site).records() if "@" in r.study]
        spent = reference_epsilon(study_events, DELTA)
        assert 0.95 * settings.target_epsilon <= spent <= settings.target_epsilon * 1.005
        final = results.per_round[-1].epsilon_by_site[site]
        assert final == pytest.approx(spent, rel=1e-3)


def test_a_simulation_finds_each_site_by_its_partition(tmp_path: Path) -> None:
    settings = study(num_server_rounds=1, min_sites=3)
    sites = consortium(tmp_path, settings)
    grid = FakeGrid(sites.simulation_contexts(settings))

    results = run(grid, settings)

    (record,) = results.per_round
    assert record.participants == ["hospital-1", "hospital-2", "hospital-3"]
    assert record.rejected == {}
    for delivery in grid.train_deliveries(1):
        site = sites.nodes[delivery.node]
        assert wire.get_value(delivery.reply.content, wire.SITE, wire.SITE_ID, str) == site
        table = sites.table(site)
        # The patient count leaves noised (standard deviation 10).
        assert abs(metric(delivery.reply, wire.NUM_EXAMPLES, int) - len(table.train_labels)) < 60
        (row,) = training_records(sites.ledger(site))
        assert row.dataset == unit_of(sites.site_toml(site))
        assert record.noise_by_site[site] == row.event.noise_multiplier


def test_a_site_out_of_budget_is_rejected_and_the_study_goes_on(tmp_path: Path) -> None:
    settings = study(num_server_rounds=2, min_sites=2)
    sites = consortium(tmp_path, settings)
    # Its officer's newest approval of the study is far below what a round would spend.
    stingy = sites.sites["hospital-3"]
    approve(stingy.site_toml, settings, epsilon=0.01, officer_key=officer_of(stingy))
    stingy_node = sites.node_of("hospital-3")
    grid = FakeGrid(sites.contexts())

    results = run(grid, settings)

    assert results.status == "completed"
    for record in results.per_round:
        assert record.participants == ["hospital-1", "hospital-2"]
        reason = record.rejected[f"node-{stingy_node}"]
        assert reason.startswith("site replied with an error: hospital-3: out of budget: ")
        assert "hospital-3" not in record.epsilon_by_site
        assert "hospital-3" not in record.noise_by_site
    for delivery in grid.train_deliveries(1) + grid.train_deliveries(2):
        if delivery.node == stingy_node:
            assert delivery.reply.error.code == client_app.ERROR_CODE_OUT_OF_BUDGET
    assert training_records(sites.ledger("hospital-3")) == []


def test_a_site_with_a_bad_row_is_rejected_and_the_study_goes_on(tmp_path: Path) -> None:
    settings = study(num_server_rounds=2, min_sites=2)
    sites = consortium(tmp_path, settings)
    table_path = sites.table_path("hospital-2")
    break_table(table_path, 6, "age", "sixty")
    broken_node = sites.node_of("hospital-2")
    grid = FakeGrid(sites.contexts())

    results = run(grid, settings)

    assert results.status == "completed"
    assert results.sites == ["hospital-1", "hospital-3"]
    # The lead reads that the data does not meet the contract; the value and the site's
    # path stay at the site (red-team row 2: they reached results.json and the chain).
    for record in results.per_round:
        assert record.participants == ["hospital-1", "hospital-3"]
        assert list(record.rejected) == [f"node-{broken_node}"]
        reason = record.rejected[f"node-{broken_node}"]
        assert DATA_REASON in reason
        assert "sixty" not in reason and str(tmp_path) not in reason
        assert "hospital-2" not in record.epsilon_by_site
    assert "sixty" not in repr(results) and str(table_path) not in repr(results)
    for delivery in grid.deliveries:
        if delivery.node == broken_node:
            assert delivery.reply.has_error()
            assert delivery.reply.error.code == client_app.ERROR_CODE_REFUSED
    assert training_records(sites.ledger("hospital-2")) == []  # it spent nothing
    # The final evaluation goes on without it too: the AUROC of the other sites'
    # noised score histograms, summed (tests/unit/privacy checks that against sklearn).
    final = [d for d in grid.final_deliveries() if d.node != broken_node]
    vectors = [d.reply.content.metric_records[wire.METRICS][wire.EVAL_STATS] for d in final]
    assert results.per_round[-1].metric == pytest.approx(release.pooled_auroc(vectors))


def test_too_few_valid_sites_fail_the_round(tmp_path: Path) -> None:
    settings = study(min_sites=3)
    sites = consortium(tmp_path, settings)
    table_path = sites.table_path("hospital-1")
    break_table(table_path, 3, "readmitted_30d", "2")
    reports = Reports()

    with pytest.raises(RoundFailedError) as caught:
        run(FakeGrid(sites.contexts()), settings, reports)

    message = str(caught.value)
    assert message.startswith("round 1: 2 valid replies of 3 sites, the study needs 3")
    # The lead reads the data category; the file, row and value stay at the site.
    assert DATA_REASON in message and str(table_path) not in message
    assert reports.statuses[-1] == "failed"
    assert reports.snapshots[-1]["error"] == message
    assert reports.snapshots[-1]["rounds_completed"] == 0


def test_a_model_altered_in_transit_is_refused_by_its_site(tmp_path: Path) -> None:
    settings = study(num_server_rounds=2, min_sites=2)
    sites = consortium(tmp_path, settings)
    victim = sites.node_of("hospital-3")

    def alter_one_value(node: int, message: Message) -> Message:
        if node != victim:
            return message
        arrays = wire.record_to_arrays(message.content)
        arrays["heads.readmission.bias"] = arrays["heads.readmission.bias"] + np.float32(0.25)
        content = RecordDict(
            {
                wire.ARRAYS: wire.arrays_to_record(arrays),
                wire.CONFIG: message.content.config_records[wire.CONFIG],
            }
        )
        return Message(content=content, metadata=message.metadata)

    grid = FakeGrid(sites.contexts(), in_transit=alter_one_value)
    results = run(grid, settings)

    assert results.status == "completed"
    for record in results.per_round:
        assert record.participants == ["hospital-1", "hospital-2"]
        reason = record.rejected[f"node-{victim}"]
        assert reason.startswith("site replied with an error: hospital-3: ")
        assert "does not match its announced digest" in reason
    assert training_records(sites.ledger("hospital-3")) == []
    # The others trained on the untouched model.
    assert all(not d.reply.has_error() for d in grid.deliveries if d.node != victim)


def test_a_second_reply_for_the_same_site_is_rejected(tmp_path: Path) -> None:
    settings = study(num_server_rounds=1, min_sites=2)
    sites = consortium(tmp_path, settings, n_sites=2)
    # A copy of hospital-1 (its site.toml, keys, table and approval) on another node.
    impostor_dir = tmp_path / "impostor"
    shutil.copytree(sites.site_toml("hospital-1").parent, impostor_dir)
    contexts = sites.contexts()
    impostor = max(contexts) + 1
    contexts[impostor] = node_context(impostor, {"site-config": str(impostor_dir / SITE_TOML)})

    grid = FakeGrid(contexts)
    results = run(grid, settings)

    (record,) = results.per_round
    assert record.participants == ["hospital-1", "hospital-2"]
    assert record.rejected == {"hospital-1": "a second reply from the same site in one round"}
    # The impostor's reply was a real update, not a refusal: the coordinator caught it.
    assert all(not d.reply.has_error() for d in grid.train_deliveries(1))


def test_a_silent_site_is_left_out_after_the_round_timeout(tmp_path: Path) -> None:
    settings = study(num_server_rounds=1, min_sites=2, round_timeout_s=0.3)
    sites = consortium(tmp_path, settings)
    silent = sites.node_of("hospital-1")
    grid = FakeGrid(sites.contexts(), silent=frozenset({silent}))

    started = time.monotonic()
    results = run(grid, settings)
    elapsed = time.monotonic() - started

    assert results.status == "completed"
    assert results.per_round[0].participants == ["hospital-2", "hospital-3"]
    # A straggler is dropped from the round, and the round says so.
    assert results.per_round[0].rejected == {
        f"node-{silent}": "no reply within the 0.3 s deadline (dropped)"
    }
    assert elapsed >= 0.6  # one wait in the round, one in the final evaluation


def test_too_few_connected_sites_fail_after_the_connect_timeout(tmp_path: Path) -> None:
    settings = study(min_sites=2)
    sites = consortium(tmp_path, settings, n_sites=1)
    grid = FakeGrid(sites.contexts())
    reports = Reports()

    started = time.monotonic()
    with pytest.raises(
        RoundFailedError, match=r"only 1 of the 2 sites needed connected within 0\.2 s"
    ):
        run_study(
            grid,  # type: ignore[arg-type]
            settings,
            CONTRACT,
            run_id=RUN_ID,
            report=reports,
            connect_timeout_s=0.2,
        )
    elapsed = time.monotonic() - started

    assert 0.2 <= elapsed < 3.0
    assert grid.pushed == 0
    assert reports.statuses == ["waiting", "failed"]


class BrokenGrid:
    """A grid whose SuperLink connection breaks: every call raises."""

    def get_node_ids(self) -> list[int]:
        raise ConnectionError("SuperLink went away")


def test_an_unexpected_error_marks_the_run_failed_before_it_propagates() -> None:
    reports = Reports()
    with pytest.raises(ConnectionError):
        run_study(
            BrokenGrid(),  # type: ignore[arg-type]
            study(),
            CONTRACT,
            run_id=RUN_ID,
            report=reports,
            connect_timeout_s=1.0,
        )
    assert reports.statuses[-1] == "failed"
    error = str(reports.snapshots[-1]["error"])
    assert "internal error" in error and "SuperLink went away" in error
