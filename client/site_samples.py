"""The one adapter from a site's table to the model's unit of data, `PatientSample`.

The demo's `SiteTable` holds features standardised by the contract's reference; a
`PatientSample` holds values in the contract's units, and the model's tokenizer does
the standardising. So this adapter undoes it (clamped to the plausible range the table
already checked, against float32 rounding at its edges). Real connectors (CSV/Parquet,
FHIR, OMOP, ...) produce `PatientSample`s themselves and will replace this adapter.
"""

from __future__ import annotations

import numpy as np

from model.contract import StudyContract
from model.sample import PatientSample
from sites.tabular import SiteTable


def table_samples(
    features: np.ndarray, labels: np.ndarray, contract: StudyContract, *, prefix: str
) -> list[PatientSample]:
    """One sample per row of standardised `features` with its binary label.

    The label goes to the target of the contract's first task (the demo's outcome).
    Patient ids are row positions (`prefix`-0, ...): they only name a row in errors.
    """
    target = contract.tasks[0].target
    samples = []
    for row, (values, label) in enumerate(zip(features, labels, strict=True)):
        numeric = {
            feature.name: min(
                feature.maximum,
                max(feature.minimum, float(z) * feature.reference_scale + feature.reference_mean),
            )
            for feature, z in zip(contract.numeric, values, strict=True)
        }
        samples.append(
            PatientSample(
                patient_id=f"{prefix}-{row}",
                numeric=numeric,
                codes={},
                targets={target: float(label)},
            )
        )
    return samples


def site_table_samples(
    table: SiteTable, contract: StudyContract
) -> tuple[list[PatientSample], list[PatientSample]]:
    """The table's (training, held-out) patients as samples."""
    return (
        table_samples(table.train_features, table.train_labels, contract, prefix="train"),
        table_samples(table.eval_features, table.eval_labels, contract, prefix="held-out"),
    )
