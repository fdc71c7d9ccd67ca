"""The discrete-time hazard loss against independent references: hand-computed values, a
logistic regression on the person-period data (scikit-learn), and the per-patient bound
that DP-SGD's clipping relies on (which the Cox partial likelihood does not have)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from medfed.model.contract import NumericFeature, StudyContract, TaskSpec
from medfed.model.losses import cox_loss, discrete_hazard_loss, interval_index, survival_risk
from medfed.model.network import build_model
from medfed.model.tokenizers import complete_numeric_inputs

CUTS = (100.0, 250.0, 500.0)


def _bce(logit: float, y: float) -> float:
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_hand_computed_values() -> None:
    logits = torch.tensor([[0.1, -0.5, 0.3, 1.0], [0.2, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    # An event at day 300 (interval 2); censored at day 100 (interval 1: the cut is its
    # interval's start); censored at 600 (the open last interval).
    target = torch.tensor([[300.0, 1.0], [100.0, 0.0], [600.0, 0.0]])
    present = torch.tensor([True, True, False])
    losses = discrete_hazard_loss(logits, target, present, cuts=CUTS)
    expected = [
        _bce(0.1, 0) + _bce(-0.5, 0) + _bce(0.3, 1),
        _bce(0.2, 0) + _bce(0.0, 0),
        0.0,
    ]
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-6)
    assert interval_index(torch.tensor([0.0, 99.9, 100.0, 499.0, 500.0, 1e6]), CUTS).tolist() == [
        0,
        0,
        1,
        2,
        3,
        3,
    ]


def _person_period(
    x: np.ndarray, times: np.ndarray, events: np.ndarray, cuts: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """The person-period table, built row by row: one row per interval a patient was at
    risk in, with one-hot interval columns, the covariates, and whether the event fell in it."""
    rows, labels = [], []
    intervals = len(cuts) + 1
    for features, time, event in zip(x, times, events, strict=True):
        last = sum(1 for cut in cuts if cut <= time)
        for k in range(last + 1):
            dummies = [1.0 if j == k else 0.0 for j in range(intervals)]
            rows.append([*dummies, *features])
            labels.append(1.0 if (k == last and event) else 0.0)
    return np.array(rows), np.array(labels)


def test_a_linear_hazard_model_fitted_with_the_loss_equals_person_period_logistic_regression() -> (
    None
):
    from lifelines.datasets import load_lung

    frame = load_lung()
    columns = ["age", "sex", "ph.ecog"]
    frame = frame.dropna(subset=columns)
    x = frame[columns].to_numpy(dtype=float)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    times = frame["time"].to_numpy(dtype=float)
    events = (frame["status"] == 1).to_numpy()

    rows, labels = _person_period(x, times, events, CUTS)
    reference = LogisticRegression(C=np.inf, fit_intercept=False, tol=1e-10, max_iter=10_000)
    reference.fit(rows, labels)

    baseline = torch.zeros(len(CUTS) + 1, dtype=torch.float64, requires_grad=True)
    beta = torch.zeros(len(columns), dtype=torch.float64, requires_grad=True)
    features = torch.from_numpy(x)
    target = torch.from_numpy(np.stack([times, events.astype(float)], axis=1))
    present = torch.ones(len(times), dtype=torch.bool)
    optimizer = torch.optim.LBFGS([baseline, beta], max_iter=500, tolerance_grad=1e-12)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = (features @ beta).unsqueeze(1) + baseline.unsqueeze(0)
        loss = discrete_hazard_loss(logits, target, present, cuts=CUTS).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    np.testing.assert_allclose(baseline.detach().numpy(), reference.coef_[0, :4], atol=2e-4)
    np.testing.assert_allclose(beta.detach().numpy(), reference.coef_[0, 4:], atol=2e-4)


def _per_sample_gradients(
    loss_of: object, risk: torch.Tensor, target: torch.Tensor
) -> list[torch.Tensor]:
    """Each patient's gradient of their own loss term, within the whole batch."""
    grads = []
    for i in range(risk.shape[0]):
        scores = risk.detach().clone().requires_grad_(True)
        losses = loss_of(scores, target)  # type: ignore[operator]
        (grad,) = torch.autograd.grad(losses[i], scores)
        grads.append(grad)
    return grads


def _clipped_sum(grads: list[torch.Tensor], clip: float) -> torch.Tensor:
    return sum(
        (g * min(1.0, clip / max(float(g.norm()), 1e-12)) for g in grads),
        torch.zeros_like(grads[0]),
    )


def test_clipping_bounds_one_patient_under_the_hazard_loss_but_not_under_cox() -> None:
    """Add-remove neighbours: the sum of clipped per-sample gradients (what DP-SGD noises)
    moves by at most the clip norm when one patient leaves. Gradients are taken with
    respect to every patient's output, so a coupling between patients shows up."""
    generator = torch.Generator().manual_seed(3)
    n, clip = 40, 0.5
    risk = torch.randn(n, generator=generator, dtype=torch.float64)
    times = torch.rand(n, generator=generator, dtype=torch.float64) * 600
    events = (torch.rand(n, generator=generator) < 0.7).to(torch.float64)
    target = torch.stack([times, events], dim=1)
    latest = int(torch.argmax(times))  # in every risk set
    keep = [i for i in range(n) if i != latest]

    def hazard(scores: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        logits = scores.unsqueeze(1) + torch.linspace(-2.0, -1.0, len(CUTS) + 1).double()
        return discrete_hazard_loss(logits, tgt, torch.ones(len(tgt), dtype=torch.bool), cuts=CUTS)

    def cox(scores: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return cox_loss(scores, tgt, torch.ones(len(tgt), dtype=torch.bool))

    for loss_of, bounded in ((hazard, True), (cox, False)):
        full = _clipped_sum(_per_sample_gradients(loss_of, risk, target), clip)
        without = _clipped_sum(_per_sample_gradients(loss_of, risk[keep], target[keep]), clip)
        # Compare on the coordinates both batches share (the remaining patients' outputs),
        # plus the removed patient's own coordinate, which it alone can move.
        change = torch.cat([full[keep] - without, full[latest : latest + 1]])
        if bounded:
            assert float(change.norm()) <= clip + 1e-9
        else:
            # The latest patient sits in every risk set: removing it moves every other term.
            assert float(change.norm()) > clip


def _lung_contract(loss: str) -> StudyContract:
    def feature(name: str, mean: float, scale: float) -> NumericFeature:
        return NumericFeature(
            name=name, unit="1", minimum=0, maximum=200, reference_mean=mean,
            reference_scale=scale,
        )  # fmt: skip

    return StudyContract(
        numeric=(feature("age", 62, 9), feature("ecog", 1, 0.7), feature("karnofsky", 82, 12)),
        tasks=(
            TaskSpec(
                name="survival", kind="survival", target="time_days", event="died",
                survival_loss=loss, interval_cuts=CUTS if loss != "cox" else (),  # type: ignore[arg-type]
            ),
        ),
    )  # fmt: skip


@pytest.mark.parametrize("preset", ["linear", "mlp", "tiny"])
def test_every_preset_gives_interval_logits_and_a_risk(preset: str) -> None:
    contract = _lung_contract("discrete-hazard")
    model = build_model(preset, contract=contract, seed=1)  # type: ignore[arg-type]
    values = torch.randn(5, len(contract.numeric))
    out = model(*complete_numeric_inputs(values))["survival"]
    assert out.shape == (5, len(CUTS) + 1)
    # A proportional head: every interval's logit moves with the same patient score.
    differences = out - out[:, :1]
    torch.testing.assert_close(differences, differences[:1].expand_as(differences))
    torch.testing.assert_close(survival_risk(contract.tasks[0], out), out.mean(dim=1))


def test_the_linear_preset_starts_at_zero_risk_and_has_a_weight_per_feature() -> None:
    contract = _lung_contract("discrete-hazard")
    model = build_model("linear", contract=contract, seed=1)
    names = {name: p.shape for name, p in model.named_parameters()}
    features = len(contract.numeric)
    assert names == {
        "heads.survival.risk.weight": (1, 2 * features),  # values and missing flags
        "heads.survival.baseline.weight": (len(CUTS) + 1, 1),
    }
    out = model(*complete_numeric_inputs(torch.randn(3, features)))["survival"]
    assert float(out.detach().std(dim=0).max()) == 0.0


def test_cuts_must_increase_and_belong_to_a_hazard_task() -> None:
    with pytest.raises(ValueError, match="increasing"):
        TaskSpec(name="s", kind="survival", target="t", event="e", interval_cuts=(5.0, 5.0))
    with pytest.raises(ValueError, match="discrete-hazard"):
        TaskSpec(
            name="s", kind="survival", target="t", event="e", survival_loss="cox",
            interval_cuts=(5.0,),
        )  # fmt: skip
