"""The data contracts of the example studies (build_consortium.py writes them into
examples/consortium/studies/*.toml, where `medfed site check --study` reads them)."""

from __future__ import annotations

import numpy as np

from medfed.model.contract import (
    CategoricalFeature,
    MoleculeSpec,
    NumericFeature,
    OmicsPanel,
    ProteinSpec,
    StudyContract,
    TaskSpec,
)


def _numeric(
    name: str,
    unit: str,
    lo: float,
    hi: float,
    mean: float,
    scale: float,
    loinc: str | None = None,
    *,
    optional: bool = False,
) -> NumericFeature:
    return NumericFeature(
        name=name,
        unit=unit,
        minimum=lo,
        maximum=hi,
        reference_mean=mean,
        reference_scale=scale,
        loinc=loinc,
        optional=optional,
    )


LUNG_CUTS_DAYS = (90.0, 180.0, 270.0, 365.0, 540.0, 730.0)
"""Clinical landmarks for advanced lung cancer (quarters of the first year, 18 months,
two years), fixed before looking at any site's data."""
BREAST_CUTS_DAYS = (365.0, 730.0, 1096.0, 1826.0, 2557.0, 3652.0)
"""1, 2, 3, 5, 7 and 10 years: the usual landmarks of breast-cancer follow-up."""

LUNG = StudyContract(
    name="lung",
    numeric=(
        _numeric("age", "a", 18, 100, 62, 9, loinc="30525-0"),
        _numeric("female", "1", 0, 1, 0.4, 0.5),
        _numeric("ecog", "{score}", 0, 4, 1, 0.7, loinc="89247-1"),
        # lung-csv's hospital records none of these three: a site may lack them
        _numeric("karnofsky_physician", "%", 0, 100, 82, 12, optional=True),
        _numeric("karnofsky_patient", "%", 0, 100, 80, 15, optional=True),
        _numeric("meal_calories", "kcal", 0, 5000, 930, 400, optional=True),
        _numeric("weight_loss", "kg", -40, 60, 4.4, 5.9),
    ),
    tasks=(
        TaskSpec(
            name="survival",
            kind="survival",
            target="time_days",
            event="died",
            interval_cuts=LUNG_CUTS_DAYS,
        ),
    ),
)
"""NCCTG lung cancer: performance scores, intake and weight loss; overall survival."""


def breast_contract(genes: tuple[str, ...], expression: np.ndarray) -> StudyContract:
    """Breast cancer: the 76-gene panel (per-gene reference scaling from the published
    matrix, a public reference cohort), age, tumour size, ER status and grade;
    distant-metastasis-free survival."""
    return StudyContract(
        name="breast",
        numeric=(
            _numeric("age", "a", 18, 100, 46, 7, loinc="30525-0"),
            _numeric("tumor_size", "cm", 0, 20, 2.2, 0.8),
        ),
        categorical=(
            CategoricalFeature(name="er", system="local", vocabulary=("negative", "positive")),
            CategoricalFeature(
                name="grade",
                system="local",
                vocabulary=(
                    "poorly differentiated",
                    "intermediate",
                    "well differentiated",
                    "unkown",
                ),
            ),
        ),
        omics=OmicsPanel(
            genes=genes,
            transform="none",
            reference_mean=round(float(np.mean(expression)), 3),
            reference_scale=round(float(np.std(expression)), 3),
            gene_means=tuple(round(float(v), 4) for v in np.mean(expression, axis=0)),
            gene_scales=tuple(round(float(v), 4) for v in np.std(expression, axis=0)),
        ),
        tasks=(
            TaskSpec(
                name="metastasis",
                kind="survival",
                target="time_days",
                event="event",
                interval_cuts=BREAST_CUTS_DAYS,
            ),
        ),
    )


FREESOLV = StudyContract(
    name="freesolv",
    patient_id="molecule_id",
    molecule=MoleculeSpec(max_length=64),
    tasks=(
        TaskSpec(
            name="hydration",
            kind="regression",
            target="hydration_free_energy",
            reference_mean=-3.8,
            reference_scale=3.8,
        ),
    ),
)
"""FreeSolv: experimental hydration free energy (kcal/mol) of small molecules; the target's
reference (-3.8 +- 3.8 kcal/mol) is the published database's spread."""

AMP = StudyContract(
    name="amp",
    protein=ProteinSpec(max_length=100),
    tasks=(TaskSpec(name="antimicrobial", kind="binary", target="is_amp"),),
)
"""Antimicrobial peptides against UniProt sequences."""
