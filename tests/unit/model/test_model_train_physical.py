"""Physical batches inside one logical batch, and bf16 autocast, in `train_steps`.

References: the same step taken on the whole batch at once (plain SGD's mean gradient;
book-keeping DP-SGD's clipped, noised step with the same noise seed).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from medfed.bench.workload import BENCH_CONTRACT, synthetic_tensors
from medfed.model.contract import DEMO_CONTRACT, StudyContract, TaskSpec
from medfed.model.network import build_model
from medfed.model.train import train_steps
from medfed.privacy.dpsgd import DpSgdSettings, make_private

ROWS = 7


def stepped(
    physical: int | None, *, dp: bool, autocast: torch.dtype | None = None
) -> list[torch.Tensor]:
    batch = synthetic_tensors(ROWS, seed=1)
    model = build_model("tiny", contract=BENCH_CONTRACT, seed=2)
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    reduce = None
    if dp:
        settings = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=0.1, sample_rate=1.0)
        training = make_private(model, TensorDataset(*batch), settings=settings, learning_rate=0.5)
        optimizer, reduce = training.optimizer, training.reduce_loss
        optimizer.generator = torch.Generator().manual_seed(3)  # type: ignore[attr-defined]
    extra = {} if reduce is None else {"reduce_loss": reduce}
    result = train_steps(
        model, optimizer, [batch], steps=1, contract=BENCH_CONTRACT,
        physical_batch_size=physical, autocast_dtype=autocast, **extra,  # type: ignore[arg-type]
    )  # fmt: skip
    assert result.samples_seen == ROWS
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("dp", [False, True])
def test_physical_batches_take_the_logical_batch_step(dp: bool) -> None:
    whole = stepped(None, dp=dp)
    for physical in (3,):
        for a, b in zip(stepped(physical, dp=dp), whole, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_steps_close_to_fp32() -> None:
    before = [
        p.detach().clone()
        for p in build_model("tiny", contract=BENCH_CONTRACT, seed=2).parameters()
    ]
    fp32 = torch.cat(
        [(a - b).flatten() for a, b in zip(stepped(None, dp=False), before, strict=True)]
    )
    bf16 = torch.cat(
        [
            (a - b).flatten()
            for a, b in zip(stepped(None, dp=False, autocast=torch.bfloat16), before, strict=True)
        ]
    )
    assert float((bf16 - fp32).norm() / fp32.norm()) < 3e-2


def test_a_survival_study_is_not_split() -> None:
    contract = StudyContract(
        numeric=DEMO_CONTRACT.numeric,
        tasks=(TaskSpec(name="death", kind="survival", target="survival_days", event="died"),),
    )
    model = torch.nn.Linear(1, 1)
    batch = [torch.zeros(4, 1)] * 6
    with pytest.raises(ValueError, match="risk sets"):
        train_steps(
            model, torch.optim.SGD(model.parameters(), lr=0.1), [batch], steps=1,
            contract=contract, physical_batch_size=2,
        )  # fmt: skip
