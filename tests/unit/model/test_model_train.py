"""Local training steps and evaluation, without differential privacy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from model.metrics import auroc
from model.network import MedModel, build_model, state_arrays
from model.train import evaluate, train_steps
from tests.modelkit import TASK, numeric_contract

N_FEATURES = 4
CONTRACT = numeric_contract(N_FEATURES)


def model() -> MedModel:
    return build_model("tiny", contract=CONTRACT, seed=21)


def inputs(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return features, torch.ones(features.shape, dtype=torch.bool)


def batch(n: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, N_FEATURES, generator=generator)
    labels = (features[:, 0] > 0).long()
    return *inputs(features), labels


class CountingOptimizer(torch.optim.SGD):
    """Plain SGD that counts its steps."""

    def __init__(self, params: object, lr: float) -> None:
        super().__init__(params, lr=lr)  # type: ignore[arg-type]
        self.steps_taken = 0

    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        self.steps_taken += 1
        return super().step(closure)


def test_takes_exactly_the_steps_asked_cycling_the_batches() -> None:
    net = model()
    optimizer = CountingOptimizer(net.parameters(), lr=0.05)
    batches = [batch(3, seed=0), batch(5, seed=1)]
    result = train_steps(net, optimizer, batches, steps=5)
    assert result.steps == 5
    assert optimizer.steps_taken == 5
    assert result.samples_seen == 3 + 5 + 3 + 5 + 3


def test_mean_loss_is_the_loss_before_each_step() -> None:
    net = model()
    reference = build_model("tiny", contract=CONTRACT, seed=21)
    features, known, labels = batch(16, seed=2)
    result = train_steps(
        net, torch.optim.SGD(net.parameters(), lr=0.0), [(features, known, labels)], steps=3
    )
    with torch.no_grad():
        expected = nn.functional.binary_cross_entropy_with_logits(
            reference(features, known)[TASK], labels.float()
        )
    assert result.mean_loss == pytest.approx(float(expected), rel=1e-6)


def test_training_reduces_the_loss() -> None:
    net = model()
    data = [batch(64, seed=3)]
    first = train_steps(net, torch.optim.SGD(net.parameters(), lr=0.2), data, steps=1)
    later = train_steps(net, torch.optim.SGD(net.parameters(), lr=0.2), data, steps=40)
    final = train_steps(net, torch.optim.SGD(net.parameters(), lr=0.0), data, steps=1)
    assert later.mean_loss < first.mean_loss
    assert final.mean_loss < first.mean_loss


def test_an_empty_batch_takes_a_step_without_loss() -> None:
    net = model()
    optimizer = CountingOptimizer(net.parameters(), lr=0.1)
    before = state_arrays(net)
    empty = [(*inputs(torch.empty(0, N_FEATURES)), torch.empty(0, dtype=torch.long))]
    result = train_steps(net, optimizer, empty, steps=2)
    assert optimizer.steps_taken == 2
    assert result.samples_seen == 0
    assert math.isnan(result.mean_loss)
    after = state_arrays(net)
    assert all(np.array_equal(before[name], after[name]) for name in before)  # zero gradient


def test_refuses_zero_steps() -> None:
    net = model()
    with pytest.raises(ValueError, match="steps"):
        train_steps(net, torch.optim.SGD(net.parameters(), lr=0.1), [batch(2, seed=0)], steps=0)


def test_refuses_a_source_without_batches() -> None:
    net = model()
    with pytest.raises(ValueError, match="no batches"):
        train_steps(net, torch.optim.SGD(net.parameters(), lr=0.1), [], steps=1)


def test_evaluate_matches_the_metrics_by_hand() -> None:
    net = model()
    features, known, labels = batch(40, seed=4)
    net.train()
    result = evaluate(net, (features, known), labels)
    assert not net.training
    with torch.no_grad():
        logits = net(features, known)[TASK]
    expected_loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
    assert result.examples == 40
    assert result.loss == pytest.approx(float(expected_loss), rel=1e-6)
    assert result.auroc == pytest.approx(auroc(labels.numpy(), logits.numpy()))
    assert result.accuracy == pytest.approx(float(((logits > 0).long() == labels).float().mean()))


def test_evaluate_does_not_touch_gradients() -> None:
    net = model()
    features, known, labels = batch(8, seed=5)
    evaluate(net, (features, known), labels)
    assert all(p.grad is None for p in net.parameters())


def test_evaluate_on_nothing_is_undefined() -> None:
    empty = inputs(torch.empty(0, N_FEATURES))
    result = evaluate(model(), empty, torch.empty(0, dtype=torch.long))
    assert result.examples == 0
    assert all(math.isnan(v) for v in (result.loss, result.auroc, result.accuracy))


def test_evaluate_with_one_class_has_no_auroc() -> None:
    features, known, _ = batch(6, seed=6)
    result = evaluate(model(), (features, known), torch.ones(6, dtype=torch.long))
    assert math.isnan(result.auroc)
    assert math.isfinite(result.loss)
