"""Losses against references: scikit-survival's and lifelines' Cox likelihood on the lung
data, a brute-force Breslow likelihood, and the textbook formulas written out in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lifelines import CoxPHFitter
from lifelines.datasets import load_lung
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.linear_model.coxph import CoxPHOptimizer

from medfed.model.contract import DEMO_CONTRACT, StudyContract, TaskSpec
from medfed.model.losses import (
    binary_loss,
    cox_loss,
    mean_task_loss,
    multiclass_loss,
    multitask_loss,
    per_sample_loss,
    regression_loss,
)

COVARIATES = ["age", "sex", "ph.ecog", "ph.karno"]


def lung() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NCCTG lung cancer covariates, times (with ties) and events (1 = death)."""
    data = load_lung().dropna(subset=COVARIATES)
    return (
        data[COVARIATES].to_numpy(np.float64),
        data["time"].to_numpy(np.float64),
        data["status"].to_numpy(np.float64),
    )


def survival_target(times: np.ndarray, events: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.stack([times, events], axis=1), dtype=torch.float64)


def all_present(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bool)


def test_cox_loss_with_ties_matches_sksurv_breslow_on_lung() -> None:
    x, times, events = lung()
    assert len(np.unique(times[events == 1])) < int(events.sum())  # tied event times
    fitted = CoxPHSurvivalAnalysis(ties="breslow").fit(
        x,
        np.array(
            list(zip(events.astype(bool), times, strict=True)), dtype=[("e", "?"), ("t", "<f8")]
        ),
    )
    coefficients = torch.tensor(fitted.coef_, dtype=torch.float64, requires_grad=True)
    risk = torch.from_numpy(x) @ coefficients
    ours = cox_loss(risk, survival_target(times, events), all_present(len(times))).sum()
    # sksurv reports -log PL divided by the number of samples.
    reference = CoxPHOptimizer(
        x, events.astype(bool), times, alpha=np.zeros(x.shape[1]), ties="breslow"
    )
    expected = reference.nlog_likelihood(fitted.coef_) * len(times)
    assert float(ours.detach()) == pytest.approx(expected, rel=1e-10)
    # sksurv's fit is the maximum of this likelihood: our gradient vanishes there.
    ours.backward()
    assert coefficients.grad is not None
    assert float(coefficients.grad.abs().max()) < 1e-4 * float(ours.detach())


def test_cox_loss_without_ties_matches_lifelines_on_lung() -> None:
    # lifelines handles ties by Efron's method only; on tie-free times Efron is Breslow.
    x, times, events = lung()
    keep = ~_duplicated(times)
    x, times, events = x[keep], times[keep], events[keep]
    assert len(np.unique(times)) == len(times) > 140
    frame = load_lung().dropna(subset=COVARIATES)[keep][[*COVARIATES, "time", "status"]]
    fitter = CoxPHFitter().fit(frame, duration_col="time", event_col="status")
    coefficients = fitter.params_[COVARIATES].to_numpy()
    risk = torch.from_numpy(x @ coefficients)
    ours = cox_loss(risk, survival_target(times, events), all_present(len(times))).sum()
    assert float(ours) == pytest.approx(-fitter.log_likelihood_, rel=1e-10)


def _duplicated(values: np.ndarray) -> np.ndarray:
    _, first, counts = np.unique(values, return_index=True, return_counts=True)
    unique = np.zeros(len(values), dtype=bool)
    unique[first[counts == 1]] = True
    return ~unique


def breslow_by_hand(risk: list[float], times: list[float], events: list[bool]) -> list[float]:
    """Each event's log(sum of exp(risk) over everyone with time >= its time) - its risk."""
    return [
        math.log(sum(math.exp(r) for r, t in zip(risk, times, strict=True) if t >= times[i]))
        - risk[i]
        if events[i]
        else 0.0
        for i in range(len(risk))
    ]


@st.composite
def survival_batches(draw: st.DrawFn) -> tuple[list[float], list[float], list[bool], list[bool]]:
    n = draw(st.integers(min_value=1, max_value=25))
    risk = draw(st.lists(st.floats(-5, 5), min_size=n, max_size=n))
    times = draw(st.lists(st.integers(1, 5).map(float), min_size=n, max_size=n))
    events = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    present = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return risk, times, events, present


@settings(max_examples=200, deadline=None, database=None)
@given(survival_batches())
def test_cox_loss_matches_breslow_by_hand(
    case: tuple[list[float], list[float], list[bool], list[bool]],
) -> None:
    risk, times, events, present = case
    labelled = [i for i in range(len(risk)) if present[i]]
    # Unlabelled samples are neither in any risk set nor scored.
    expected = [0.0] * len(risk)
    by_hand = breslow_by_hand(
        [risk[i] for i in labelled], [times[i] for i in labelled], [events[i] for i in labelled]
    )
    for i, value in zip(labelled, by_hand, strict=True):
        expected[i] = value
    ours = cox_loss(
        torch.tensor(risk, dtype=torch.float64),
        survival_target(np.array(times), np.array(events, dtype=float)),
        torch.tensor(present),
    )
    np.testing.assert_allclose(ours.detach().numpy(), expected, rtol=1e-10, atol=1e-10)


def test_unlabelled_samples_get_no_survival_gradient() -> None:
    risk = torch.tensor([0.3, -1.0, 2.0, 0.5], requires_grad=True)
    target = torch.tensor([[5.0, 1.0], [1.0, 1.0], [3.0, 0.0], [2.0, 1.0]])
    present = torch.tensor([True, False, True, True])
    cox_loss(risk, target, present).sum().backward()
    assert risk.grad is not None
    assert float(risk.grad[1]) == 0.0
    assert float(risk.grad.abs().sum()) > 0.0


def test_binary_loss_is_the_logistic_loss() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    target = torch.tensor([1.0, 0.0, 0.0, float("nan")])  # the unlabelled NaN is never read
    present = torch.tensor([True, True, True, False])
    sigmoid = 1.0 / (1.0 + np.exp(-logits.numpy()[:3]))
    expected = -(
        target.numpy()[:3] * np.log(sigmoid) + (1 - target.numpy()[:3]) * np.log(1 - sigmoid)
    )
    ours = binary_loss(logits, target, present)
    np.testing.assert_allclose(ours.numpy(), [*expected, 0.0], rtol=1e-6)


def test_multiclass_loss_is_the_negative_log_softmax() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [4.0, 4.0, 4.0]])
    target = torch.tensor([1.0, 0.0, 7.0])  # class 7 is outside, but unlabelled: ignored
    present = torch.tensor([True, True, False])
    values = logits.numpy()
    log_softmax = values - np.log(np.exp(values).sum(axis=1, keepdims=True))
    expected = [-log_softmax[0, 1], -log_softmax[1, 0], 0.0]
    np.testing.assert_allclose(
        multiclass_loss(logits, target, present).numpy(), expected, rtol=1e-6
    )
    with pytest.raises(ValueError, match="class index"):
        multiclass_loss(logits, target, all_present(3))


def test_regression_losses_are_squared_error_and_huber() -> None:
    prediction = torch.tensor([1.0, 4.0, -2.0, 0.0])
    target = torch.tensor([1.5, 1.0, -2.25, float("nan")])
    present = torch.tensor([True, True, True, False])
    error = np.array([-0.5, 3.0, 0.25])
    np.testing.assert_allclose(
        regression_loss(prediction, target, present).numpy(), [*(error**2), 0.0], rtol=1e-6
    )
    huber = np.where(np.abs(error) <= 1.0, 0.5 * error**2, np.abs(error) - 0.5)
    np.testing.assert_allclose(
        regression_loss(prediction, target, present, kind="huber").numpy(),
        [*huber, 0.0],
        rtol=1e-6,
    )


MULTITASK = StudyContract(
    numeric=DEMO_CONTRACT.numeric,
    tasks=(
        TaskSpec(name="readmission", kind="binary", target="readmitted_30d"),
        TaskSpec(name="stage", kind="multiclass", target="stage", classes=("i", "ii", "iii")),
        TaskSpec(name="los", kind="regression", target="length_of_stay"),
        TaskSpec(
            name="death",
            kind="survival",
            target="survival_days",
            event="died",
            survival_loss="cox",
        ),
    ),
)


def outputs(n: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "readmission": torch.randn(n, generator=generator, requires_grad=True),
        "stage": torch.randn(n, 3, generator=generator, requires_grad=True),
        "los": torch.randn(n, generator=generator, requires_grad=True),
        "death": torch.randn(n, generator=generator, requires_grad=True),
    }


def targets(n: int, present: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        "readmission": (torch.arange(n) % 2.0, present),
        "stage": (torch.arange(n) % 3.0, present),
        "los": (torch.linspace(0, 3, n), present),
        "death": (torch.stack([torch.arange(n, 0, -1.0), torch.arange(n) % 2.0], dim=1), present),
    }


def test_multitask_loss_is_the_row_mean_of_summed_task_losses() -> None:
    n = 6
    present = torch.tensor([True, True, False, True, True, True])
    out, tgt = outputs(n), targets(n, present)
    per_task = [
        binary_loss(out["readmission"], *tgt["readmission"]),
        multiclass_loss(out["stage"], *tgt["stage"]),
        regression_loss(out["los"], *tgt["los"]),
        cox_loss(out["death"], *tgt["death"]),
    ]
    expected = sum(float(losses.detach().sum()) for losses in per_task) / n
    assert float(multitask_loss(MULTITASK, out, tgt).detach()) == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(per_sample_loss(MULTITASK, out, tgt), sum(per_task))


def test_a_batch_without_labels_gives_a_zero_that_backpropagates() -> None:
    for n in (0, 4):
        out = outputs(n)
        loss = multitask_loss(MULTITASK, out, targets(n, torch.zeros(n, dtype=torch.bool)))
        assert float(loss.detach()) == 0.0
        loss.backward()
        assert all(o.grad is not None and float(o.grad.abs().sum()) == 0.0 for o in out.values())


def test_a_task_without_targets_still_reaches_its_head() -> None:
    out = outputs(3)
    tgt = targets(3, all_present(3))
    del tgt["los"]
    multitask_loss(MULTITASK, out, tgt).backward()
    assert out["los"].grad is not None


def test_a_missing_output_is_refused() -> None:
    out = outputs(3)
    del out["stage"]
    with pytest.raises(ValueError, match="stage"):
        multitask_loss(MULTITASK, out, targets(3, all_present(3)))


def test_mean_task_loss_averages_over_labelled_samples() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5])
    target = torch.tensor([1.0, 0.0, 1.0])
    present = torch.tensor([True, False, True])
    task = MULTITASK.task("readmission")
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-0.5))) / 2
    assert mean_task_loss(task, logits, target, present) == pytest.approx(expected, rel=1e-6)
    assert math.isnan(mean_task_loss(task, logits, target, torch.zeros(3, dtype=torch.bool)))
