"""Losses per task kind, as per-sample vectors, and the multitask loss the network trains on.

Every loss here is computed per sample (a vector over the batch's rows, zero where a
sample has no label for the task) before it is reduced. That is what DP-SGD needs:
Opacus clips each sample's gradient, and ghost clipping even asks the criterion for
the per-sample losses themselves. The batch's loss is the MEAN OVER ITS ROWS of each
sample's summed task losses, so that Opacus's per-sample gradient (it scales by the
batch's row count for a mean loss) is exactly the gradient of that patient's own loss.
A mean over labelled samples only would scale a patient's gradient by rows/labelled.

Survival tasks train by default with a discrete-time hazard (`discrete_hazard_loss`):
follow-up is split at the contract's interval cuts, and each patient contributes the
logistic loss of "event in this interval or not" over the intervals they were at risk
in. That is a sum of per-patient terms, so DP-SGD's per-sample clipping bounds one
patient's whole influence. The Cox partial likelihood (`survival_loss = "cox"`) is not:
a patient's term depends on everyone still at risk, so its per-sample clipping does not
bound one patient's influence; `SURVIVAL_DP_CAVEAT` says so, and callers that train it
with DP must warn loudly (privacy is never silently weaker).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch.nn import functional

from medfed.model.contract import StudyContract, TaskSpec

RegressionLoss = Literal["mse", "huber"]
"""How regression heads are scored: squared error (the default) or Huber (delta 1)."""

HUBER_DELTA = 1.0
"""Huber's switch from quadratic to linear, in the target's standardised units."""

TaskTargets = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
"""Per task name: (target, present mask), as `model.tokenize.split_tensors` returns them."""

SURVIVAL_DP_CAVEAT = (
    'the Cox partial likelihood (survival_loss = "cox") couples patients through their'
    " risk sets, so DP-SGD's per-sample clipping does not bound one patient's whole"
    " influence on a survival task: its epsilon is optimistic for that task"
)


def _labelled(present: torch.Tensor, n: int) -> torch.Tensor:
    mask = present.reshape(-1).to(torch.bool)
    if mask.numel() != n:
        raise ValueError(f"present mask has {mask.numel()} entries for {n} samples")
    return mask


def binary_loss(logits: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Per-sample binary cross-entropy with logits (shape (n,)); 0 where unlabelled."""
    mask = _labelled(present, logits.shape[0])
    safe_target = torch.where(mask, target.reshape(-1).to(logits.dtype), 0.0)
    losses = functional.binary_cross_entropy_with_logits(logits, safe_target, reduction="none")
    return torch.where(mask, losses, 0.0)


def multiclass_loss(
    logits: torch.Tensor, target: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """Per-sample cross-entropy of logits (n, classes) against class indices; 0 where unlabelled."""
    mask = _labelled(present, logits.shape[0])
    classes = torch.where(mask, target.reshape(-1), 0).to(torch.long)
    if bool(((classes < 0) | (classes >= logits.shape[1])).any()):
        raise ValueError(f"class index outside 0..{logits.shape[1] - 1}")
    losses = functional.cross_entropy(logits, classes, reduction="none")
    return torch.where(mask, losses, 0.0)


def regression_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    present: torch.Tensor,
    *,
    kind: RegressionLoss = "mse",
) -> torch.Tensor:
    """Per-sample squared error or Huber loss (delta `HUBER_DELTA`); 0 where unlabelled."""
    mask = _labelled(present, prediction.shape[0])
    safe_target = torch.where(mask, target.reshape(-1).to(prediction.dtype), prediction.detach())
    if kind == "mse":
        losses = functional.mse_loss(prediction, safe_target, reduction="none")
    else:
        losses = functional.huber_loss(prediction, safe_target, reduction="none", delta=HUBER_DELTA)
    return torch.where(mask, losses, 0.0)


def cox_loss(risk: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Per-sample negative Cox partial log-likelihood, Breslow's handling of tied times.

    `risk` is the log hazard ratio (n,); `target` is (n, 2) = (time, event 1/0). A
    sample with an event at time t contributes log(sum over the risk set {time >= t} of
    exp(risk)) - its own risk; censored and unlabelled samples contribute 0. The risk
    set holds only labelled samples of this batch. The vector sums to -log PL.
    """
    n = risk.shape[0]
    mask = _labelled(present, n)
    if target.shape != (n, 2):
        raise ValueError(f"survival target has shape {tuple(target.shape)}, expected ({n}, 2)")
    losses = risk * 0.0  # connected to the graph even when no sample is labelled
    index = mask.nonzero().reshape(-1)
    if index.numel() == 0:
        return losses
    times = target[index, 0].to(risk.dtype)
    events = target[index, 1].to(risk.dtype)
    scores = risk[index]
    order = torch.argsort(times, descending=True, stable=True)
    log_cumulative = torch.logcumsumexp(scores[order], dim=0)
    # Breslow: the risk set of a time includes every sample tied with it, so each sample
    # takes the cumulative sum at the LAST position of its tie group in descending order.
    ascending_negated = -times[order]
    at_risk = torch.searchsorted(ascending_negated, ascending_negated, right=True)
    log_risk_set = torch.empty_like(log_cumulative).scatter(0, order, log_cumulative[at_risk - 1])
    terms = events * (log_risk_set - scores)
    return losses.index_add(0, index, terms)


def interval_index(times: torch.Tensor, cuts: Sequence[float]) -> torch.Tensor:
    """Each time's interval among [0, c1), [c1, c2), ..., [c_last, inf): an int64 index."""
    boundaries = torch.tensor(list(cuts), dtype=times.dtype, device=times.device)
    return torch.searchsorted(boundaries, times.contiguous(), right=True)


def discrete_hazard_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    present: torch.Tensor,
    *,
    cuts: Sequence[float],
) -> torch.Tensor:
    """Per-sample negative log-likelihood of a discrete-time (logistic) hazard model.

    `logits` (n, K) are the hazard logits of the K = len(cuts) + 1 intervals; `target` is
    (n, 2) = (time, event 1/0). A patient whose time falls in interval j was at risk in
    intervals 0..j: they contribute the binary cross-entropy of "no event" in 0..j-1 and of
    their event indicator in j (censoring counts as surviving interval j, the person-period
    convention). Unlabelled samples contribute 0. The loss of one patient depends only on
    that patient's own output, so per-sample clipping bounds their influence.
    """
    n = logits.shape[0]
    mask = _labelled(present, n)
    if target.shape != (n, 2):
        raise ValueError(f"survival target has shape {tuple(target.shape)}, expected ({n}, 2)")
    if logits.ndim == 1 and not cuts:  # one interval: the head gives (n,)
        logits = logits.unsqueeze(1)
    if logits.ndim != 2 or logits.shape[1] != len(cuts) + 1:
        raise ValueError(
            f"hazard logits have shape {tuple(logits.shape)}, expected ({n}, {len(cuts) + 1})"
        )
    safe = torch.where(mask.unsqueeze(1), target.to(logits.dtype), 0.0)
    last = interval_index(safe[:, 0], cuts)
    columns = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    at_risk = columns <= last.unsqueeze(1)
    happened = (columns == last.unsqueeze(1)) & (safe[:, 1:2] > 0.5)
    terms = functional.binary_cross_entropy_with_logits(
        logits, happened.to(logits.dtype), reduction="none"
    )
    losses = torch.where(at_risk, terms, 0.0).sum(dim=1)
    return torch.where(mask, losses, 0.0)


def survival_risk(task: TaskSpec, output: torch.Tensor) -> torch.Tensor:
    """A survival head's risk score per sample (higher = earlier event), shape (n,).

    Discrete hazard: the mean of the interval logits, a constant shift of the patient's
    log-odds (the head is proportional: a shared baseline per interval plus one score),
    so it ranks patients as their hazard does. Cox: the log hazard ratio itself.
    """
    return output.mean(dim=1) if task.discrete_hazard and output.ndim == 2 else output


def regression_target(task: TaskSpec, target: torch.Tensor) -> torch.Tensor:
    """A regression target in the head's standardised units (the contract's reference)."""
    return (target - task.reference_mean) / task.reference_scale


def task_loss(
    task: TaskSpec,
    output: torch.Tensor,
    target: torch.Tensor,
    present: torch.Tensor,
    *,
    regression: RegressionLoss = "mse",
) -> torch.Tensor:
    """Per-sample loss of one task head, chosen by the task's kind; 0 where unlabelled."""
    if task.kind == "binary":
        return binary_loss(output, target, present)
    if task.kind == "multiclass":
        return multiclass_loss(output, target, present)
    if task.kind == "regression":
        return regression_loss(output, regression_target(task, target), present, kind=regression)
    if task.discrete_hazard:
        return discrete_hazard_loss(output, target, present, cuts=task.interval_cuts)
    return cox_loss(output, target, present)


def per_sample_loss(
    contract: StudyContract,
    outputs: Mapping[str, torch.Tensor],
    targets: TaskTargets,
    *,
    regression: RegressionLoss = "mse",
) -> torch.Tensor:
    """Each sample's summed loss over the contract's tasks (shape (n,)).

    Every output takes part (times zero if its task has no labels), so every head's
    parameters receive a (possibly zero) gradient and DP noise, even on an empty batch.
    """
    missing = [task.name for task in contract.tasks if task.name not in outputs]
    if missing:
        raise ValueError(f"the model gave no output for tasks {missing}")
    total: torch.Tensor | None = None
    for task in contract.tasks:
        output = outputs[task.name]
        if task.name in targets:
            target, present = targets[task.name]
            losses = task_loss(task, output, target, present, regression=regression)
        else:
            losses = output.reshape(output.shape[0], -1).sum(dim=1) * 0.0
        total = losses if total is None else total + losses
    assert total is not None  # a contract has at least one task
    return total


def multitask_loss(
    contract: StudyContract,
    outputs: Mapping[str, torch.Tensor],
    targets: TaskTargets,
    *,
    regression: RegressionLoss = "mse",
) -> torch.Tensor:
    """The batch's loss: the mean over its rows of each sample's summed task losses.

    A batch of no rows, or with no label at all, gives a zero that still backpropagates,
    so a DP optimiser sees (zero) per-sample gradients and still adds its noise.
    """
    losses = per_sample_loss(contract, outputs, targets, regression=regression)
    if losses.numel() == 0:
        return losses.sum()
    return losses.mean()


def mean_task_loss(
    task: TaskSpec,
    output: torch.Tensor,
    target: torch.Tensor,
    present: torch.Tensor,
    *,
    regression: RegressionLoss = "mse",
) -> float:
    """One task's loss averaged over its labelled samples (NaN when none): a reported metric."""
    labelled = int(_labelled(present, output.shape[0]).sum())
    if labelled == 0:
        return float("nan")
    losses = task_loss(task, output, target, present, regression=regression)
    return float(losses.detach().sum()) / labelled
