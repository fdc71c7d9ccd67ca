"""Every grad-sample mode against a trusted reference: micro-batches of one, clipped by hand.

For each layer type the network uses, the clipped, summed gradient Opacus accumulates
(before noise) must equal the sum over samples of each sample's own gradient, computed
alone on an unwrapped copy of the model and clipped to the norm by hand.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from medfed.privacy.bookkeeping import BookKeepingOptimizer
from medfed.privacy.dpsgd import (
    GRAD_SAMPLE_MODES,
    DpSgdSettings,
    GradSampleMode,
    PrivateTraining,
    make_private,
)
from medfed.privacy.errors import DpConfigError

# Opacus's hooks make torch warn that a full backward hook fires with no input needing
# gradients (the inputs never do); third-party noise, silenced in the client as well.
# Opacus's functorch mode wraps each layer in a float32 autocast, which torch says CPU
# autocast ignores. Both third-party noise.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:In CPU autocast, but the target dtype:UserWarning"),
]

N = 6
MAX_GRAD_NORM = 0.05


class Linear2d(nn.Module):
    """Linear layers on (n, features)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 4)
        self.second = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.second(torch.tanh(self.first(x))).squeeze(-1)
        return out


class Linear3d(nn.Module):
    """A Linear layer on token sequences (n, length, features), then pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Linear(5, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.tanh(self.tokens(x.reshape(x.shape[0], 3, 5))).mean(dim=1)
        out: torch.Tensor = self.head(pooled).squeeze(-1)
        return out


class EmbeddingNet(nn.Module):
    """An embedding of token ids (n, length), pooled, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous, as token ids from a data loader are: Opacus's ghost norm sampler
        # for embeddings takes a view of them and fails on a strided slice.
        ids = (x.abs() * 3).long().clamp(max=6)[:, :4].contiguous()
        out: torch.Tensor = self.head(self.embed(ids).mean(dim=1)).squeeze(-1)
        return out


class LayerNormNet(nn.Module):
    """LayerNorm on token sequences between Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Linear(5, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.tokens(x.reshape(x.shape[0], 3, 5)))
        out: torch.Tensor = self.head(hidden.mean(dim=1)).squeeze(-1)
        return out


MODULES: dict[str, Callable[[], nn.Module]] = {
    "linear-2d": Linear2d,
    "linear-3d": Linear3d,
    "embedding": EmbeddingNet,
    "layernorm": LayerNormNet,
}
FEATURES = {"linear-2d": 5, "linear-3d": 15, "embedding": 15, "layernorm": 15}


def data(kind: str, *, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(N, FEATURES[kind], generator=generator) * 2.0
    labels = (torch.rand(N, generator=generator) < 0.5).float()
    return TensorDataset(features, labels)


def per_sample_losses(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(output, labels, reduction="none")


def build(kind: str) -> nn.Module:
    torch.manual_seed(11)
    return MODULES[kind]()


def clipped_sum_by_hand(model: nn.Module, dataset: TensorDataset) -> dict[str, torch.Tensor]:
    """Sum over samples of each one's own gradient (a batch of one), clipped by hand."""
    total: dict[str, torch.Tensor] = {}
    norms = []
    for features, label in zip(*dataset.tensors, strict=True):
        model.zero_grad()
        per_sample_losses(model(features.unsqueeze(0)), label.unsqueeze(0)).sum().backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}  # type: ignore[union-attr]
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
        norms.append(norm)
        factor = min(1.0, MAX_GRAD_NORM / (norm + 1e-6))  # Opacus's formula
        for name, grad in grads.items():
            total[name] = total.get(name, torch.zeros_like(grad)) + factor * grad
    assert max(norms) > MAX_GRAD_NORM  # clipping is really exercised
    return total


def private(model: nn.Module, dataset: TensorDataset, mode: GradSampleMode) -> PrivateTraining:
    settings = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=MAX_GRAD_NORM, sample_rate=1.0)
    return make_private(model, dataset, settings=settings, learning_rate=0.1, grad_sample_mode=mode)


def opacus_clipped_sum(
    training: PrivateTraining, dataset: TensorDataset
) -> dict[str, torch.Tensor]:
    """The clipped per-sample gradients Opacus sums before it adds noise.

    Ghost clipping's second backward pass leaves that sum in `.grad`; the other Opacus
    modes clip the per-sample gradients in `clip_and_accumulate` and leave it in
    `.summed_grad`; book-keeping's `accumulate` keeps it in `clipped_sums()`.
    """
    features, labels = dataset.tensors
    training.optimizer.zero_grad()
    training.reduce_loss(per_sample_losses(training.model(features), labels)).backward()
    if isinstance(training.optimizer, BookKeepingOptimizer):
        training.optimizer.accumulate()
        sums = training.optimizer.clipped_sums()
        return {name: sums[p] for name, p in training.model.named_parameters()}
    if training.grad_sample_mode != "ghost":
        training.optimizer.clip_and_accumulate()  # type: ignore[attr-defined]
    field = "grad" if training.grad_sample_mode == "ghost" else "summed_grad"
    return {
        name.removeprefix("_module."): getattr(p, field).detach().clone()
        for name, p in training.model.named_parameters()
    }


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("kind", sorted(MODULES))
def test_clipped_sum_matches_micro_batches(kind: str, mode: GradSampleMode) -> None:
    dataset = data(kind)
    model = build(kind)
    expected = clipped_sum_by_hand(copy.deepcopy(model), dataset)
    actual = opacus_clipped_sum(private(model, dataset, mode), dataset)
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_a_step_applies_the_noised_clipped_mean(mode: GradSampleMode) -> None:
    dataset = data("layernorm", seed=1)
    model = build("layernorm")
    reference = copy.deepcopy(model)
    before = {name: p.detach().clone() for name, p in reference.named_parameters()}
    clipped = clipped_sum_by_hand(reference, dataset)
    # Noise cannot be zero; 1e-6 of the clipping norm is far below the tolerance.
    settings = DpSgdSettings(noise_multiplier=1e-6, max_grad_norm=MAX_GRAD_NORM, sample_rate=1.0)
    training = make_private(
        model, dataset, settings=settings, learning_rate=0.5, grad_sample_mode=mode
    )
    features, labels = dataset.tensors
    training.optimizer.zero_grad()
    training.reduce_loss(per_sample_losses(training.model(features), labels)).backward()
    training.optimizer.step()
    for name, p in training.model.named_parameters():
        key = name.removeprefix("_module.")
        expected = before[key] - 0.5 * clipped[key] / N
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_an_empty_batch_steps_with_noise(mode: GradSampleMode) -> None:
    dataset = data("layernorm", seed=2)
    training = private(build("layernorm"), dataset, mode)
    before = [p.detach().clone() for p in training.model.parameters()]
    features, labels = dataset.tensors[0][:0], dataset.tensors[1][:0]
    training.optimizer.zero_grad()
    training.reduce_loss(per_sample_losses(training.model(features), labels)).backward()
    training.optimizer.step()
    after = list(training.model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.isfinite(p).all() for p in after)


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(DpConfigError, match="grad_sample_mode"):
        private(build("linear-2d"), data("linear-2d"), "vmap")  # type: ignore[arg-type]
