"""PatientSample: read-only once built, whatever the caller does with its inputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from medfed.model.sample import PatientSample


def test_a_sample_copies_and_freezes_its_containers() -> None:
    numeric = {"age": 61}
    codes = {"diagnoses": {"I10"}}
    omics = np.array([1.0, np.nan], dtype=np.float64)
    sample = PatientSample("p1", numeric, codes, omics=omics, targets={"died": 1})
    numeric["age"] = 99
    codes["diagnoses"].add("E11.9")
    omics[0] = 5.0
    assert sample.numeric == {"age": 61.0}
    assert sample.codes == {"diagnoses": frozenset({"I10"})}
    assert sample.omics is not None and sample.omics.dtype == np.float32
    assert sample.omics[0] == 1.0 and np.isnan(sample.omics[1])
    with pytest.raises(TypeError):
        sample.numeric["age"] = 1.0  # type: ignore[index]
    with pytest.raises(ValueError):
        sample.omics[0] = 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        sample.smiles = "C"  # type: ignore[misc]


def test_defaults_mean_absent() -> None:
    sample = PatientSample("p2", {}, {})
    assert sample.omics is None and sample.smiles is None and sample.protein is None
    assert dict(sample.targets) == {}


def test_omics_must_be_one_dimensional() -> None:
    with pytest.raises(ValueError, match="patient p3"):
        PatientSample("p3", {}, {}, omics=np.zeros((2, 2)))
