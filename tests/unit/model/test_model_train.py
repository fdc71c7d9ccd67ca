"""Local training steps and evaluation, without differential privacy.

A small stand-in network (one linear head per task over the clinical values) keeps
these tests about the loop itself; the real network is trained in the client's tests.
References: the loss and metrics written out independently (numpy, lifelines).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from lifelines.utils import concordance_index as lifelines_concordance
from torch import nn

from medfed.model.contract import DEMO_CONTRACT, StudyContract, TaskSpec
from medfed.model.losses import multitask_loss
from medfed.model.metrics import auroc
from medfed.model.sample import PatientSample
from medfed.model.tokenizers import encode, split_tensors
from medfed.model.train import evaluate, train_steps

CONTRACT = StudyContract(
    numeric=DEMO_CONTRACT.numeric,
    tasks=(
        TaskSpec(name="readmission", kind="binary", target="readmitted_30d"),
        TaskSpec(name="stage", kind="multiclass", target="stage", classes=("i", "ii", "iii")),
        TaskSpec(name="los", kind="regression", target="length_of_stay"),
        TaskSpec(name="death", kind="survival", target="survival_days", event="died"),
    ),
)


class LinearHeads(nn.Module):
    """One linear head per task over the standardised clinical values."""

    def __init__(self, seed: int = 21) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.heads = nn.ModuleDict(
            {task.name: nn.Linear(len(CONTRACT.numeric), task.outputs) for task in CONTRACT.tasks}
        )

    def forward(self, values: torch.Tensor, known: torch.Tensor) -> dict[str, torch.Tensor]:
        x = values * known
        return {
            name: head(x) if name == "stage" else head(x).squeeze(-1)
            for name, head in self.heads.items()
        }


def samples(n: int, *, seed: int, labelled: float = 1.0) -> list[PatientSample]:
    """Patients whose labels follow their age, with some labels left out."""
    rng = np.random.default_rng(seed)
    result = []
    for i in range(n):
        numeric = {
            f.name: float(
                np.clip(f.reference_mean + f.reference_scale * rng.normal(), f.minimum, f.maximum)
            )
            for f in CONTRACT.numeric
        }
        z = (numeric["age"] - 62) / 14
        targets = {
            "readmitted_30d": float(z > 0),
            "stage": float(min(2, int(abs(z) * 2))),
            "length_of_stay": 1 + z,
            "survival_days": float(rng.integers(10, 40)),  # ties are common
            "died": float(rng.random() < 0.7),
        }
        if rng.random() >= labelled:
            targets = {}
        result.append(PatientSample(f"p{i}", numeric, {}, targets=targets))
    return result


def tensors(n: int, *, seed: int, labelled: float = 1.0) -> tuple[torch.Tensor, ...]:
    return encode(samples(n, seed=seed, labelled=labelled), CONTRACT).tensors()


def empty_batch() -> tuple[torch.Tensor, ...]:
    return tuple(t[:0] for t in tensors(2, seed=0))


class CountingOptimizer(torch.optim.SGD):
    """Plain SGD that counts its steps."""

    def __init__(self, params: object, lr: float) -> None:
        super().__init__(params, lr=lr)  # type: ignore[arg-type]
        self.steps_taken = 0

    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        self.steps_taken += 1
        return super().step(closure)


def test_takes_exactly_the_steps_asked_cycling_the_batches() -> None:
    net = LinearHeads()
    optimizer = CountingOptimizer(net.parameters(), lr=0.05)
    batches = [tensors(3, seed=0), tensors(5, seed=1)]
    result = train_steps(net, optimizer, batches, steps=5, contract=CONTRACT)
    assert result.steps == 5
    assert optimizer.steps_taken == 5
    assert result.samples_seen == 3 + 5 + 3 + 5 + 3


def test_mean_loss_is_the_multitask_loss_before_each_step() -> None:
    net, reference = LinearHeads(), LinearHeads()
    batch = tensors(16, seed=2, labelled=0.7)
    result = train_steps(
        net, torch.optim.SGD(net.parameters(), lr=0.0), [batch], steps=3, contract=CONTRACT
    )
    inputs, targets = split_tensors(CONTRACT, batch)
    with torch.no_grad():
        expected = multitask_loss(CONTRACT, reference(*inputs), targets)
    assert result.mean_loss == pytest.approx(float(expected), rel=1e-6)


def test_training_reduces_the_loss() -> None:
    net = LinearHeads()
    data = [tensors(64, seed=3)]

    def loss_now() -> float:
        return train_steps(
            net, torch.optim.SGD(net.parameters(), lr=0.0), data, steps=1, contract=CONTRACT
        ).mean_loss

    first = loss_now()
    train_steps(net, torch.optim.SGD(net.parameters(), lr=0.05), data, steps=60, contract=CONTRACT)
    assert loss_now() < 0.8 * first


def test_an_empty_batch_takes_a_step_without_loss() -> None:
    net = LinearHeads()
    optimizer = CountingOptimizer(net.parameters(), lr=0.1)
    before = copy.deepcopy(net.state_dict())
    result = train_steps(net, optimizer, [empty_batch()], steps=2, contract=CONTRACT)
    assert optimizer.steps_taken == 2
    assert result.samples_seen == 0
    assert math.isnan(result.mean_loss)
    after = net.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # zero gradient


def test_a_batch_without_labels_backpropagates_zero() -> None:
    net = LinearHeads()
    before = copy.deepcopy(net.state_dict())
    unlabelled = tensors(6, seed=4, labelled=0.0)
    result = train_steps(
        net, torch.optim.SGD(net.parameters(), lr=0.1), [unlabelled], steps=1, contract=CONTRACT
    )
    assert result.mean_loss == 0.0
    assert all(p.grad is not None for p in net.parameters())
    assert all(torch.equal(before[name], net.state_dict()[name]) for name in before)


def test_fedprox_with_mu_zero_is_the_plain_step() -> None:
    batch = tensors(12, seed=5)
    plain, prox = LinearHeads(), LinearHeads()
    anchor = {name: p.detach() + 1.0 for name, p in prox.named_parameters()}
    train_steps(plain, torch.optim.SGD(plain.parameters(), lr=0.1), [batch], steps=3,
                contract=CONTRACT)  # fmt: skip
    train_steps(prox, torch.optim.SGD(prox.parameters(), lr=0.1), [batch], steps=3,
                contract=CONTRACT, proximal_mu=0.0, anchor=anchor)  # fmt: skip
    assert all(
        torch.equal(a, b) for a, b in zip(plain.parameters(), prox.parameters(), strict=True)
    )


def test_fedprox_pulls_towards_the_anchor_by_lr_times_mu() -> None:
    net = LinearHeads()
    start = {name: p.detach().clone() for name, p in net.named_parameters()}
    anchor = {name: torch.zeros_like(p) for name, p in start.items()}
    lr, mu = 0.1, 2.0
    # An empty batch has a zero data gradient: only the proximal pull moves the weights.
    train_steps(net, torch.optim.SGD(net.parameters(), lr=lr), [empty_batch()], steps=2,
                contract=CONTRACT, proximal_mu=mu, anchor=anchor)  # fmt: skip
    for name, p in net.named_parameters():
        expected = start[name] * (1 - lr * mu) ** 2  # w <- w - lr * mu * (w - 0), twice
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)


def test_fedprox_adds_the_pull_to_the_data_step() -> None:
    batch = tensors(12, seed=6)
    plain, prox = LinearHeads(), LinearHeads()
    anchor = {name: torch.randn_like(p) for name, p in prox.named_parameters()}
    lr, mu = 0.1, 0.5
    train_steps(plain, torch.optim.SGD(plain.parameters(), lr=lr), [batch], steps=1,
                contract=CONTRACT)  # fmt: skip
    train_steps(prox, torch.optim.SGD(prox.parameters(), lr=lr), [batch], steps=1,
                contract=CONTRACT, proximal_mu=mu, anchor=anchor)  # fmt: skip
    for (name, p), q in zip(prox.named_parameters(), plain.parameters(), strict=True):
        expected = q.detach() - lr * mu * (q.detach() - anchor[name])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps"),
        ({"proximal_mu": -0.1}, "proximal_mu"),
        ({"proximal_mu": 0.1}, "anchor"),
        ({"proximal_mu": 0.1, "anchor": {"heads.los.weight": torch.zeros(1, 8)}}, "anchor"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, object], message: str) -> None:
    net = LinearHeads()
    arguments: dict[str, object] = {"steps": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        train_steps(net, torch.optim.SGD(net.parameters(), lr=0.1), [tensors(2, seed=0)],
                    contract=CONTRACT, **arguments)  # type: ignore[arg-type]  # fmt: skip


def test_refuses_a_source_without_batches() -> None:
    net = LinearHeads()
    with pytest.raises(ValueError, match="no batches"):
        train_steps(net, torch.optim.SGD(net.parameters(), lr=0.1), [], steps=1, contract=CONTRACT)


def test_evaluate_matches_the_metrics_by_hand() -> None:
    net = LinearHeads()
    data = tensors(60, seed=7, labelled=0.8)
    net.train()
    metrics = evaluate(net, data, CONTRACT)
    assert not net.training
    inputs, targets = split_tensors(CONTRACT, data)
    with torch.no_grad():
        out = {name: value.numpy().astype(np.float64) for name, value in net(*inputs).items()}
    mask = targets["readmission"][1].numpy()
    n = int(mask.sum())
    assert 30 < n < 60

    y = targets["readmission"][0].numpy()[mask]
    logits = out["readmission"][mask]
    bce = np.mean(np.log1p(np.exp(-logits)) * y + np.log1p(np.exp(logits)) * (1 - y))
    assert metrics["readmission"]["examples"] == n
    assert metrics["readmission"]["loss"] == pytest.approx(bce, rel=1e-5)
    assert metrics["readmission"]["auroc"] == pytest.approx(auroc(y, logits))
    assert metrics["readmission"]["accuracy"] == pytest.approx(np.mean((logits > 0) == y))

    classes = targets["stage"][0].numpy()[mask]
    stage = out["stage"][mask]
    log_softmax = stage - np.log(np.exp(stage).sum(axis=1, keepdims=True))
    assert metrics["stage"]["loss"] == pytest.approx(
        -np.mean(log_softmax[np.arange(n), classes]), rel=1e-5
    )
    assert metrics["stage"]["accuracy"] == pytest.approx(np.mean(stage.argmax(axis=1) == classes))

    stay = targets["los"][0].numpy()[mask]
    assert metrics["los"]["loss"] == pytest.approx(
        np.mean((out["los"][mask] - stay) ** 2), rel=1e-5
    )
    assert metrics["los"]["rmse"] == pytest.approx(
        math.sqrt(np.mean((out["los"][mask] - stay) ** 2)), rel=1e-5
    )

    times, events = targets["death"][0].numpy()[mask].T
    expected_c = lifelines_concordance(times, -out["death"][mask], events)
    assert metrics["death"]["c_index"] == pytest.approx(expected_c, abs=1e-12)
    assert math.isfinite(metrics["death"]["loss"])


def test_evaluate_does_not_touch_gradients() -> None:
    net = LinearHeads()
    evaluate(net, tensors(8, seed=8), CONTRACT)
    assert all(p.grad is None for p in net.parameters())


def test_evaluate_on_nothing_is_undefined() -> None:
    metrics = evaluate(LinearHeads(), empty_batch(), CONTRACT)
    for task in CONTRACT.tasks:
        assert metrics[task.name]["examples"] == 0
        assert all(math.isnan(v) for k, v in metrics[task.name].items() if k != "examples")
