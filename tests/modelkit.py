"""Contracts and samples the model tests share."""

from __future__ import annotations

import itertools

import numpy as np

from medfed.model.contract import (
    MODALITY_ORDER,
    MoleculeSpec,
    NumericFeature,
    OmicsPanel,
    ProteinSpec,
    StudyContract,
    TaskSpec,
)
from medfed.model.sample import PatientSample

TASK = "outcome"
"""The binary task of `numeric_contract`."""


def numeric_contract(n_features: int) -> StudyContract:
    """Numeric features f0, f1, ... (standard scaled) and one binary task `outcome`."""
    return StudyContract(
        numeric=tuple(
            NumericFeature(
                name=f"f{i}",
                unit="1",
                minimum=-1e6,
                maximum=1e6,
                reference_mean=0.0,
                reference_scale=1.0,
            )
            for i in range(n_features)
        ),
        tasks=(TaskSpec(name=TASK, kind="binary", target="label"),),
    )


def all_modalities_contract() -> StudyContract:
    """Every modality and every task kind, at sizes a unit test can afford."""
    return StudyContract.model_validate(
        {
            "numeric": [
                {
                    "name": "age",
                    "unit": "a",
                    "minimum": 0,
                    "maximum": 120,
                    "reference_mean": 60,
                    "reference_scale": 15,
                },
                {
                    "name": "creatinine",
                    "unit": "umol/L",
                    "minimum": 10,
                    "maximum": 2000,
                    "reference_mean": 90,
                    "reference_scale": 30,
                },
            ],
            "categorical": [
                {"name": "diagnoses", "system": "icd10", "vocabulary": ["I10", "E11.9", "N18.3"]},
                {"name": "drugs", "system": "atc", "vocabulary": ["C09AA05", "A10BA02"]},
            ],
            "omics": OmicsPanel(genes=("TP53", "BRCA1", "EGFR", "KRAS", "MYC")).model_dump(),
            "molecule": MoleculeSpec(max_length=24).model_dump(),
            "protein": ProteinSpec(max_length=16).model_dump(),
            "tasks": [
                {"name": "readmission", "kind": "binary", "target": "readmitted"},
                {
                    "name": "stage",
                    "kind": "multiclass",
                    "target": "stage",
                    "classes": ["i", "ii", "iii"],
                },
                {"name": "egfr", "kind": "regression", "target": "egfr_slope"},
                {"name": "survival", "kind": "survival", "target": "time_d", "event": "died"},
            ],
        }
    )


SUBSETS = [  # every subset of the four modalities, the empty one included
    frozenset(combination)
    for size in range(len(MODALITY_ORDER) + 1)
    for combination in itertools.combinations(MODALITY_ORDER, size)
]


def sample(patient_id: str, modalities: frozenset[str], *, seed: int = 0) -> PatientSample:
    """A patient of `all_modalities_contract` with exactly `modalities`, every task labelled."""
    rng = np.random.default_rng(seed)
    return PatientSample(
        patient_id,
        {"age": float(rng.uniform(20, 90))} if "clinical" in modalities else {},
        {"diagnoses": frozenset({"I10"})} if "clinical" in modalities else {},
        omics=rng.uniform(0, 20, 5) if "omics" in modalities else None,
        smiles=["CCO", "c1ccccc1O", "CC(=O)N"][seed % 3] if "molecule" in modalities else None,
        protein=["MKV", "ACDEFG", "WWY"][seed % 3] if "protein" in modalities else None,
        targets={
            "readmitted": seed % 2,
            "stage": seed % 3,
            "egfr_slope": 0.5,
            "time_d": 9,
            "died": 1,
        },
    )
