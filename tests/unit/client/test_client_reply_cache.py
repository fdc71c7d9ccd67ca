"""A re-sent train instruction (a coordinator resumed mid-round) gets the reply the site
sent before, byte for byte, and spends nothing; another model for that round is refused;
the store keeps only the last runs and ignores what does not read back whole."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from medfed.client.config import SITE_TOML
from medfed.client.errors import SiteRefusal
from medfed.client.protocol import HeldOut, ModelCheck, TrainReply
from medfed.client.reply_cache import ReplyCache
from medfed.client.site_api import SiteService
from medfed.model.contract import DEMO_CONTRACT as CONTRACT
from medfed.model.network import arrays_sha256
from tests.sitekit import (
    global_arrays,
    make_study,
    site_config,
    spend_rows,
    train_request,
    write_sites,
)

STUDY = make_study(rounds=2, sites=1, target_epsilon=2.0, local_steps=2)


@pytest.fixture(scope="module")
def site_toml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sites")
    write_sites(root, STUDY, n_sites=1, seed=5)
    return root / "hospital-1" / SITE_TOML


def _fake_reply(seed: int) -> TrainReply:
    rng = np.random.default_rng(seed)
    return TrainReply(
        site_id="hospital-1",
        arrays={"w": rng.standard_normal((3, 2)).astype(np.float32), "b": np.zeros(2, np.float32)},
        local_loss=0.1 * seed,
        epsilon=1 / 3,
        noise_multiplier=1.25,
        incoming=ModelCheck(
            train_examples=40,
            train_loss=0.7,
            held_out=HeldOut(examples=0, loss=math.nan, auroc=math.nan, accuracy=math.nan),
        ),
        receipt_signature="ab" * 32,
    )


def test_the_same_instruction_gets_the_same_reply_and_spends_once(site_toml: Path) -> None:
    service = SiteService(site_config(site_toml), CONTRACT)
    request = train_request(STUDY, 1, run_id="run-resumed")
    first = service.train(request)

    # A fresh service: the daemon restarted too; only the files remain.
    again = SiteService(site_config(site_toml), CONTRACT).train(
        train_request(STUDY, 1, run_id="run-resumed")
    )

    assert list(again.arrays) == list(first.arrays)
    for name, array in first.arrays.items():
        assert again.arrays[name].dtype == array.dtype
        assert again.arrays[name].tobytes() == array.tobytes()
    assert again.receipt_signature == first.receipt_signature
    assert (again.epsilon, again.local_loss, again.noise_multiplier) == (
        first.epsilon,
        first.local_loss,
        first.noise_multiplier,
    )
    assert again.incoming.train_examples == first.incoming.train_examples
    assert again.incoming.train_loss == first.incoming.train_loss
    assert [(r.run_id, r.round) for r in spend_rows(site_toml)].count(("run-resumed", 1)) == 1


def test_another_model_for_a_trained_round_is_refused(site_toml: Path) -> None:
    service = SiteService(site_config(site_toml), CONTRACT)
    service.train(train_request(STUDY, 1, run_id="run-other-model"))
    other = global_arrays(seed=8)
    with pytest.raises(SiteRefusal, match="already trained"):
        service.train(train_request(STUDY, 1, run_id="run-other-model", arrays=other))
    assert [(r.run_id, r.round) for r in spend_rows(site_toml)].count(("run-other-model", 1)) == 1


def test_a_stored_reply_round_trips_exactly(tmp_path: Path) -> None:
    cache = ReplyCache(tmp_path)
    request = train_request(STUDY, 3, run_id="run-x")
    reply = _fake_reply(1)
    cache.put(request, reply)
    back = cache.get(request)
    assert back is not None
    assert back.receipt_signature == reply.receipt_signature
    assert back.epsilon == reply.epsilon  # 1/3 exactly, not a decimal rounding of it
    assert math.isnan(back.incoming.held_out.auroc)
    assert {n: a.tobytes() for n, a in back.arrays.items()} == {
        n: a.tobytes() for n, a in reply.arrays.items()
    }
    assert cache.get(dataclasses.replace(request, round=4)) is None
    assert cache.get(dataclasses.replace(request, model_sha256="0" * 64)) is None
    assert cache.get(dataclasses.replace(request, local_steps=request.local_steps + 1)) is None
    assert (
        cache.get(dataclasses.replace(request, target_epsilon=request.target_epsilon * 2)) is None
    )
    assert cache.get(dataclasses.replace(request, arrays={})) is not None  # named by its digest


def test_a_damaged_store_is_ignored(tmp_path: Path) -> None:
    cache = ReplyCache(tmp_path)
    request = train_request(STUDY, 1, run_id="run-d")
    cache.put(request, _fake_reply(2))
    (npz,) = tmp_path.glob("*/round-1.npz")
    npz.write_bytes(npz.read_bytes()[:-10])
    assert cache.get(request) is None
    (doc,) = tmp_path.glob("*/round-1.json")
    doc.write_text("{not json", encoding="utf-8")
    assert cache.get(request) is None


def test_only_the_last_runs_are_kept(tmp_path: Path) -> None:
    cache = ReplyCache(tmp_path, keep_runs=2)
    arrays = {"w": np.ones(2, np.float32)}
    requests = [
        dataclasses.replace(
            train_request(STUDY, 1, run_id=f"run-{i}", arrays=arrays),
            model_sha256=arrays_sha256(arrays),
        )
        for i in range(4)
    ]
    for request in requests:
        cache.put(request, _fake_reply(3))
    assert len(list(tmp_path.iterdir())) == 2
    assert cache.get(requests[0]) is None
    assert cache.get(requests[3]) is not None
    assert cache.get(requests[2]) is not None
