"""DP-SGD through Opacus, checked against per-sample gradients computed one sample at a time."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from medfed.model.network import MedModel, build_model
from medfed.model.train import train_steps
from medfed.privacy.dpsgd import DpSgdSettings, PrivateTraining, make_private
from medfed.privacy.errors import DpConfigError
from medfed.privacy.events import DpSgdEvent
from tests.modelkit import TASK, numeric_contract

N_FEATURES = 5
CONTRACT = numeric_contract(N_FEATURES)

# Opacus's hooks make torch warn that a full backward hook fires with no input needing
# gradients (the features never do); third-party noise, silenced in the client as well.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def dataset(n: int, *, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, N_FEATURES, generator=generator) * 2.0
    labels = (torch.rand(n, generator=generator) < 0.5).float()
    known = torch.ones(n, N_FEATURES, dtype=torch.bool)
    # The layout of `EncodedBatch.tensors()`: inputs, then the task's target and mask.
    return TensorDataset(features, known, labels, torch.ones(n, dtype=torch.bool))


def settings(
    *, noise: float = 1.0, max_grad_norm: float = 1.0, sample_rate: float = 0.1
) -> DpSgdSettings:
    return DpSgdSettings(
        noise_multiplier=noise, max_grad_norm=max_grad_norm, sample_rate=sample_rate
    )


def micro_batch_gradients(model: nn.Module, data: TensorDataset) -> list[dict[str, torch.Tensor]]:
    """Each sample's gradient of its own loss, from a plain model, one sample at a time."""
    loss_fn = nn.BCEWithLogitsLoss()
    gradients = []
    for features, known, label, _ in zip(*data.tensors, strict=True):
        model.zero_grad()
        logits = model(features.unsqueeze(0), known.unsqueeze(0))[TASK]
        loss_fn(logits, label.unsqueeze(0).float()).backward()
        gradients.append(
            {name: p.grad.detach().clone() for name, p in model.named_parameters()}  # type: ignore[union-attr]
        )
    return gradients


def wrapped_parameters(private: PrivateTraining) -> dict[str, nn.Parameter]:
    """The wrapped model's parameters under the unwrapped model's names."""
    return {name.removeprefix("_module."): p for name, p in private.model.named_parameters()}


def fresh_model(seed: int = 3) -> MedModel:
    return build_model("tiny", contract=CONTRACT, seed=seed)


def test_per_sample_gradients_match_micro_batches() -> None:
    data = dataset(7)
    model = fresh_model()
    reference = copy.deepcopy(model)
    private = make_private(
        model, data, settings=settings(sample_rate=1.0), learning_rate=0.1,
        grad_sample_mode="hooks",  # Opacus's per-sample gradients themselves
    )  # fmt: skip
    features, known, labels, _ = next(iter(private.loader))
    assert len(labels) == len(data)  # rate 1: Poisson sampling takes every patient
    private.optimizer.zero_grad()
    nn.BCEWithLogitsLoss()(private.model(features, known)[TASK], labels.float()).backward()

    expected = micro_batch_gradients(reference, data)
    parameters = wrapped_parameters(private)
    assert set(parameters) == set(expected[0])
    for name, parameter in parameters.items():
        grad_sample = parameter.grad_sample  # type: ignore[attr-defined]
        assert grad_sample.shape == (len(data), *parameter.shape)
        for i, sample_gradients in enumerate(expected):
            torch.testing.assert_close(
                grad_sample[i], sample_gradients[name], rtol=1e-4, atol=1e-6, msg=name
            )


def test_one_step_applies_clipped_mean_of_per_sample_gradients() -> None:
    data = dataset(8, seed=1)
    max_grad_norm, learning_rate = 0.05, 0.5
    model = fresh_model(seed=4)
    reference = copy.deepcopy(model)
    before = {name: p.detach().clone() for name, p in reference.named_parameters()}
    # Noise cannot be zero; 1e-6 of the clipping norm is far below the tolerance.
    private = make_private(
        model,
        data,
        settings=settings(noise=1e-6, max_grad_norm=max_grad_norm, sample_rate=1.0),
        learning_rate=learning_rate,
    )
    result = train_steps(
        private.model, private.optimizer, private.loader, steps=1, contract=CONTRACT
    )
    assert result.samples_seen == len(data)

    per_sample = micro_batch_gradients(reference, data)
    norms = [
        math.sqrt(sum(float(g.pow(2).sum()) for g in sample.values())) for sample in per_sample
    ]
    assert max(norms) > max_grad_norm  # clipping is really exercised
    factors = [min(1.0, max_grad_norm / norm) for norm in norms]
    unclipped_differs = False
    for name, parameter in wrapped_parameters(private).items():
        clipped_sum = sum(f * sample[name] for f, sample in zip(factors, per_sample, strict=True))
        expected = before[name] - learning_rate * clipped_sum / len(data)
        torch.testing.assert_close(parameter.detach(), expected, rtol=1e-4, atol=1e-6, msg=name)
        plain_sum = sum(sample[name] for sample in per_sample)
        unclipped = before[name] - learning_rate * plain_sum / len(data)
        unclipped_differs |= not torch.allclose(parameter.detach(), unclipped, atol=1e-5)
    assert unclipped_differs


def test_empty_poisson_batches_still_step() -> None:
    data = dataset(50)
    private = make_private(
        fresh_model(), data, settings=settings(sample_rate=0.02), learning_rate=0.1
    )
    assert private.sample_rate == pytest.approx(0.02)
    private.loader.batch_sampler.generator = torch.Generator().manual_seed(0)  # type: ignore[union-attr]
    sizes: list[int] = []

    class Recorded:
        def __iter__(self):  # type: ignore[no-untyped-def]
            for batch in private.loader:
                sizes.append(len(batch[0]))
                yield batch

    result = train_steps(private.model, private.optimizer, Recorded(), steps=30, contract=CONTRACT)
    assert result.steps == 30
    assert len(sizes) == 30
    assert 0 in sizes
    assert result.samples_seen == sum(sizes)


def test_an_empty_batch_adds_noise() -> None:
    private = make_private(
        fresh_model(), dataset(10), settings=settings(sample_rate=0.1), learning_rate=0.1
    )
    before = [p.detach().clone() for p in private.model.parameters()]
    empty = [
        (
            torch.empty(0, N_FEATURES),
            torch.empty(0, N_FEATURES, dtype=torch.bool),
            torch.empty(0),
            torch.empty(0, dtype=torch.bool),
        )
    ]
    result = train_steps(private.model, private.optimizer, empty, steps=1, contract=CONTRACT)
    assert result.samples_seen == 0
    assert math.isnan(result.mean_loss)
    after = list(private.model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.isfinite(p).all() for p in after)


@pytest.mark.parametrize(
    ("n", "requested", "batches"),
    [(100, 0.1, 10), (10, 0.3, 4), (7, 0.5, 2), (40, 0.01, 40), (2, 1.0, 1)],
)
def test_sample_rate_is_one_over_batches(n: int, requested: float, batches: int) -> None:
    private = make_private(
        fresh_model(), dataset(n), settings=settings(sample_rate=requested), learning_rate=0.1
    )
    assert len(private.loader) == batches
    assert private.sample_rate == 1.0 / batches
    assert private.loader.sample_rate == pytest.approx(private.sample_rate)  # type: ignore[attr-defined]


def test_sample_rate_is_the_rate_opacus_samples_at() -> None:
    private = make_private(
        fresh_model(), dataset(93), settings=settings(sample_rate=1 / 93), learning_rate=0.1
    )
    assert private.sample_rate == private.loader.sample_rate  # type: ignore[attr-defined]


def test_event_carries_the_mechanism() -> None:
    private = make_private(
        fresh_model(),
        dataset(20),
        settings=settings(noise=1.3, sample_rate=0.25),
        learning_rate=0.1,
    )
    assert private.noise_multiplier == 1.3
    assert private.event(12) == DpSgdEvent(noise_multiplier=1.3, sample_rate=0.25, steps=12)


def test_sampling_generators_are_not_fixed() -> None:
    draws = []
    for _ in range(2):
        private = make_private(fresh_model(), dataset(30), settings=settings(), learning_rate=0.1)
        draws.append([list(indices) for indices in private.loader.batch_sampler])  # type: ignore[union-attr]
    assert len(draws[0]) == len(draws[1]) == 10
    assert draws[0] != draws[1]


@pytest.mark.parametrize("n", [0, 1])
def test_too_few_patients_are_refused(n: int) -> None:
    with pytest.raises(DpConfigError, match="at least 2"):
        make_private(fresh_model(), dataset(n), settings=settings(), learning_rate=0.1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"max_grad_norm": math.nan}, "max_grad_norm"),
        ({"noise": 0.0}, "noise_multiplier"),
        ({"noise": math.inf}, "noise_multiplier"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(DpConfigError, match=field):
        settings(**kwargs)


def test_infinite_clipping_norm_is_refused() -> None:
    with pytest.raises(DpConfigError, match="max_grad_norm"):
        settings(max_grad_norm=math.inf)
