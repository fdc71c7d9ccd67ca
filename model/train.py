"""Training and evaluation steps for the model; differential privacy is wired in by the caller.

`train_steps` takes any optimiser and batch source, so the site can pass Opacus's
DP optimiser and Poisson data loader; this module itself imports nothing of Opacus.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from model.metrics import accuracy, auroc


@dataclass(frozen=True)
class TrainResult:
    """What a run of local steps did: steps taken and the mean loss over non-empty batches."""

    steps: int
    mean_loss: float
    samples_seen: int


@dataclass(frozen=True)
class EvalResult:
    """Metrics of a model on one labelled set."""

    examples: int
    loss: float
    auroc: float
    accuracy: float


Batch = Sequence[torch.Tensor]
"""The model's input tensors, then the labels."""


def _logits(model: nn.Module, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The single task's outputs (a study with one binary task, as the demo has)."""
    outputs = model(*inputs)
    if isinstance(outputs, Mapping):
        if len(outputs) != 1:
            raise ValueError(f"expected one task's outputs, got {sorted(outputs)}")
        (outputs,) = outputs.values()
    logits: torch.Tensor = outputs
    return logits


def _cycle(batches: Iterable[Batch]) -> Iterator[Batch]:
    while True:
        produced = False
        for batch in batches:
            produced = True
            yield batch
        if not produced:
            raise ValueError("the batch source produced no batches")


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    *,
    steps: int,
) -> TrainResult:
    """Run exactly `steps` optimiser steps of binary cross-entropy over `batches` (cycled).

    An empty batch (possible under Poisson sampling) still takes its step, so a DP
    optimiser adds its noise and the accountant's step count stays true.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    model.train()
    loss_fn = nn.BCEWithLogitsLoss()
    losses: list[float] = []
    seen = 0
    source = _cycle(batches)
    for _ in range(steps):
        *inputs, labels = next(source)
        optimizer.zero_grad()
        logits = _logits(model, inputs)
        if len(labels) > 0:
            loss = loss_fn(logits, labels.float())
            losses.append(float(loss.detach()))
            seen += len(labels)
        else:
            # An empty Poisson batch: a zero loss still runs the backward pass, so a
            # DP optimiser sees (empty) per-sample gradients and adds its noise.
            loss = logits.sum() * 0.0
        loss.backward()
        optimizer.step()
    mean_loss = float(np.mean(losses)) if losses else float("nan")
    return TrainResult(steps=steps, mean_loss=mean_loss, samples_seen=seen)


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Sequence[torch.Tensor], labels: torch.Tensor) -> EvalResult:
    """Loss, AUROC and accuracy of `model` on one labelled set."""
    model.eval()
    if len(labels) == 0:
        return EvalResult(examples=0, loss=float("nan"), auroc=float("nan"), accuracy=float("nan"))
    logits = _logits(model, inputs)
    loss = float(nn.functional.binary_cross_entropy_with_logits(logits, labels.float()))
    scores = logits.cpu().numpy()
    truth = labels.cpu().numpy()
    return EvalResult(
        examples=len(labels),
        loss=loss,
        auroc=auroc(truth, scores),
        accuracy=accuracy(truth, scores),
    )
