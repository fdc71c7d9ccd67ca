"""Training and evaluation steps for the multitask network; DP is wired in by the caller.

`train_steps` takes any optimiser and batch source, so the site can pass Opacus's
DP optimiser and Poisson data loader, and a `reduce_loss` that turns the batch's
per-sample losses into what `.backward()` runs on (ghost clipping needs that); this
module itself imports nothing of Opacus. Batches are tuples of tensors laid out as
`EncodedBatch.tensors()`; `split_tensors` tells inputs from targets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from medfed.model.contract import StudyContract, TaskSpec
from medfed.model.losses import RegressionLoss, mean_task_loss, per_sample_loss, survival_risk
from medfed.model.metrics import accuracy, auroc, concordance_index, multiclass_accuracy, rmse
from medfed.model.tokenizers import split_tensors

Batch = Sequence[torch.Tensor]
"""One batch: the network's input tensors, then (target, labelled) per task."""

LossReducer = Callable[[torch.Tensor], Any]
"""Per-sample losses (n,) -> what `.backward()` is called on (a tensor, or Opacus's
ghost-clipping loss). The default is the mean, a zero on an empty batch."""


@runtime_checkable
class AccumulatingOptimizer(Protocol):
    """A DP optimiser that clips each physical batch on its own (book-keeping's):
    `accumulate()` folds the physical batch just backpropagated into the logical step."""

    def accumulate(self) -> None: ...


EVAL_CHUNK_ROWS = 1024
"""Patients evaluated per forward pass: bounds evaluation's memory on large sets."""


@dataclass(frozen=True)
class TrainResult:
    """What a run of local steps did: steps taken and the mean loss over non-empty batches."""

    steps: int
    mean_loss: float
    samples_seen: int


@dataclass(frozen=True)
class EvalResult:
    """A binary task's metrics on one labelled set (what sites report to the coordinator)."""

    examples: int
    loss: float
    auroc: float
    accuracy: float


TaskMetrics = dict[str, float]
"""One task's metrics: `examples` and `loss` always; binary: `auroc`, `accuracy`;
multiclass: `accuracy`; regression: `rmse`; survival: `c_index`. NaN when undefined."""


def mean_loss(per_sample: torch.Tensor) -> torch.Tensor:
    """The mean of per-sample losses; on an empty batch a zero that still backpropagates."""
    if per_sample.numel() == 0:
        return per_sample.sum()
    return per_sample.mean()


def _cycle(batches: Iterable[Batch]) -> Iterator[Batch]:
    while True:
        produced = False
        for batch in batches:
            produced = True
            yield batch
        if not produced:
            raise ValueError("the batch source produced no batches")


def _anchored(
    model: nn.Module, anchor: Mapping[str, torch.Tensor]
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Each trainable parameter with its anchor; a wrapper's `_module.` prefix is ignored."""
    pairs = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        key = name if name in anchor else name.removeprefix("_module.")
        if key not in anchor:
            raise ValueError(f"the anchor has no parameter {key!r}")
        target = anchor[key].to(device=parameter.device, dtype=parameter.dtype)
        if target.shape != parameter.shape:
            raise ValueError(f"anchor {key!r} has shape {tuple(target.shape)}")
        pairs.append((parameter, target))
    return pairs


@torch.no_grad()
def _proximal_step(
    optimizer: torch.optim.Optimizer,
    pairs: list[tuple[nn.Parameter, torch.Tensor]],
    mu: float,
) -> None:
    """FedProx's pull towards the anchor, w <- w - lr * mu * (w - anchor).

    It depends on no patient's data, so it is applied outside the private gradient:
    clipping and noise stay exactly those of the data's gradient.
    """
    lr = float(optimizer.param_groups[0]["lr"])
    for parameter, target in pairs:
        parameter.sub_(lr * mu * (parameter - target))


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    *,
    steps: int,
    contract: StudyContract,
    proximal_mu: float = 0.0,
    anchor: Mapping[str, torch.Tensor] | None = None,
    reduce_loss: LossReducer = mean_loss,
    regression: RegressionLoss = "mse",
    physical_batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> TrainResult:
    """Run exactly `steps` optimiser steps of the multitask loss over `batches` (cycled).

    An empty batch (possible under Poisson sampling) still takes its step, so a DP
    optimiser adds its noise and the accountant's step count stays true. With
    `proximal_mu` > 0 each step is followed by FedProx's pull towards `anchor`.
    `physical_batch_size` bounds memory: a larger (logical) batch runs forward and
    backward in parts of that many rows, its gradient accumulated, and takes one step
    (Opacus's BatchMemoryManager semantics). `autocast_dtype` (bf16) runs the forward
    pass under autocast.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if proximal_mu < 0 or not np.isfinite(proximal_mu):
        raise ValueError(f"proximal_mu must be finite and >= 0, got {proximal_mu}")
    if proximal_mu > 0 and anchor is None:
        raise ValueError("proximal_mu > 0 needs the anchor (the global model's parameters)")
    pairs = _anchored(model, anchor) if proximal_mu > 0 and anchor is not None else []
    model.train()
    losses: list[float] = []
    seen = 0
    source = _cycle(batches)
    device = _device_of(model)
    for _ in range(steps):
        batch = tuple(tensor.to(device) for tensor in next(source))
        optimizer.zero_grad()
        rows = int(batch[0].shape[0])
        parts = _parts(rows, physical_batch_size, contract, optimizer, reduce_loss)
        total = 0.0
        for start, stop in parts:
            inputs, targets = split_tensors(contract, tuple(t[start:stop] for t in batch))
            with _autocast(device, autocast_dtype):
                outputs = model(*inputs)
                per_sample = per_sample_loss(contract, outputs, targets, regression=regression)
            per_sample = per_sample.float()
            total += float(per_sample.detach().sum())
            loss = reduce_loss(per_sample)
            if len(parts) > 1 and not isinstance(optimizer, AccumulatingOptimizer):
                loss = loss * ((stop - start) / rows)  # the parts' means make the batch's
            loss.backward()
            if len(parts) > 1 and isinstance(optimizer, AccumulatingOptimizer):
                optimizer.accumulate()
        if rows > 0:
            losses.append(total / rows)
            seen += rows
        optimizer.step()
        if pairs:
            _proximal_step(optimizer, pairs, proximal_mu)
    mean = float(np.mean(losses)) if losses else float("nan")
    return TrainResult(steps=steps, mean_loss=mean, samples_seen=seen)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _parts(
    rows: int,
    physical_batch_size: int | None,
    contract: StudyContract,
    optimizer: torch.optim.Optimizer,
    reduce_loss: LossReducer,
) -> list[tuple[int, int]]:
    """The (start, stop) rows of each physical batch of a logical batch of `rows`."""
    if physical_batch_size is None or rows <= physical_batch_size:
        return [(0, rows)]
    if physical_batch_size < 1:
        raise ValueError(f"physical_batch_size must be at least 1, got {physical_batch_size}")
    if any(task.kind == "survival" for task in contract.tasks):
        raise ValueError(
            "physical batches would split the Cox loss's risk sets: a survival study"
            " trains on whole logical batches"
        )
    if not isinstance(optimizer, AccumulatingOptimizer) and reduce_loss is not mean_loss:
        raise ValueError(
            "physical batches need plain SGD with the mean loss or an optimiser that"
            " clips each physical batch (book-keeping DP-SGD)"
        )
    return [(s, min(s + physical_batch_size, rows)) for s in range(0, rows, physical_batch_size)]


@torch.no_grad()
def predict(model: nn.Module, inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's outputs per task over all rows of `inputs`, in chunks, in eval mode."""
    model.eval()
    device = _device_of(model)
    n = int(inputs[0].shape[0])
    chunks: list[Mapping[str, torch.Tensor]] = [
        model(*(tensor[start : start + EVAL_CHUNK_ROWS].to(device) for tensor in inputs))
        for start in range(0, n, EVAL_CHUNK_ROWS)
    ]
    if not chunks:
        chunks = [model(*(tensor.to(device) for tensor in inputs))]
    # Outputs come back to the CPU, where the targets and the metrics are.
    return {name: torch.cat([chunk[name].cpu() for chunk in chunks]) for name in chunks[0]}


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters are: batches (kept on the CPU) move there per step."""
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def _task_metrics(
    task: TaskSpec,
    output: torch.Tensor,
    target: torch.Tensor,
    labelled: torch.Tensor,
    regression: RegressionLoss,
) -> TaskMetrics:
    mask = labelled.reshape(-1).to(torch.bool)
    metrics: TaskMetrics = {
        "examples": float(int(mask.sum())),
        "loss": mean_task_loss(task, output, target, labelled, regression=regression),
    }
    if task.kind == "survival":
        output = survival_risk(task, output)
    elif task.kind == "regression":  # back to the target's own unit
        output = output * task.reference_scale + task.reference_mean
    scores = output[mask].detach().cpu().numpy().astype(np.float64)
    truth = target[mask].detach().cpu().numpy().astype(np.float64)
    if task.kind == "binary":
        metrics["auroc"] = auroc(truth, scores)
        metrics["accuracy"] = accuracy(truth, scores)
    elif task.kind == "multiclass":
        metrics["accuracy"] = multiclass_accuracy(truth, scores.reshape(len(truth), task.outputs))
    elif task.kind == "regression":
        metrics["rmse"] = rmse(truth, scores)
    else:
        truth = truth.reshape(-1, 2)
        metrics["c_index"] = concordance_index(truth[:, 0], truth[:, 1], scores)
    return metrics


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tensors: Batch,
    contract: StudyContract,
    *,
    regression: RegressionLoss = "mse",
) -> dict[str, TaskMetrics]:
    """Per task, the loss (mean over its labelled patients) and the kind's metrics.

    `tensors` is a whole labelled set laid out as `EncodedBatch.tensors()`. The Cox
    loss and the c-index use the whole set's risk sets, not a batch's.
    """
    inputs, targets = split_tensors(contract, tensors)
    outputs = predict(model, inputs)
    return {
        task.name: _task_metrics(task, outputs[task.name], *targets[task.name], regression)
        for task in contract.tasks
    }


def binary_result(metrics: TaskMetrics) -> EvalResult:
    """A binary task's metrics as the `EvalResult` that sites report."""
    return EvalResult(
        examples=int(metrics["examples"]),
        loss=metrics["loss"],
        auroc=metrics["auroc"],
        accuracy=metrics["accuracy"],
    )
