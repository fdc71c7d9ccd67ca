"""The data contract of a study: which features the model reads, in what units and ranges.

The network is sized from the contract, and every site maps its local data onto it.
Standardisation uses the contract's reference mean and scale, never a site's own
statistics, so all sites feed the model the same way and nothing site-specific leaks.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field, model_validator


class NumericFeature(BaseModel):
    """One numeric clinical feature: its unit, plausible range and reference scaling."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    unit: str
    minimum: float
    maximum: float
    reference_mean: float
    reference_scale: float = Field(gt=0)

    @model_validator(mode="after")
    def _range_is_ordered(self) -> NumericFeature:
        if not self.minimum < self.maximum:
            raise ValueError(f"feature {self.name}: minimum must be below maximum")
        return self


class StudyContract(BaseModel):
    """The clinical features and binary outcome a study trains on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = 1
    patient_id: str = "patient_id"
    features: tuple[NumericFeature, ...] = Field(min_length=1)
    outcome: str = Field(pattern=r"^[a-z][a-z0-9_]*$")

    @model_validator(mode="after")
    def _names_are_unique(self) -> StudyContract:
        names = [feature.name for feature in self.features]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"feature names repeat: {duplicated}")
        if self.outcome in names or self.patient_id in names:
            raise ValueError("outcome and patient id must not also be features")
        return self

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(feature.name for feature in self.features)

    def sha256(self) -> str:
        """A stable digest of the contract; part of the model's identity."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _feature(
    name: str, unit: str, lo: float, hi: float, mean: float, scale: float
) -> NumericFeature:
    return NumericFeature(
        name=name, unit=unit, minimum=lo, maximum=hi, reference_mean=mean, reference_scale=scale
    )


DEMO_CONTRACT = StudyContract(
    features=(
        _feature("age", "a", 18, 110, 62, 14),
        _feature("bmi", "kg/m2", 12, 70, 27, 5),
        _feature("systolic_bp", "mm[Hg]", 60, 260, 132, 18),
        _feature("heart_rate", "/min", 25, 220, 78, 13),
        _feature("glucose", "mmol/L", 1.5, 40, 6.2, 1.8),
        _feature("creatinine", "umol/L", 20, 1500, 90, 30),
        _feature("hemoglobin", "g/dL", 4, 22, 13.5, 1.7),
        _feature("albumin", "g/L", 10, 60, 40, 5),
    ),
    outcome="readmitted_30d",
)
"""The demo study's contract: eight routine clinical measurements and 30-day readmission."""
