"""SiteTrainer in-process: the digest check, DP-SGD spend in the ledger, refusal of a replay."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import client.trainer as trainer_module
from client.errors import SiteRefusal
from client.protocol import EvaluateRequest, TrainRequest
from client.trainer import LEDGER_NAME, STUDY_NAME, SiteTrainer
from model.contract import DEMO_CONTRACT as CONTRACT
from model.network import arrays_sha256, build_model, load_arrays, state_arrays
from privacy.ledger import PrivacyLedger
from sites.errors import DataError
from sites.synthetic import TABLE_NAME, write_synthetic_consortium
from sites.tabular import SiteTable, read_site_table
from tests.references import dp_accounting_epsilon

SITE = "hospital-1"
# 0.07 of a site's ~230 training rows is not a whole batch: Opacus rounds the rate.
SAMPLE_RATE = 0.07
DELTA = 1e-5


@pytest.fixture
def site_dir(tmp_path: Path) -> Path:
    write_synthetic_consortium(tmp_path, CONTRACT, n_sites=1, seed=3)
    return tmp_path / SITE


@pytest.fixture
def table(site_dir: Path) -> SiteTable:
    """The site's table read on its own, as the reference for what the trainer used."""
    return read_site_table(site_dir / TABLE_NAME, CONTRACT)


def global_arrays(seed: int = 7) -> dict[str, np.ndarray]:
    return state_arrays(build_model("tiny", n_features=len(CONTRACT.features), seed=seed))


def train_request(round_number: int = 1, **changes: object) -> TrainRequest:
    arrays = global_arrays()
    request = TrainRequest(
        run_id="run-1",
        round=round_number,
        arrays=arrays,
        model_sha256=arrays_sha256(arrays),
        preset="tiny",
        n_features=len(CONTRACT.features),
        local_steps=4,
        learning_rate=0.1,
        noise_multiplier=1.1,
        max_grad_norm=1.0,
        sample_rate=SAMPLE_RATE,
        delta=DELTA,
    )
    return replace(request, **changes)  # type: ignore[arg-type]


def evaluate_request(arrays: dict[str, np.ndarray]) -> EvaluateRequest:
    return EvaluateRequest(
        run_id="run-1",
        round=1,
        arrays=arrays,
        model_sha256=arrays_sha256(arrays),
        preset="tiny",
        n_features=len(CONTRACT.features),
    )


def ledger_rows(site_dir: Path) -> list:  # type: ignore[type-arg]
    """The ledger as another process would see it: a fresh connection to the file."""
    return PrivacyLedger(site_dir / LEDGER_NAME).records()


def opacus_rate(rows: int, requested: float) -> float:
    """The Poisson rate Opacus really samples at: 1 / batches per epoch of the plain loader."""
    batch_size = max(1, round(requested * rows))
    return 1.0 / math.ceil(rows / batch_size)


reference_epsilon = dp_accounting_epsilon


def test_a_train_records_its_spend_before_replying(site_dir: Path, table: SiteTable) -> None:
    request = train_request()
    n_train = len(table.train_labels)
    assert opacus_rate(n_train, SAMPLE_RATE) != SAMPLE_RATE

    reply = SiteTrainer(SITE, site_dir, CONTRACT).train(request)

    (row,) = ledger_rows(site_dir)
    assert row.dataset == table.fingerprint
    assert (row.study, row.run_id, row.round) == (STUDY_NAME, "run-1", 1)
    assert row.event.steps == request.local_steps
    assert row.event.noise_multiplier == request.noise_multiplier
    assert row.event.sample_rate == pytest.approx(opacus_rate(n_train, SAMPLE_RATE), rel=1e-12)
    assert row.delta == request.delta
    assert reply.epsilon == PrivacyLedger(site_dir / LEDGER_NAME).epsilon(
        table.fingerprint, delta=DELTA
    )
    assert reply.epsilon == pytest.approx(reference_epsilon([row.event], DELTA), rel=1e-3)


def test_a_train_reply_describes_the_sites_data_and_a_new_model(
    site_dir: Path, table: SiteTable
) -> None:
    request = train_request()
    trainer = SiteTrainer(SITE, site_dir, CONTRACT)

    reply = trainer.train(request)

    assert reply.site_id == SITE
    assert reply.num_examples == len(table.train_labels)
    assert reply.incoming.held_out.examples == len(table.eval_labels)
    assert reply.incoming.train_examples == len(table.train_labels)
    assert math.isfinite(reply.local_loss)
    assert reply.arrays.keys() == request.arrays.keys()
    for name, array in reply.arrays.items():
        assert array.dtype == np.float32
        assert array.shape == request.arrays[name].shape
        assert np.isfinite(array).all()
    assert any(not np.array_equal(reply.arrays[n], request.arrays[n]) for n in reply.arrays)
    # The incoming model's evaluation is that of the model as received.
    incoming = trainer.evaluate(evaluate_request(request.arrays)).result
    assert reply.incoming.held_out.loss == pytest.approx(incoming.held_out.loss, rel=1e-6)
    assert reply.incoming.train_loss == pytest.approx(incoming.train_loss, rel=1e-6)


def test_a_second_train_of_the_same_round_is_refused(site_dir: Path) -> None:
    trainer = SiteTrainer(SITE, site_dir, CONTRACT)
    trainer.train(train_request())

    with pytest.raises(SiteRefusal, match="run run-1 round 1 was already trained here"):
        trainer.train(train_request())
    # Also from a fresh trainer (another ClientApp process) with other settings.
    with pytest.raises(SiteRefusal, match="already trained"):
        SiteTrainer(SITE, site_dir, CONTRACT).train(train_request(local_steps=9))

    assert len(ledger_rows(site_dir)) == 1


def test_rounds_compose_in_the_ledger(site_dir: Path, table: SiteTable) -> None:
    trainer = SiteTrainer(SITE, site_dir, CONTRACT)
    first = trainer.train(train_request(1))
    second = trainer.train(train_request(2, local_steps=6))

    rows = ledger_rows(site_dir)
    assert [(row.round, row.event.steps) for row in rows] == [(1, 4), (2, 6)]
    assert second.epsilon > first.epsilon
    assert second.epsilon == pytest.approx(
        reference_epsilon([row.event for row in rows], DELTA), rel=1e-3
    )


def test_evaluate_scores_the_held_out_patients_and_spends_nothing(
    site_dir: Path, table: SiteTable
) -> None:
    reply = SiteTrainer(SITE, site_dir, CONTRACT).evaluate(evaluate_request(global_arrays()))

    assert reply.site_id == SITE
    held_out = reply.result.held_out
    assert held_out.examples == len(table.eval_labels)
    assert math.isfinite(held_out.loss)
    assert 0.0 <= held_out.auroc <= 1.0
    assert 0.0 <= held_out.accuracy <= 1.0
    # The training-set loss, against BCE computed here from the same arrays.
    model = build_model("tiny", n_features=len(CONTRACT.features), seed=0)
    load_arrays(model, global_arrays())
    with torch.no_grad():
        logits = model(torch.from_numpy(table.train_features))
        expected = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, torch.from_numpy(table.train_labels).float()
        )
    assert reply.result.train_examples == len(table.train_labels)
    assert reply.result.train_loss == pytest.approx(float(expected), rel=1e-5)
    assert ledger_rows(site_dir) == []


def test_a_model_that_does_not_match_its_digest_is_refused(site_dir: Path) -> None:
    request = train_request()
    tampered = {name: array.copy() for name, array in request.arrays.items()}
    tampered["heads.outcome.bias"][0] += 1e-3

    trainer = SiteTrainer(SITE, site_dir, CONTRACT)
    with pytest.raises(SiteRefusal, match="does not match its announced digest"):
        trainer.train(replace(request, arrays=tampered))
    with pytest.raises(SiteRefusal, match="does not match its announced digest"):
        trainer.evaluate(replace(evaluate_request(request.arrays), arrays=tampered))
    assert ledger_rows(site_dir) == []


def test_a_model_for_another_contract_is_refused(site_dir: Path) -> None:
    with pytest.raises(SiteRefusal, match="asks for 9 features"):
        SiteTrainer(SITE, site_dir, CONTRACT).train(train_request(n_features=9))
    assert ledger_rows(site_dir) == []


def test_a_model_of_the_wrong_shape_is_refused_even_with_its_digest(site_dir: Path) -> None:
    arrays = global_arrays()
    arrays["heads.outcome.bias"] = np.zeros(2, dtype=np.float32)
    request = train_request(arrays=arrays, model_sha256=arrays_sha256(arrays))

    with pytest.raises(SiteRefusal, match="does not fit the study's network"):
        SiteTrainer(SITE, site_dir, CONTRACT).train(request)
    assert ledger_rows(site_dir) == []


def test_a_site_with_a_broken_table_cannot_start(site_dir: Path) -> None:
    path = site_dir / TABLE_NAME
    lines = path.read_text(encoding="utf-8").splitlines()
    cells = lines[5].split(",")
    cells[2] = "heavy"  # bmi
    lines[5] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with pytest.raises(DataError, match=r"row 6, column bmi: 'heavy' is not a number"):
        SiteTrainer(SITE, site_dir, CONTRACT)


def test_an_overlapping_train_of_the_same_round_is_refused(
    site_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = train_request()
    first = SiteTrainer(SITE, site_dir, CONTRACT)
    other_process = SiteTrainer(SITE, site_dir, CONTRACT)
    real_train_steps = trainer_module.train_steps

    def meanwhile_the_other_process_trains(*args: object, **kwargs: object) -> object:
        monkeypatch.setattr(trainer_module, "train_steps", real_train_steps)
        other_process.train(request)  # passes the ledger check too, and records first
        return real_train_steps(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trainer_module, "train_steps", meanwhile_the_other_process_trains)

    with pytest.raises(SiteRefusal):
        first.train(request)
