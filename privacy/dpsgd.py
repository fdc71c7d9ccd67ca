"""DP-SGD through Opacus: Poisson sampling, per-sample clipping and Gaussian noise.

Noise and sampling draw from generators seeded from the operating system's
cryptographic source (`secrets`), never from a fixed or guessable seed.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from opacus import PrivacyEngine
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medfed.privacy.errors import DpConfigError
from medfed.privacy.events import DpSgdEvent

log = logging.getLogger(__name__)

GradSampleMode = Literal["hooks", "functorch", "ew", "ghost"]
"""How Opacus gets per-sample gradient norms (Opacus 1.6): backward hooks per layer type,
functorch's vmap over every layer, torch's expanded weights, or ghost clipping (norms
without materialising per-sample gradients, at the cost of a second backward pass)."""

GRAD_SAMPLE_MODES: tuple[GradSampleMode, ...] = get_args(GradSampleMode)

DEFAULT_GRAD_SAMPLE_MODE: GradSampleMode = "hooks"
"""Opacus's own default, and correct for every layer of the network (see the tests)."""

LossReducer = Callable[[torch.Tensor], Any]
"""Turns a batch's per-sample losses into what `.backward()` is called on: a mean tensor,
or Opacus's ghost-clipping loss, whose `.backward()` runs its two passes."""


@dataclass(frozen=True)
class DpSgdSettings:
    """The DP-SGD mechanism's parameters for one round at one site."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise DpConfigError(
                f"max_grad_norm must be positive and finite, got {self.max_grad_norm}"
            )
        # The event validates noise and rate.
        DpSgdEvent(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=1)


@dataclass(frozen=True)
class PrivateTraining:
    """A model, optimiser and Poisson data loader wrapped by Opacus, and the true sample rate."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader[tuple[torch.Tensor, ...]]
    sample_rate: float
    grad_sample_mode: GradSampleMode
    reduce_loss: LossReducer
    """Pass the batch's per-sample losses through this before `.backward()`."""

    def event(self, steps: int) -> DpSgdEvent:
        """The privacy event of `steps` steps of this training."""
        return DpSgdEvent(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=steps
        )

    @property
    def noise_multiplier(self) -> float:
        return float(self.optimizer.noise_multiplier)  # type: ignore[attr-defined]


def _secure_generator(device: torch.device | None = None) -> torch.Generator:
    return torch.Generator(device=device or "cpu").manual_seed(secrets.randbits(63))


def mean_loss(per_sample: torch.Tensor) -> torch.Tensor:
    """The mean of per-sample losses; a zero that still backpropagates on an empty batch."""
    if per_sample.numel() == 0:
        return per_sample.sum()
    return per_sample.mean()


class _PerSampleCriterion:
    """The criterion ghost clipping wraps: the caller already computed per-sample losses."""

    reduction = "mean"

    def __call__(self, per_sample: torch.Tensor) -> torch.Tensor:
        return per_sample


class _GhostLoss:
    """Ghost clipping's two-pass loss, with an empty batch taking an ordinary zero step.

    On an empty Poisson batch there are no per-sample norms to clip by; a zero loss's
    backward (hooks off, see `_EmptyBatchGuard`) leaves zero gradients, and the
    optimiser's step still adds the noise.
    """

    def __init__(self, wrapped: DPLossFastGradientClipping) -> None:
        self._wrapped = wrapped

    def __call__(self, per_sample: torch.Tensor) -> Any:
        if per_sample.numel() == 0:
            return per_sample.sum()
        return self._wrapped(per_sample)


class _EmptyBatchGuard(nn.Module):
    """Opacus's wrapped module, made to take empty Poisson batches in every mode.

    Per-sample machinery fails on a batch of zero rows (expanded weights refuse it,
    functorch and ghost clipping cannot shape their empty results). Such a batch has
    no data gradient to clip, so it runs through the plain module with Opacus's hooks
    off and empty per-sample gradients; the optimiser's step still adds its noise. The
    next non-empty batch turns the hooks back on. Parameters keep the names Opacus
    gives them (`_module.*`).
    """

    def __init__(self, wrapped: nn.Module, *, ghost: bool) -> None:
        super().__init__()
        inner = wrapped._module
        if not isinstance(inner, nn.Module):
            raise TypeError("Opacus's wrapped module holds no module")
        self._module: nn.Module = inner
        self._wrapped = (wrapped,)  # a tuple: not registered twice as a submodule
        self._ghost = ghost

    def _hooks(self, enabled: bool) -> None:
        switch = getattr(self._wrapped[0], "enable_hooks" if enabled else "disable_hooks", None)
        if switch is not None:
            switch()

    def forward(self, *inputs: torch.Tensor) -> Any:
        if inputs and inputs[0].shape[0] == 0:
            self._hooks(False)
            if not self._ghost:  # ghost clipping reads `.grad`, the others `.grad_sample`
                for parameter in self._module.parameters():
                    if parameter.requires_grad:
                        empty = parameter.new_zeros((0, *parameter.shape))
                        parameter.grad_sample = empty  # type: ignore[attr-defined]
            return self._module(*inputs)
        self._hooks(True)
        return self._wrapped[0](*inputs)


def make_private(
    model: nn.Module,
    dataset: TensorDataset,
    *,
    settings: DpSgdSettings,
    learning_rate: float,
    grad_sample_mode: GradSampleMode = DEFAULT_GRAD_SAMPLE_MODE,
) -> PrivateTraining:
    """Wrap `model` for DP-SGD over `dataset` (one row per patient) with plain SGD.

    The batch size is chosen so that Opacus's Poisson sampling rate is the nearest
    it can get to `settings.sample_rate`; the rate its sampler really uses is
    returned and is what the ledger must record. Every grad-sample mode clips each
    patient's whole gradient to `settings.max_grad_norm` (flat clipping) and is
    trained the same way: per-sample losses through `reduce_loss`, then `.backward()`.
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise DpConfigError(
            f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, got"
            f" {grad_sample_mode!r}"
        )
    n = len(dataset)
    if n < 2:
        raise DpConfigError(f"DP-SGD needs at least 2 patients, got {n}")
    batch_size = max(1, round(settings.sample_rate * n))
    model.train()
    loader: DataLoader[tuple[torch.Tensor, ...]] = DataLoader(dataset, batch_size=batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    with warnings.catch_warnings():
        # Opacus's secure_mode needs torchcsprng, which has no build for this torch;
        # the noise and sampling generators below are seeded from `secrets` instead.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
        private = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=_PerSampleCriterion(),
            data_loader=loader,
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            poisson_sampling=True,
            # The noise is drawn where the parameters are (cuda: a cuda generator).
            noise_generator=_secure_generator(_parameter_device(model)),
            grad_sample_mode=grad_sample_mode,
        )
    reduce_loss: LossReducer
    if grad_sample_mode == "ghost":
        private_model, private_optimizer, criterion, private_loader = private
        reduce_loss = _GhostLoss(criterion)
    else:
        private_model, private_optimizer, private_loader = private
        reduce_loss = mean_loss
    private_model = _EmptyBatchGuard(private_model, ghost=grad_sample_mode == "ghost")
    private_loader.batch_sampler.generator = _secure_generator()
    sample_rate = float(private_loader.sample_rate)
    return PrivateTraining(
        private_model,
        private_optimizer,
        private_loader,
        sample_rate,
        grad_sample_mode,
        reduce_loss,
    )


def _parameter_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device
