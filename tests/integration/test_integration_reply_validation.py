"""RELIABILITY.md's "malformed update", "oversized update", "poisoning" and "duplicate
or replay" rows through the real round loop over fake sites: each bad reply is rejected
with its reason (in the round's record and the audit chain), the round goes on with the
others, and the global model stays finite."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict

from medfed.coordinator.audit_chain import AUDIT_NAME
from medfed.model import wire
from medfed.model.network import arrays_sha256
from medfed.privacy.receipts import UpdateReceipt
from medfed.privacy.signing import SigningKey
from tests.fakesites import FakeGrid, FakeSite, consortium, run, study

pytestmark = pytest.mark.usefixtures("server_identity")

Tamper = Callable[[RecordDict], None]


@dataclass
class TamperingSite(FakeSite):
    """A fake site whose training reply is altered by `tamper` before it is sent."""

    tamper: Tamper | None = None

    def train(self, message: Message) -> Message:
        reply = super().train(message)
        if self.tamper is not None:
            self.tamper(reply.content)
        return reply


def _set_array(name: str, value: Callable[[np.ndarray], np.ndarray]) -> Tamper:
    def tamper(content: RecordDict) -> None:
        record = content.array_records[wire.ARRAYS]
        record[name] = Array.from_numpy_ndarray(value(record[name].numpy()))

    return tamper


def _drop_array(content: RecordDict) -> None:
    del content.array_records[wire.ARRAYS]["heads.readmission.bias"]


def _metric(key: str, value: int) -> Tamper:
    def tamper(content: RecordDict) -> None:
        content.metric_records[wire.METRICS][key] = value

    return tamper


def _oversize(content: RecordDict) -> None:
    # A 64 MiB blob of garbage: were it decoded, numpy would fail on it differently.
    content.array_records["padding"] = ArrayRecord()
    content.array_records["padding"]["blob"] = Array(
        dtype="float32", shape=(16 * 2**20,), stype="numpy.ndarray", data=b"\0" * (64 * 2**20)
    )


def _impersonate(content: RecordDict) -> None:
    content.config_records[wire.SITE][wire.SITE_ID] = "hospital-2"


BIAS = "heads.readmission.bias"
MALFORMED = [
    pytest.param(_set_array(BIAS, lambda a: np.zeros(a.size + 1, a.dtype)), "shape", id="shape"),
    pytest.param(_set_array(BIAS, lambda a: a.astype(np.float64)), "float64", id="float64"),
    pytest.param(_drop_array, "missing", id="missing-key"),
    pytest.param(_set_array(BIAS, lambda a: a * np.nan), "NaN or Inf", id="nan"),
    pytest.param(_set_array(BIAS, lambda a: a + np.inf), "NaN or Inf", id="inf"),
    pytest.param(_metric(wire.NUM_EXAMPLES, 0), "out of range", id="zero-count"),
    pytest.param(_metric(wire.NUM_EXAMPLES, 81), "patients the site reported", id="bogus-count"),
    pytest.param(_oversize, "oversized update", id="oversized"),
    pytest.param(_impersonate, "answered this round's status as 'hospital-3'", id="sender"),
]


def _audit(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / AUDIT_NAME).read_text().splitlines()]


@pytest.mark.parametrize(("tamper", "reason"), MALFORMED)
def test_a_malformed_reply_is_rejected_with_its_reason_and_the_round_goes_on(
    tmp_path: Path, tamper: Tamper, reason: str
) -> None:
    sites = consortium()
    bad = sites[9003]  # 80 patients, as its status says
    sites[9003] = TamperingSite(bad.site_id, bad.patients, status=bad.status, tamper=tamper)
    grid = FakeGrid(sites)

    results = run(grid, study(tmp_path, num_server_rounds=1, strategy="fedavg"))

    assert results.status == "completed"
    (record,) = results.per_round
    assert record.participants == ["hospital-1", "hospital-2"]
    assert list(record.rejected) == ["hospital-3"]
    assert reason in record.rejected["hospital-3"]
    assert all(np.isfinite(array).all() for array in grid.final_model().values())
    rejected = [e for e in _audit(tmp_path) if e["event"] == "update.rejected"]
    assert [(e["details"]["site"], reason in e["details"]["reason"]) for e in rejected] == [
        ("hospital-3", True)
    ]


def test_the_largest_honest_count_is_the_patients_the_site_reported(tmp_path: Path) -> None:
    sites = consortium()
    bad = sites[9003]
    sites[9003] = TamperingSite(bad.site_id, bad.patients, status=bad.status,
                                tamper=_metric(wire.NUM_EXAMPLES, 80))  # fmt: skip

    results = run(FakeGrid(sites), study(tmp_path, num_server_rounds=1, strategy="fedavg"))

    assert results.per_round[0].rejected == {}


@pytest.mark.parametrize("scale", [100.0, -100.0], ids=["scaled-x100", "sign-flipped-x100"])
def test_a_poisoned_update_is_capped_by_the_norm_bound_and_flagged(
    tmp_path: Path, scale: float
) -> None:
    # Honest updates have a norm near 4 here (see test_coordinator_resume); the bound is 10.
    sites = consortium(**{"9003": {"scale": scale}})
    grid = FakeGrid(sites)
    settings = study(tmp_path, num_server_rounds=1, strategy="fedavg", update_norm_bound=10.0)

    results = run(grid, settings)

    (record,) = results.per_round
    assert record.participants == ["hospital-1", "hospital-2", "hospital-3"]
    assert list(record.clipped) == ["hospital-3"]
    assert record.clipped["hospital-3"] > 100.0
    flagged = [e["details"] for e in _audit(tmp_path) if e["event"] == "update.clipped"]
    assert [(d["site"], d["bound"]) for d in flagged] == [("hospital-3", 10.0)]
    # FedAvg is a convex combination of updates each within the bound, so the model moves
    # by at most the bound; unclipped, hospital-3 alone would move it by 80/500 * ~400.
    sent = next(m for m in grid.sent if m.metadata.group_id == "1")
    before, after = wire.record_to_arrays(sent.content), grid.final_model()
    moved = sum(float(np.sum((after[n].astype(np.float64) - before[n]) ** 2)) for n in after)
    assert np.sqrt(moved) <= 10.0 + 1e-3


@dataclass
class SigningSite(FakeSite):
    """A fake site that signs its update receipt; with `replay`, it sends its round-1
    reply again in every later round."""

    key: SigningKey = field(default_factory=SigningKey.generate)
    replay: bool = False
    first: RecordDict | None = None

    def train(self, message: Message) -> Message:
        reply = super().train(message)
        config = message.content.config_records[wire.CONFIG]
        receipt = UpdateReceipt(
            run_id=str(config[wire.RUN_ID]),
            study_sha256=str(config[wire.STUDY_SHA256]),
            round=int(config[wire.ROUND]),  # type: ignore[arg-type]
            model_sha256=str(config[wire.MODEL_SHA256]),
            update_sha256=arrays_sha256(wire.record_to_arrays(reply.content)),
            site_id=self.site_id,
        )
        reply.content.config_records[wire.SITE][wire.RECEIPT_SIGNATURE] = receipt.sign(self.key)
        if self.replay and self.first is not None:
            return Message(self.first, reply_to=message)
        self.first = self.first or reply.content
        return reply


def test_a_reply_replayed_from_an_earlier_round_is_rejected_and_the_round_goes_on(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    sites: dict[int, FakeSite] = {}
    for node, site in consortium().items():
        signing = SigningSite(site.site_id, site.patients, status=site.status,
                              replay=site.site_id == "hospital-2")  # fmt: skip
        signing.key.public.save(keys / f"{site.site_id}.pub")
        sites[node] = signing
    settings = study(tmp_path / "run", num_server_rounds=2, strategy="fedavg",
                     site_keys_dir=str(keys))  # fmt: skip

    results = run(FakeGrid(sites), settings)

    first, second = results.per_round
    assert first.rejected == {}
    assert second.participants == ["hospital-1", "hospital-3"]
    assert "replayed from another round" in second.rejected["hospital-2"]
