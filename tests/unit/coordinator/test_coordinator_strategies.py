"""Strategies against references written here: numpy weighted means per parameter group,
Reddi et al. (2021) Algorithm 2 for FedAdam and FedYogi written out per element, and the
norm bound against a hand-scaled delta."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medfed.coordinator.strategies import (
    Contribution,
    make_strategy,
    parameter_group,
    parameter_groups,
)
from medfed.model import wire

ALL = frozenset({"encoders.clinical", "encoders.omics", "fusion", "heads.readmission"})
NO_OMICS = ALL - {"encoders.omics"}
SHAPES = {
    "encoders.clinical.0.weight": (4, 3),
    "encoders.clinical.0.bias": (4,),
    "encoders.omics.0.weight": (4, 5),
    "fusion.weight": (4, 8),
    "heads.readmission.weight": (1, 4),
    "heads.readmission.bias": (1,),
}


def model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}


def contribution(site: str, seed: int, weight: int, groups: frozenset[str] = ALL) -> Contribution:
    return Contribution(site, model(seed), weight, groups)


def test_parameter_groups_follow_the_networks_names() -> None:
    assert parameter_group("encoders.omics.layers.0.weight") == "encoders.omics"
    assert parameter_group("heads.survival.bias") == "heads.survival"
    assert parameter_group("fusion.attn.in_proj_weight") == "fusion"
    assert parameter_groups(SHAPES) == ALL


def test_fedavg_is_the_plain_patient_weighted_mean() -> None:
    start = model(0)
    updates = [contribution("a", 1, 30), contribution("b", 2, 10), contribution("c", 3, 60)]

    result = make_strategy("fedavg").aggregate(start, updates)

    for name in SHAPES:
        expected = (
            30 * updates[0].arrays[name].astype(np.float64)
            + 10 * updates[1].arrays[name].astype(np.float64)
            + 60 * updates[2].arrays[name].astype(np.float64)
        ) / 100
        assert result.arrays[name].dtype == np.float32
        np.testing.assert_allclose(result.arrays[name], expected, rtol=1e-6, err_msg=name)
    assert result.clipped == {}


def test_a_site_without_omics_leaves_the_omics_encoder_as_the_others_average_makes_it() -> None:
    start = model(0)
    with_omics = [contribution("a", 1, 30), contribution("b", 2, 10)]
    without = contribution("c", 3, 500, NO_OMICS)

    result = make_strategy("fedavg").aggregate(start, [*with_omics, without])
    reference = make_strategy("fedavg").aggregate(start, with_omics)

    omics = "encoders.omics.0.weight"
    np.testing.assert_array_equal(result.arrays[omics], reference.arrays[omics])
    # ... while every other group is averaged over all three sites.
    clinical = "encoders.clinical.0.weight"
    expected = (
        sum(c.weight * c.arrays[clinical].astype(np.float64) for c in [*with_omics, without]) / 540
    )
    np.testing.assert_allclose(result.arrays[clinical], expected, rtol=1e-6)
    assert result.trained_by["encoders.omics"] == ["a", "b"]
    assert result.trained_by["fusion"] == ["a", "b", "c"]


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi"])
def test_a_group_no_site_trained_stays_exactly_as_it_was(name: str) -> None:
    start = model(0)
    updates = [contribution("a", 1, 5, NO_OMICS), contribution("b", 2, 7, NO_OMICS)]
    strategy = make_strategy(name, proximal_mu=0.1 if name == "fedprox" else 0.0)

    result = strategy.aggregate(start, updates)

    omics = "encoders.omics.0.weight"
    np.testing.assert_array_equal(result.arrays[omics], start[omics])
    assert result.trained_by["encoders.omics"] == []


def test_fedprox_averages_like_fedavg_and_sends_mu() -> None:
    start = model(0)
    updates = [contribution("a", 1, 3), contribution("b", 2, 4)]

    prox = make_strategy("fedprox", proximal_mu=0.25)

    assert prox.instruction_config() == {wire.PROXIMAL_MU: 0.25}
    assert make_strategy("fedavg").instruction_config() == {}
    for name, array in prox.aggregate(start, updates).arrays.items():
        np.testing.assert_array_equal(
            array, make_strategy("fedavg").aggregate(start, updates).arrays[name]
        )


def reference_adaptive(
    kind: str, x: float, deltas: list[float], eta: float, b1: float, b2: float, tau: float
) -> list[float]:
    """Reddi et al. 2021, Algorithm 2, one scalar parameter, moments from zero."""
    m = v = 0.0
    path = []
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if kind == "adam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d) if v != d * d else v
        x = x + eta * m / (math.sqrt(v) + tau)
        path.append(x)
    return path


@pytest.mark.parametrize("kind", ["adam", "yogi"])
def test_fedadam_and_fedyogi_follow_reddi_et_al(kind: str) -> None:
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    strategy = make_strategy(f"fed{kind}", server_learning_rate=eta, beta1=b1, beta2=b2, tau=tau)  # type: ignore[arg-type]
    rng = np.random.default_rng(4)
    current = model(0)
    history: list[dict[str, np.ndarray]] = [current]
    averages: list[dict[str, np.ndarray]] = []
    for round_number in range(4):
        updates = [
            Contribution(
                s,
                {
                    k: (v + rng.normal(scale=0.3, size=v.shape)).astype(np.float32)
                    for k, v in current.items()
                },
                w,
                ALL,
            )
            for s, w in (("a", 2), ("b", 5))
        ]
        averages.append(
            {
                k: (
                    2 * updates[0].arrays[k].astype(np.float64)
                    + 5 * updates[1].arrays[k].astype(np.float64)
                )
                / 7
                for k in current
            }
        )
        current = strategy.aggregate(current, updates).arrays
        history.append(current)
        assert round_number + 1 == len(averages)

    for name in SHAPES:
        for index in np.ndindex(SHAPES[name]):
            # The reference walks the same pseudo-gradients (average minus the model they
            # were computed against) for this one element.
            deltas = [
                float(averages[r][name][index]) - float(history[r][name][index]) for r in range(4)
            ]
            expected = reference_adaptive(
                kind, float(history[0][name][index]), deltas, eta, b1, b2, tau
            )
            got = [float(history[r + 1][name][index]) for r in range(4)]
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), (name, index)


def test_the_server_optimisers_state_round_trips_through_arrays() -> None:
    start = model(0)
    updates = [contribution("a", 1, 3), contribution("b", 2, 4)]
    first = make_strategy("fedyogi")
    after_one = first.aggregate(start, updates).arrays

    state = {k: np.array(v) for k, v in first.state_arrays().items()}
    assert set(state) == {f"m/{n}" for n in SHAPES} | {f"v/{n}" for n in SHAPES}
    second = make_strategy("fedyogi")
    second.load_state(state)

    again = [contribution("a", 5, 3), contribution("b", 6, 4)]
    a = first.aggregate(after_one, again).arrays
    b = second.aggregate(after_one, again).arrays
    for name in SHAPES:
        np.testing.assert_array_equal(a[name], b[name])


def test_the_norm_bound_caps_a_scaled_update_and_names_its_site() -> None:
    start = model(0)
    honest = contribution("a", 1, 10)
    delta = {k: (honest.arrays[k] - start[k]) * 100 for k in SHAPES}
    poisoned = Contribution("evil", {k: start[k] + delta[k] for k in SHAPES}, 10, ALL)
    norm = math.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in delta.values()))
    honest_norm = norm / 100
    bound = honest_norm * 1.5

    result = make_strategy("fedavg", update_norm_bound=bound).aggregate(start, [honest, poisoned])

    assert list(result.clipped) == ["evil"]
    assert result.clipped["evil"] == pytest.approx(norm, rel=1e-5)
    # The poisoned update is scaled to the bound: delta * bound / norm.
    for name in SHAPES:
        capped = start[name].astype(np.float64) + delta[name].astype(np.float64) * bound / norm
        expected = (honest.arrays[name].astype(np.float64) + capped) / 2
        np.testing.assert_allclose(result.arrays[name], expected, rtol=1e-5, atol=1e-6)


def test_aggregation_without_updates_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        make_strategy("fedavg").aggregate(model(0), [])
