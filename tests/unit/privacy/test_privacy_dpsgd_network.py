"""The real network under every grad-sample mode, against micro-batches clipped by hand.

Every encoder (clinical numeric and codes, omics, molecule, protein), the masked
attention and the fusion blocks take part; patients lack some modalities, so absent
documents are exercised as well.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from medfed.bench.workload import BENCH_CONTRACT, synthetic_samples
from medfed.model.losses import per_sample_loss
from medfed.model.network import build_model
from medfed.model.sample import PatientSample
from medfed.model.tokenizers import encode, split_tensors
from medfed.privacy.bookkeeping import BookKeepingOptimizer
from medfed.privacy.dpsgd import GRAD_SAMPLE_MODES, DpSgdSettings, GradSampleMode, make_private

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:In CPU autocast, but the target dtype:UserWarning"),
]

MAX_GRAD_NORM = 0.1


def patients() -> list[PatientSample]:
    """Six patients: all modalities, then each missing one or more of them."""
    full = synthetic_samples(6, seed=3)
    drop = [(), ("smiles",), ("protein", "omics"), ("numeric", "codes"), ("smiles", "protein"), ()]
    result = []
    for sample, missing in zip(full, drop, strict=True):
        fields = {
            "numeric": sample.numeric, "codes": sample.codes, "omics": sample.omics,
            "smiles": sample.smiles, "protein": sample.protein,
        }  # fmt: skip
        for name in missing:
            fields[name] = {} if name in ("numeric", "codes") else None
        result.append(PatientSample(sample.patient_id, targets=sample.targets, **fields))  # type: ignore[arg-type]
    return result


def tensors() -> tuple[torch.Tensor, ...]:
    return encode(patients(), BENCH_CONTRACT).tensors()


def losses(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    inputs, targets = split_tensors(BENCH_CONTRACT, batch)
    return per_sample_loss(BENCH_CONTRACT, model(*inputs), targets)


def clipped_sum_by_hand(
    model: nn.Module, batch: tuple[torch.Tensor, ...]
) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    norms = []
    for i in range(batch[0].shape[0]):
        model.zero_grad()
        losses(model, tuple(t[i : i + 1] for t in batch)).sum().backward()
        grads = {
            name: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for name, p in model.named_parameters()
        }
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
        norms.append(norm)
        for name, grad in grads.items():
            total[name] = (
                total.get(name, torch.zeros_like(grad))
                + min(1.0, MAX_GRAD_NORM / (norm + 1e-6)) * grad
            )
    assert max(norms) > MAX_GRAD_NORM
    return total


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_network_clipped_sum_matches_micro_batches(mode: GradSampleMode) -> None:
    batch = tensors()
    model = build_model("tiny", contract=BENCH_CONTRACT, seed=5)
    expected = clipped_sum_by_hand(copy.deepcopy(model), batch)
    settings = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=MAX_GRAD_NORM, sample_rate=1.0)
    training = make_private(
        model, TensorDataset(*batch), settings=settings, learning_rate=0.1, grad_sample_mode=mode
    )
    training.optimizer.zero_grad()
    training.reduce_loss(losses(training.model, batch)).backward()
    if isinstance(training.optimizer, BookKeepingOptimizer):
        training.optimizer.accumulate()
        sums = training.optimizer.clipped_sums()
        actual = {name: sums[p] for name, p in training.model.named_parameters()}
    else:
        if mode != "ghost":
            training.optimizer.clip_and_accumulate()  # type: ignore[attr-defined]
        field = "grad" if mode == "ghost" else "summed_grad"
        actual = {
            name.removeprefix("_module."): getattr(p, field)
            for name, p in training.model.named_parameters()
        }
    assert set(actual) == set(expected)
    groups = {name.split(".")[0] + "." + name.split(".")[1] for name in actual}
    assert {"encoders.clinical", "encoders.omics", "encoders.molecule", "encoders.protein",
            "fusion.lower", "fusion.upper", "heads.outcome"} <= groups  # fmt: skip
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_network_takes_an_empty_poisson_batch(mode: GradSampleMode) -> None:
    batch = tensors()
    model = build_model("tiny", contract=BENCH_CONTRACT, seed=5)
    settings = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=MAX_GRAD_NORM, sample_rate=0.5)
    training = make_private(
        model, TensorDataset(*batch), settings=settings, learning_rate=0.1, grad_sample_mode=mode
    )
    before = [p.detach().clone() for p in training.model.parameters()]
    training.optimizer.zero_grad()
    training.reduce_loss(losses(training.model, tuple(t[:0] for t in batch))).backward()
    training.optimizer.step()
    after = list(training.model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
