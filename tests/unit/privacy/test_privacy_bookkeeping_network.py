"""Book-keeping on the whole network: every encoder, masked attention and fusion block.

Against micro-batches (each patient's gradient norm from a batch of one) and against
Opacus's `hooks` mode stepping with the same noise seed. Patients lack some modalities.
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
from medfed.privacy.dpsgd import DpSgdSettings, make_private

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

MAX_GRAD_NORM = 0.1


def tensors(n: int = 6) -> tuple[torch.Tensor, ...]:
    """`n` patients: all modalities, then each missing one or more of them."""
    drop = [(), ("smiles",), ("protein", "omics"), ("numeric", "codes"), ("smiles", "protein")]
    result = []
    for i, sample in enumerate(synthetic_samples(n, seed=3)):
        fields = {
            "numeric": sample.numeric, "codes": sample.codes, "omics": sample.omics,
            "smiles": sample.smiles, "protein": sample.protein,
        }  # fmt: skip
        for name in drop[i % len(drop)]:
            fields[name] = {} if name in ("numeric", "codes") else None
        result.append(PatientSample(sample.patient_id, targets=sample.targets, **fields))  # type: ignore[arg-type]
    return encode(result, BENCH_CONTRACT).tensors()


def losses(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    inputs, targets = split_tensors(BENCH_CONTRACT, batch)
    return per_sample_loss(BENCH_CONTRACT, model(*inputs), targets)


def micro_batch_norms(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> list[float]:
    norms = []
    for i in range(batch[0].shape[0]):
        model.zero_grad()
        losses(model, tuple(t[i : i + 1] for t in batch)).sum().backward()
        squares = [
            float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None
        ]
        norms.append(math.sqrt(sum(squares)))
    return norms


def settings() -> DpSgdSettings:
    return DpSgdSettings(noise_multiplier=1.0, max_grad_norm=MAX_GRAD_NORM, sample_rate=1.0)


def bk_norms(preset: str, batch: tuple[torch.Tensor, ...]) -> tuple[list[float], torch.Tensor]:
    model = build_model(preset, contract=BENCH_CONTRACT, seed=5)  # type: ignore[arg-type]
    expected = micro_batch_norms(copy.deepcopy(model), batch)
    training = make_private(model, TensorDataset(*batch), settings=settings(), learning_rate=0.1)
    assert training.grad_sample_mode == "bk"  # the default
    training.optimizer.zero_grad()
    training.reduce_loss(losses(training.model, batch)).backward()
    assert isinstance(training.optimizer, BookKeepingOptimizer)
    norms = training.optimizer.per_sample_norms()
    assert norms is not None
    return expected, norms * batch[0].shape[0]


def test_tiny_network_norms_match_micro_batches() -> None:
    expected, actual = bk_norms("tiny", tensors())
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6
    )


@pytest.mark.slow
def test_small_network_norms_match_micro_batches() -> None:
    expected, actual = bk_norms("small", tensors(4))
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=torch.float32), rtol=1e-4, atol=1e-5
    )


def test_tiny_network_step_equals_opacus_with_the_same_noise() -> None:
    batch = tensors()
    stepped = {}
    for mode in ("bk", "hooks"):
        model = build_model("tiny", contract=BENCH_CONTRACT, seed=5)
        training = make_private(
            model, TensorDataset(*batch), settings=settings(), learning_rate=0.1,
            grad_sample_mode=mode,
        )  # fmt: skip
        training.optimizer.generator = torch.Generator().manual_seed(99)  # type: ignore[attr-defined]
        training.optimizer.zero_grad()
        training.reduce_loss(losses(training.model, batch)).backward()
        training.optimizer.step()
        stepped[mode] = {
            n.removeprefix("_module."): p.detach() for n, p in training.model.named_parameters()
        }
    assert len(stepped["bk"]) == len(stepped["hooks"]) > 40
    for name, value in stepped["hooks"].items():
        torch.testing.assert_close(stepped["bk"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_tiny_network_bf16_autocast_stays_close_to_fp32() -> None:
    batch = tensors()
    results = []
    for enabled in (False, True):
        model = build_model("tiny", contract=BENCH_CONTRACT, seed=5)
        training = make_private(
            model, TensorDataset(*batch), settings=settings(), learning_rate=0.1
        )
        training.optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            per_sample = losses(training.model, batch)
        training.reduce_loss(per_sample.float()).backward()
        assert isinstance(training.optimizer, BookKeepingOptimizer)
        norms = training.optimizer.per_sample_norms()
        training.optimizer.accumulate()
        results.append(
            (norms, torch.cat([s.flatten() for s in training.optimizer.clipped_sums().values()]))
        )
    (norms, sums), (norms_bf16, sums_bf16) = results
    torch.testing.assert_close(norms_bf16, norms, rtol=3e-2, atol=0)
    # The whole clipped sum within bf16's few significant digits of fp32's.
    assert float((sums_bf16 - sums).norm() / sums.norm()) < 3e-2
