"""The strict array exchange around the network: copies, loading checks and digests."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from medfed.model.contract import DEMO_CONTRACT
from medfed.model.network import MedModel, arrays_sha256, build_model, load_arrays, state_arrays

CONTRACT = DEMO_CONTRACT


@pytest.fixture
def model() -> MedModel:
    return build_model("tiny", contract=CONTRACT, seed=11)


@pytest.fixture
def arrays(model: MedModel) -> dict[str, np.ndarray]:
    return state_arrays(model)


def test_same_seed_same_weights() -> None:
    first = state_arrays(build_model("tiny", contract=CONTRACT, seed=5))
    second = state_arrays(build_model("tiny", contract=CONTRACT, seed=5))
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[name], second[name]) for name in first)
    assert arrays_sha256(first) == arrays_sha256(second)


def test_different_seed_different_weights() -> None:
    first = state_arrays(build_model("tiny", contract=CONTRACT, seed=5))
    second = state_arrays(build_model("tiny", contract=CONTRACT, seed=6))
    weight = "encoders.clinical.feature.weight"
    assert not np.array_equal(first[weight], second[weight])
    assert arrays_sha256(first) != arrays_sha256(second)


def test_build_model_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_model("tiny", contract=CONTRACT, seed=99)
    assert torch.equal(torch.rand(3), expected)


def test_state_arrays_are_float32_copies(model: MedModel) -> None:
    arrays = state_arrays(model)
    assert all(array.dtype == np.float32 for array in arrays.values())
    arrays["heads.readmission.bias"][:] = 42.0
    assert float(model.heads["readmission"].bias.detach()[0]) != 42.0


def test_load_arrays_round_trips(arrays: dict[str, np.ndarray]) -> None:
    other = build_model("tiny", contract=CONTRACT, seed=12)
    load_arrays(other, arrays)
    loaded = state_arrays(other)
    assert all(np.array_equal(loaded[name], arrays[name]) for name in arrays)
    assert arrays_sha256(loaded) == arrays_sha256(arrays)


def test_load_arrays_does_not_alias_the_input(arrays: dict[str, np.ndarray]) -> None:
    other = build_model("tiny", contract=CONTRACT, seed=12)
    load_arrays(other, arrays)
    arrays["heads.readmission.bias"][:] = 42.0
    assert float(other.heads["readmission"].bias.detach()[0]) != 42.0


def _corrupt(arrays: dict[str, np.ndarray], how: str) -> tuple[dict[str, np.ndarray], str]:
    """A corrupted copy of `arrays` and a pattern the error message must contain."""
    corrupted = dict(arrays)
    name = "fusion.upper.0.ffn.0.weight"
    if how == "missing":
        del corrupted[name]
        return corrupted, re.escape(f"missing ['{name}']")
    if how == "extra":
        corrupted["fusion.9.weight"] = np.zeros(3, np.float32)
        return corrupted, re.escape("unexpected ['fusion.9.weight']")
    if how == "float64":
        corrupted[name] = arrays[name].astype(np.float64)
        return corrupted, f"{re.escape(name)}: dtype float64"
    if how == "shape":
        corrupted[name] = arrays[name].T.copy()
        return corrupted, f"{re.escape(name)}: shape"
    if how in ("nan", "inf"):
        bad = arrays[name].copy()
        bad[1, 2] = np.nan if how == "nan" else -np.inf
        corrupted[name] = bad
        return corrupted, f"{re.escape(name)}: contains NaN or Inf"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing", "extra", "float64", "shape", "nan", "inf"])
def test_load_arrays_rejects_and_leaves_the_model_unchanged(
    model: MedModel, arrays: dict[str, np.ndarray], how: str
) -> None:
    target = build_model("tiny", contract=CONTRACT, seed=12)
    before = arrays_sha256(state_arrays(target))
    corrupted, message = _corrupt(arrays, how)
    with pytest.raises(ValueError, match=message):
        load_arrays(target, corrupted)
    assert arrays_sha256(state_arrays(target)) == before


def test_digest_ignores_insertion_order(arrays: dict[str, np.ndarray]) -> None:
    reordered = dict(reversed(list(arrays.items())))
    assert list(reordered) != list(arrays)
    assert arrays_sha256(reordered) == arrays_sha256(arrays)


def test_digest_changes_with_one_flipped_bit(arrays: dict[str, np.ndarray]) -> None:
    flipped = dict(arrays)
    bits = arrays["heads.readmission.bias"].copy().view(np.uint32)
    bits[0] ^= 1
    flipped["heads.readmission.bias"] = bits.view(np.float32)
    assert not np.array_equal(flipped["heads.readmission.bias"], arrays["heads.readmission.bias"])
    assert arrays_sha256(flipped) != arrays_sha256(arrays)


def test_digest_sees_names_dtypes_and_shapes() -> None:
    base = {"a": np.arange(4, dtype=np.float32)}
    renamed = {"b": base["a"]}
    retyped = {"a": base["a"].view(np.int32)}
    reshaped = {"a": base["a"].reshape(2, 2)}
    digests = {arrays_sha256(x) for x in (base, renamed, retyped, reshaped)}
    assert len(digests) == 4


def test_digest_of_a_non_contiguous_view_matches_its_copy() -> None:
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert arrays_sha256({"m": matrix.T}) == arrays_sha256({"m": matrix.T.copy()})


def test_digest_is_unambiguous() -> None:
    tail = np.array([1.5], dtype=np.float32)
    two = {"a": np.frombuffer(b"WXYZ", dtype=np.float32).copy(), "b": tail}
    one = {"afloat32(1,)WXYZb": tail}
    assert arrays_sha256(two) != arrays_sha256(one)
