"""fedavg against a plain float64 weighted mean computed independently with numpy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.coordinator.aggregate import fedavg

SHAPES = {"encoder.weight": (4, 3), "encoder.bias": (4,), "head.weight": (1, 4), "head.bias": (1,)}

Update = tuple[Mapping[str, np.ndarray], int]


def random_updates(seed: int, weights: Sequence[int], scale: float = 1.0) -> list[Update]:
    rng = np.random.default_rng(seed)
    return [
        (
            {
                name: (rng.standard_normal(shape) * scale).astype(np.float32)
                for name, shape in SHAPES.items()
            },
            weight,
        )
        for weight in weights
    ]


def reference_mean(updates: Sequence[Update]) -> dict[str, np.ndarray]:
    """sum(w_i * x_i) / sum(w_i), in float64, written out the plain way."""
    total = float(sum(weight for _, weight in updates))
    return {
        name: np.sum(
            np.stack([arrays[name].astype(np.float64) * weight for arrays, weight in updates]),
            axis=0,
        )
        / total
        for name in updates[0][0]
    }


def assert_close_to(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    assert set(actual) == set(expected)
    for name, array in actual.items():
        assert array.dtype == np.float32
        assert array.shape == expected[name].shape
        # float32 output: one float32 rounding of the float64 mean.
        np.testing.assert_allclose(array, expected[name], rtol=2e-7, atol=1e-7, err_msg=name)


def test_equals_the_weighted_mean() -> None:
    updates = random_updates(0, [120, 37, 400])
    assert_close_to(fedavg(updates), reference_mean(updates))


def test_the_heavier_update_dominates() -> None:
    light, heavy = random_updates(1, [1, 1_000])
    averaged = fedavg([light, heavy])
    for name in SHAPES:
        to_heavy = np.abs(averaged[name] - heavy[0][name]).max()
        to_light = np.abs(averaged[name] - light[0][name]).max()
        assert to_heavy < to_light / 100, name


def test_one_update_is_returned_unchanged() -> None:
    (update,) = random_updates(2, [57])
    averaged = fedavg([update])
    for name in SHAPES:
        np.testing.assert_array_equal(averaged[name], update[0][name])
        assert averaged[name] is not update[0][name]


def test_inputs_are_not_modified() -> None:
    updates = random_updates(3, [5, 6])
    before = [{name: array.copy() for name, array in arrays.items()} for arrays, _ in updates]
    fedavg(updates)
    for (arrays, _), copy in zip(updates, before, strict=True):
        for name in SHAPES:
            np.testing.assert_array_equal(arrays[name], copy[name])


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.integers(1, 10_000_000), min_size=1, max_size=7),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
    order=st.randoms(use_true_random=False),
)
def test_matches_the_reference_in_any_order(
    weights: list[int], seed: int, scale: float, order: object
) -> None:
    updates = random_updates(seed, weights, scale)
    shuffled = list(updates)
    order.shuffle(shuffled)  # type: ignore[attr-defined]

    forward, permuted = fedavg(updates), fedavg(shuffled)

    assert_close_to(forward, reference_mean(updates))
    for name in SHAPES:
        tolerance = 2e-7 * float(np.abs(forward[name]).max()) + 1e-30
        np.testing.assert_allclose(permuted[name], forward[name], rtol=2e-7, atol=tolerance)


def test_float32_inputs_accumulate_in_float64() -> None:
    # In float32, 1e8 + 1 == 1e8: a float32 accumulator would lose the small update's share.
    big = ({"w": np.array([1.0], dtype=np.float32)}, 100_000_000)
    small = ({"w": np.array([-1.0e8], dtype=np.float32)}, 1)
    averaged = fedavg([big, small])
    expected = (1.0 * 100_000_000 - 1.0e8) / 100_000_001
    assert averaged["w"][0] == pytest.approx(expected, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("bad_weight", [0, -1, -500])
def test_non_positive_weights_are_refused(bad_weight: int) -> None:
    updates = random_updates(4, [10, bad_weight, 20])
    with pytest.raises(ValueError, match="positive example count"):
        fedavg(updates)


def test_weights_that_sum_to_zero_are_refused() -> None:
    with pytest.raises(ValueError, match="positive example count"):
        fedavg(random_updates(5, [5, -5]))


def test_no_updates_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one update"):
        fedavg([])


@pytest.mark.parametrize("change", ["missing", "extra", "renamed"])
def test_updates_naming_different_arrays_are_refused(change: str) -> None:
    first, second = random_updates(6, [10, 20])
    arrays = dict(second[0])
    if change in ("missing", "renamed"):
        value = arrays.pop("head.bias")
        if change == "renamed":
            arrays["head.bias2"] = value
    else:
        arrays["head.extra"] = np.zeros(1, dtype=np.float32)
    with pytest.raises(ValueError, match="different arrays"):
        fedavg([first, (arrays, second[1])])
