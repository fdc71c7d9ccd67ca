"""Deterministic fake sites over an in-memory Grid, for tests of the round loop that need
no training: each site's update is a seeded function of (site, round, seed, model), so
two runs given the same instructions get the same replies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from medfed.coordinator.results import RunResults
from medfed.coordinator.rounds import Clock, run_study
from medfed.coordinator.study import StudySettings
from medfed.model import wire
from medfed.model.contract import DEMO_CONTRACT as CONTRACT

Arrays = dict[str, np.ndarray]
NOW = 1_750_000_000.0


class Killed(BaseException):
    """What SIGKILL does to the coordinator: nothing after it runs (not even `except`)."""


@dataclass
class FakeSite:
    """A deterministic site: its update is a function of (site, round, seed, model)."""

    site_id: str
    patients: int
    status: dict[str, Any] | None = None  # None: answers the query with an error
    trained_groups: str | None = None
    scale: float = 1.0
    silent: bool = False

    def train(self, message: Message) -> Message:
        config = message.content.config_records[wire.CONFIG]
        arrays = wire.record_to_arrays(message.content)
        key = f"{self.site_id}/{config[wire.ROUND]}/{config[wire.SEED]}/{config[wire.MODEL_SHA256]}"
        rng = np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:12], 16))
        steps = int(config[wire.LOCAL_STEPS])  # type: ignore[arg-type]
        update = {
            name: (array + self.scale * 0.01 * steps * rng.normal(size=array.shape)).astype(
                np.float32
            )
            for name, array in arrays.items()
        }
        site: dict[str, Any] = {wire.SITE_ID: self.site_id, wire.DATASET_SHA256: "d" + self.site_id}
        if self.trained_groups is not None:
            site[wire.TRAINED_GROUPS] = self.trained_groups
        content = RecordDict(
            {
                wire.ARRAYS: wire.arrays_to_record(update),
                wire.SITE: ConfigRecord(site),
                wire.METRICS: MetricRecord(
                    {
                        **self._checks(arrays),
                        wire.EPSILON: 0.1 * int(config[wire.ROUND]),  # type: ignore[arg-type]
                        wire.NOISE_MULTIPLIER: 1.1,
                        wire.LOCAL_LOSS: 0.5,
                    }
                ),
            }
        )
        return Message(content, reply_to=message)

    def _checks(self, arrays: Arrays) -> dict[str, int | float]:
        level = float(np.mean([np.mean(np.abs(a)) for a in arrays.values()]))
        return {
            wire.NUM_EXAMPLES: self.patients,
            wire.EVAL_EXAMPLES: 10,
            wire.MODEL_TRAIN_LOSS: level,
            wire.EVAL_AUROC: 0.6,
            wire.EVAL_LOSS: level,
        }

    def evaluate(self, message: Message) -> Message:
        arrays = wire.record_to_arrays(message.content)
        content = RecordDict(
            {
                wire.SITE: ConfigRecord({wire.SITE_ID: self.site_id}),
                wire.METRICS: MetricRecord(self._checks(arrays)),  # type: ignore[arg-type]
            }
        )
        return Message(content, reply_to=message)

    def query(self, message: Message) -> Message:
        if self.status is None:
            return Message(Error(code=0, reason="no query function"), reply_to=message)
        content = RecordDict(
            {
                wire.SITE: ConfigRecord({wire.SITE_ID: self.site_id, wire.ACCELERATOR: "cpu"}),
                wire.METRICS: MetricRecord(
                    {
                        wire.IN_WINDOW: 1,
                        wire.WINDOW_ENDS: 0.0,
                        wire.NEXT_WINDOW_START: 0.0,
                        wire.THROUGHPUT: 1000.0,
                        wire.BUDGET_LEFT: 5.0,
                        wire.PATIENTS: self.patients,
                        **self.status,
                    }
                ),
            }
        )
        return Message(content, reply_to=message)


@dataclass
class FakeGrid:
    """An in-memory Grid over `FakeSite`s; `kill_at` = (message type, group) raises Killed
    when the first such message is pushed, as a coordinator killed mid-round."""

    sites: dict[int, FakeSite]
    kill_at: tuple[str, str] | None = None
    sent: list[Message] = field(default_factory=list)
    _replies: dict[str, Message] = field(default_factory=dict)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            kind, group = message.metadata.message_type, message.metadata.group_id
            if self.kill_at == (kind, group):
                raise Killed
            message.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent.append(message)
            site = self.sites[message.metadata.dst_node_id]
            handler = {
                MessageType.TRAIN: site.train,
                MessageType.EVALUATE: site.evaluate,
                MessageType.QUERY: site.query,
            }[kind]
            reply = handler(message)
            if not (site.silent and kind == MessageType.TRAIN):
                self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def final_model(self) -> Arrays:
        (message, *_) = [m for m in self.sent if m.metadata.group_id == "final"]
        return wire.record_to_arrays(message.content)

    def seeds(self) -> list[int]:
        return [
            int(m.content.config_records[wire.CONFIG][wire.SEED])  # type: ignore[arg-type]
            for m in self.sent
            if m.metadata.message_type == MessageType.TRAIN
        ]


def consortium(**changes: Any) -> dict[int, FakeSite]:
    sites = {
        9001: FakeSite("hospital-1", 120),
        9002: FakeSite("hospital-2", 300, status={}),
        9003: FakeSite("hospital-3", 80, status={wire.THROUGHPUT: 50.0}),
    }
    for node, site_changes in changes.items():
        for key, value in site_changes.items():
            setattr(sites[int(node)], key, value)
    return sites


def study(run_dir: Path | None, **changes: Any) -> StudySettings:
    config: dict[str, Any] = {
        "study-name": "resume",
        "num-server-rounds": 4,
        "local-steps": 6,
        "learning-rate": 0.1,
        "target-epsilon": 2.0,
        "max-grad-norm": 1.0,
        "delta": 1e-5,
        "sample-rate": 0.1,
        "min-sites": 2,
        "round-timeout-s": 5.0,
        "seed": 11,
        "strategy": "fedadam",
        "server-learning-rate": 0.05,
        "run-dir": "" if run_dir is None else str(run_dir),
        # Fake sites speak the plain protocol; secure rounds run against real handlers.
        "secure-aggregation": False,
    }
    config.update({key.replace("_", "-"): value for key, value in changes.items()})
    return StudySettings.from_run_config(config)


class FakeClock:
    def __init__(self) -> None:
        self.now_s = NOW
        self.sleeps: list[float] = []

    def clock(self) -> Clock:
        return Clock(now=lambda: self.now_s, sleep=self.sleep)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now_s += seconds


def run(
    grid: FakeGrid,
    settings: StudySettings,
    run_id: str = "run-1",
    *,
    clock: Clock | None = None,
    report: Any = None,
) -> RunResults:
    """run_study over `grid` with a fake clock; `report` receives every report."""
    return run_study(
        grid,  # type: ignore[arg-type]
        settings,
        CONTRACT,
        run_id=run_id,
        report=report or (lambda results: None),
        connect_timeout_s=2.0,
        clock=clock or FakeClock().clock(),
    )
