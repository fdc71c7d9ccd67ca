"""The unit of data: one patient, with whatever modalities and labels a site holds for them.

Sites produce `list[PatientSample]`; `model.tokenizers.encode` turns such a list into
tensors. Values are in the contract's units; nothing here is standardised yet.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np


def _empty_floats() -> Mapping[str, float]:
    return MappingProxyType({})


@dataclass(frozen=True, eq=False)
class PatientSample:
    """One patient's data, read-only once built.

    `numeric`: numeric feature name -> value in the contract's unit (absent key = missing).
    `codes`: categorical feature name -> the codes the patient has (absent/empty = none).
    `omics`: float32 values in panel order, NaN = gene not measured; None = no omics.
    `smiles` / `protein`: None = no molecule / no protein sequence.
    `targets`: target or event field -> value (binary 0/1, class index, regression value,
    survival time, event 0/1); an absent field leaves that task unlabelled.

    Equality is identity (`eq=False`): an array field has no single truth value.
    """

    patient_id: str
    numeric: Mapping[str, float]
    codes: Mapping[str, frozenset[str]]
    omics: np.ndarray | None = None
    smiles: str | None = None
    protein: str | None = None
    targets: Mapping[str, float] = field(default_factory=_empty_floats)

    def __post_init__(self) -> None:
        # Copy every container so no caller can change a sample after it was built.
        freeze = object.__setattr__
        freeze(self, "numeric", MappingProxyType({k: float(v) for k, v in self.numeric.items()}))
        freeze(self, "codes", MappingProxyType({k: frozenset(v) for k, v in self.codes.items()}))
        freeze(self, "targets", MappingProxyType({k: float(v) for k, v in self.targets.items()}))
        if self.omics is not None:
            values = np.array(self.omics, dtype=np.float32, copy=True)
            if values.ndim != 1:
                raise ValueError(
                    f"patient {self.patient_id}: omics must be one value per gene,"
                    f" got shape {values.shape}"
                )
            values.setflags(write=False)
            freeze(self, "omics", values)
