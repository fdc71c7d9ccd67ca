"""Book-keeping DP-SGD against trusted references, layer type by layer type.

References: each sample's own gradient from a batch of one on an unwrapped copy (its
norm, and the clipped sum by hand), and Opacus's `hooks` mode stepping with the same
noise generator seed (the whole clipped, noised, averaged step).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from medfed.privacy.bk_layers import explicit_preferred, ghost_preferred
from medfed.privacy.bookkeeping import BookKeepingOptimizer, attach_taps, detach_taps
from medfed.privacy.dpsgd import DpSgdSettings, PrivateTraining, make_private
from medfed.privacy.errors import DpConfigError

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

N = 6
MAX_GRAD_NORM = 0.05


class Linear2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(6, 4), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.second(torch.tanh(self.first(x[:, :6]))).squeeze(-1)
        return out


class LinearSequence(nn.Module):
    """A Linear layer on (n, tokens, width) whose shapes pick the ghost norm or not."""

    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.tokens, self.width = tokens, width
        self.layer, self.head = nn.Linear(width, width), nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(
            self.layer(x[:, : self.tokens * self.width].reshape(-1, self.tokens, self.width))
        )
        out: torch.Tensor = self.head(hidden.mean(1)).squeeze(-1)
        return out


class SharedLinear(nn.Module):
    """One Linear layer called on two sequences: 6 tokens (explicit) and 3 (ghost)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        long, short = x[:, :48].reshape(-1, 6, 8), x[:, 48:72].reshape(-1, 3, 8)
        pooled = torch.tanh(self.layer(long)).mean(1) + torch.tanh(self.layer(short)).mean(1)
        out: torch.Tensor = self.head(pooled).squeeze(-1)
        return out


class EmbeddingBag(nn.Module):
    """Ids from the features, embedded (perhaps with a padding row), pooled, then a head."""

    def __init__(self, rows: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.rows = rows
        self.embed = nn.Embedding(rows, 4, padding_idx=padding_idx)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x[:, :4].abs() * self.rows / 3).long().clamp(max=self.rows - 1)
        out: torch.Tensor = self.head(self.embed(ids).mean(1)).squeeze(-1)
        return out


class LayerNormNet(nn.Module):
    """LayerNorm on sequences between Linear layers, and a frozen Linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(5, 5).requires_grad_(False)
        self.tokens, self.norm, self.head = nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.tokens(self.frozen(x[:, :15].reshape(-1, 3, 5))))
        out: torch.Tensor = self.head(hidden.mean(1)).squeeze(-1)
        return out


MODULES: dict[str, Callable[[], nn.Module]] = {
    "linear-2d": Linear2d,
    "linear-sequence-ghost": lambda: LinearSequence(3, 8),
    "linear-sequence-explicit": lambda: LinearSequence(6, 4),
    "linear-shared": SharedLinear,
    "embedding-ghost": lambda: EmbeddingBag(50),
    "embedding-explicit": lambda: EmbeddingBag(3),
    "embedding-padding": lambda: EmbeddingBag(3, padding_idx=0),
    "layernorm": LayerNormNet,
}


def test_the_layer_shapes_exercise_both_rules() -> None:
    assert not explicit_preferred(3, 8, 8) and ghost_preferred(3, 8, 8)
    assert explicit_preferred(6, 4, 4) and explicit_preferred(6, 8, 8)
    assert ghost_preferred(4, 50, 4) and not ghost_preferred(4, 3, 4)


def data(seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(N, 72, generator=generator) * 2.0
    labels = (torch.rand(N, generator=generator) < 0.5).float()
    return TensorDataset(features, labels)


def losses(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(output, labels, reduction="none")


def build(kind: str) -> nn.Module:
    torch.manual_seed(11)
    return MODULES[kind]()


def micro_batches(
    model: nn.Module, dataset: TensorDataset
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Each sample's gradient norm (a batch of one), and the sum clipped by hand."""
    total: dict[str, torch.Tensor] = {}
    norms = []
    for features, label in zip(*dataset.tensors, strict=True):
        model.zero_grad()
        losses(model(features.unsqueeze(0)), label.unsqueeze(0)).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}  # type: ignore[union-attr]
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
        norms.append(norm)
        factor = min(1.0, MAX_GRAD_NORM / (norm + 1e-6))
        for name, grad in grads.items():
            total[name] = total.get(name, torch.zeros_like(grad)) + factor * grad
    assert max(norms) > MAX_GRAD_NORM  # clipping is really exercised
    return norms, total


def private(
    model: nn.Module, dataset: TensorDataset, mode: str = "bk", noise: float = 1.0
) -> PrivateTraining:
    settings = DpSgdSettings(noise_multiplier=noise, max_grad_norm=MAX_GRAD_NORM, sample_rate=1.0)
    return make_private(model, dataset, settings=settings, learning_rate=0.5, grad_sample_mode=mode)  # type: ignore[arg-type]


def backward(training: PrivateTraining, dataset: TensorDataset) -> BookKeepingOptimizer:
    features, labels = dataset.tensors
    training.optimizer.zero_grad()
    training.reduce_loss(losses(training.model(features), labels)).backward()
    assert isinstance(training.optimizer, BookKeepingOptimizer)
    return training.optimizer


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_norms_and_clipped_sum_match_micro_batches(kind: str) -> None:
    dataset, model = data(), build(kind)
    norms, expected = micro_batches(copy.deepcopy(model), dataset)
    training = private(model, dataset)
    optimizer = backward(training, dataset)
    recorded = optimizer.per_sample_norms()
    assert recorded is not None
    # The mean loss's output gradients are 1 / N of each sample's own.
    torch.testing.assert_close(
        recorded * N, torch.tensor(norms, dtype=torch.float32), rtol=1e-5, atol=1e-7
    )
    optimizer.accumulate()
    sums = optimizer.clipped_sums()
    actual = {name: sums[p] for name, p in model.named_parameters() if p.requires_grad}
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(p.grad is None for p in model.parameters())  # no plain gradient was computed


# Opacus 1.6's embedding sampler gives the padding row a gradient (torch gives it none):
# there the micro-batches above are the reference, not Opacus.
@pytest.mark.parametrize("kind", sorted(set(MODULES) - {"embedding-padding"}))
def test_a_step_equals_opacus_with_the_same_noise(kind: str) -> None:
    dataset = data(seed=1)
    stepped = {}
    for mode in ("bk", "hooks"):
        training = private(build(kind), dataset, mode)
        training.optimizer.generator = torch.Generator().manual_seed(2024)  # type: ignore[attr-defined]
        features, labels = dataset.tensors
        training.optimizer.zero_grad()
        training.reduce_loss(losses(training.model(features), labels)).backward()
        training.optimizer.step()
        stepped[mode] = {
            n.removeprefix("_module."): p.detach() for n, p in training.model.named_parameters()
        }
    before = dict(build(kind).named_parameters())
    for name, value in stepped["hooks"].items():
        assert not torch.equal(value, before[name]) or not before[name].requires_grad
        torch.testing.assert_close(stepped["bk"][name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_physical_batches_add_up_to_the_logical_batch() -> None:
    dataset, kind = data(seed=3), "linear-shared"
    whole = private(build(kind), dataset)
    backward(whole, dataset).accumulate()
    split = private(build(kind), dataset)
    features, labels = dataset.tensors
    split.optimizer.zero_grad()
    for rows in (slice(0, 2), slice(2, 6)):
        split.reduce_loss(losses(split.model(features[rows]), labels[rows])).backward()
        assert isinstance(split.optimizer, BookKeepingOptimizer)
        split.optimizer.accumulate()
    assert isinstance(whole.optimizer, BookKeepingOptimizer)
    for (p, expected), actual in zip(
        whole.optimizer.clipped_sums().items(), split.optimizer.clipped_sums().values(), strict=True
    ):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7, msg=str(p.shape))


def test_bf16_autocast_is_close_to_fp32() -> None:
    dataset, kind = data(seed=4), "linear-sequence-ghost"
    sums = []
    for dtype in (None, torch.bfloat16):
        training = private(build(kind), dataset)
        features, labels = dataset.tensors
        training.optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            per_sample = losses(training.model(features), labels)
        training.reduce_loss(per_sample.float()).backward()
        assert isinstance(training.optimizer, BookKeepingOptimizer)
        training.optimizer.accumulate()
        sums.append({p.shape: s for p, s in training.optimizer.clipped_sums().items()})
    for shape, reference in sums[0].items():
        assert sums[1][shape].dtype == torch.float32  # the sum is held in fp32
        torch.testing.assert_close(sums[1][shape], reference, rtol=3e-2, atol=2e-3)


class WithConvolution(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.conv = nn.Linear(3, 3), nn.Conv1d(1, 1, 2)


def test_an_unsupported_trainable_layer_is_refused_and_nothing_is_changed() -> None:
    model = WithConvolution()
    with pytest.raises(DpConfigError, match="'conv' \\(Conv1d\\)"):
        attach_taps(model)
    assert "forward" not in model.linear.__dict__
    model.conv.requires_grad_(False)  # frozen, it needs no clipping
    taps = attach_taps(model)
    assert [tap.name for tap in taps] == ["linear"]
    detach_taps(taps)
    assert "forward" not in model.linear.__dict__


def test_a_public_patient_count_sets_the_rate_and_the_average() -> None:
    settings = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=MAX_GRAD_NORM, sample_rate=0.3)
    training = make_private(
        build("linear-2d"), data(), settings=settings, learning_rate=0.5, public_patients=40
    )
    assert training.grad_sample_mode == "bk" and training.sample_rate == 0.3
    assert isinstance(training.optimizer, BookKeepingOptimizer)
    assert training.optimizer.expected_batch_size == pytest.approx(0.3 * 40)
