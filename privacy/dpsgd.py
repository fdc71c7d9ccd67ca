"""DP-SGD through Opacus: Poisson sampling, per-sample clipping and Gaussian noise.

Noise and sampling draw from generators seeded from the operating system's
cryptographic source (`secrets`), never from a fixed or guessable seed.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.errors import DpConfigError
from privacy.events import DpSgdEvent

log = logging.getLogger(__name__)

GRAD_SAMPLE_MODE = "hooks"
"""Expanded weights: the fastest per-sample gradients on a CPU for this network (Opacus 1.6)."""


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

    def event(self, steps: int) -> DpSgdEvent:
        """The privacy event of `steps` steps of this training."""
        return DpSgdEvent(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=steps
        )

    @property
    def noise_multiplier(self) -> float:
        return float(self.optimizer.noise_multiplier)  # type: ignore[attr-defined]


def _secure_generator() -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63))


def poisson_rate(patients: int, sample_rate: float) -> float:
    """The sampling rate Opacus really uses for `sample_rate` over `patients` rows.

    Opacus samples each row with probability 1 / (batches per epoch) of the loader it
    wraps; `make_private` builds that loader with this batch size.
    """
    batch_size = max(1, round(sample_rate * patients))
    return 1.0 / math.ceil(patients / batch_size)


def make_private(
    model: nn.Module,
    dataset: TensorDataset,
    *,
    settings: DpSgdSettings,
    learning_rate: float,
) -> PrivateTraining:
    """Wrap `model` for DP-SGD over `dataset` (one row per patient) with plain SGD.

    The batch size is chosen so that Opacus's Poisson sampling rate is the nearest
    it can get to `settings.sample_rate`; the rate its sampler really uses is
    returned and is what the ledger must record.
    """
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
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            poisson_sampling=True,
            noise_generator=_secure_generator(),
            grad_sample_mode=GRAD_SAMPLE_MODE,
        )
    private_loader.batch_sampler.generator = _secure_generator()
    sample_rate = float(private_loader.sample_rate)
    return PrivateTraining(private_model, private_optimizer, private_loader, sample_rate)
