"""A synthetic consortium: N hospitals with heterogeneous size, case mix and outcome rate.

Each site gets one CSV table (one row per patient) on the demo contract. The same
seed always writes the same files. Outcomes follow one shared logistic model, so a
federation can learn it; sites differ in size, feature shift and prevalence.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfed.model.contract import StudyContract

TABLE_NAME = "patients.csv"

# The true risk model in standardised units, one weight per contract feature.
_TRUE_WEIGHTS = np.array([0.9, 0.35, 0.5, 0.3, 0.7, 0.8, -0.6, -0.7])


@dataclass(frozen=True)
class SyntheticSite:
    """Where one synthetic site's table was written, and its size."""

    site_id: str
    table: Path
    patients: int


def site_id(index: int) -> str:
    """The id of a synthetic consortium's site number `index` (from 0): hospital-1, ..."""
    return f"hospital-{index + 1}"


def site_ids(n_sites: int) -> tuple[str, ...]:
    """The ids of a synthetic consortium's sites: hospital-1, hospital-2, ..."""
    return tuple(site_id(i) for i in range(n_sites))


def _site_rows(
    contract: StudyContract, rng: np.random.Generator, index: int, patients: int
) -> tuple[np.ndarray, np.ndarray]:
    n_features = len(contract.numeric)
    weights = (
        _TRUE_WEIGHTS[:n_features]
        if n_features <= len(_TRUE_WEIGHTS)
        else rng.normal(0, 0.6, n_features)
    )
    shift = rng.normal(0.0, 0.35, n_features)  # each hospital's case mix
    standardised = rng.normal(shift, 1.0, (patients, n_features))
    intercept = -1.0 + 0.3 * rng.standard_normal() + 0.1 * (index % 3)
    logits = standardised @ weights + intercept
    outcomes = (rng.random(patients) < 1.0 / (1.0 + np.exp(-logits))).astype(int)
    values = np.empty_like(standardised)
    for column, feature in enumerate(contract.numeric):
        raw = feature.reference_mean + feature.reference_scale * standardised[:, column]
        values[:, column] = np.clip(raw, feature.minimum, feature.maximum)
    return values, outcomes


def write_synthetic_consortium(
    root: Path, contract: StudyContract, *, n_sites: int, seed: int
) -> tuple[SyntheticSite, ...]:
    """Write one table per site under `root/<site id>/`; return where each went."""
    if n_sites < 1:
        raise ValueError(f"n_sites must be at least 1, got {n_sites}")
    rng = np.random.default_rng(seed)
    written: list[SyntheticSite] = []
    for index, site_id in enumerate(site_ids(n_sites)):
        patients = int(rng.integers(2000, 5000))
        values, outcomes = _site_rows(contract, rng, index, patients)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([contract.patient_id, *contract.feature_names, contract.tasks[0].target])
        for row in range(patients):
            writer.writerow(
                [f"{site_id}-p{row:05d}", *(f"{value:.2f}" for value in values[row]), outcomes[row]]
            )
        table = root / site_id / TABLE_NAME
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text(buffer.getvalue(), encoding="utf-8")
        written.append(SyntheticSite(site_id=site_id, table=table, patients=patients))
    return tuple(written)
