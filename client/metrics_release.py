"""How a model does at this site, as the DP release of `privacy.release` says it may leave.

`patient_stats` computes each patient's loss (and score, correctness or squared error)
for the reported task; `noisy_check` sums them into one vector, adds Gaussian noise
and derives the figures the reply carries. The caller charges `release_event` to the
ledger before the reply leaves the site.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from medfed.client.protocol import HeldOut, ModelCheck
from medfed.model.contract import StudyContract, TaskSpec
from medfed.model.losses import task_loss
from medfed.model.tokenizers import split_tensors
from medfed.model.train import predict
from medfed.privacy import release
from medfed.privacy.release import PatientStats


def patient_stats(
    model: torch.nn.Module,
    tensors: Sequence[torch.Tensor],
    contract: StudyContract,
    task: TaskSpec,
) -> PatientStats:
    """Per labelled patient of `task`: loss, and the task kind's per-patient statistic.

    A survival task's Cox loss ties patients through their risk sets, so no per-patient
    loss of it is bounded: its loss is not released (reported as undefined). A
    per-patient survival loss (the discrete-time hazard) is released like any loss."""
    if int(tensors[0].shape[0]) == 0:
        return PatientStats(loss=np.zeros(0))
    inputs, targets = split_tensors(contract, tensors)
    output = predict(model, inputs)[task.name]
    target, present = targets[task.name]
    mask = present.reshape(-1).to(torch.bool)
    if _cox(task):  # counted, but no loss of it is released
        return PatientStats(loss=np.zeros(int(mask.sum())))
    with torch.no_grad():
        losses = task_loss(task, output, target, present)[mask].double().numpy()
    labelled = output[mask].double()
    truth = target[mask].double()
    if task.kind == "binary":
        score = torch.sigmoid(labelled.reshape(-1)).numpy()
        return PatientStats(loss=losses, score=score, truth=truth.reshape(-1).numpy())
    if task.kind == "multiclass":
        correct = labelled.reshape(len(truth), -1).argmax(dim=1) == truth.reshape(-1).long()
        return PatientStats(loss=losses, correct=correct.double().numpy())
    if task.kind == "regression":
        squared = ((labelled.reshape(-1) - truth.reshape(-1)) ** 2).numpy()
        return PatientStats(loss=losses, squared_error=squared)
    return PatientStats(loss=losses)


def _cox(task: TaskSpec) -> bool:
    """A survival task trained with the Cox partial likelihood (no per-patient loss)."""
    return task.kind == "survival" and getattr(task, "survival_loss", "cox") == "cox"


def noisy_check(
    train: PatientStats,
    held_out: PatientStats,
    *,
    noise_multiplier: float,
    task: TaskSpec,
    min_cohort_k: int,
) -> ModelCheck:
    """One Gaussian release of both populations' statistics, and the figures it gives.

    The noised counts stand in for every count; a figure over fewer (noised) patients
    than `min_cohort_k` is withheld (NaN) on top of the noise."""
    survival = _cox(task)
    rows = release.statistics_rows(
        PatientStats(loss=np.zeros(train.patients)) if survival else train,
        PatientStats(loss=np.zeros(held_out.patients)) if survival else held_out,
    )
    vector = release.release(rows, noise_multiplier=noise_multiplier)
    figures = release.metrics_of(vector)
    held_count = round(figures.held_out_count)
    enough = held_count >= min_cohort_k
    nan = math.nan
    held = HeldOut(
        examples=held_count if enough else 0,
        loss=nan if survival or not enough else figures.held_out_loss,
        auroc=figures.auroc if enough and task.kind == "binary" else nan,
        accuracy=figures.accuracy if enough and task.kind in ("binary", "multiclass") else nan,
        c_index=nan,
        rmse=figures.rmse if enough and task.kind == "regression" else nan,
    )
    return ModelCheck(
        train_examples=max(0, round(figures.train_count)),
        train_loss=nan if survival else figures.train_loss,
        held_out=held,
        stats=tuple(float(v) for v in vector),
    )
