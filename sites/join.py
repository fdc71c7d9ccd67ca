"""Joining a site's datasets into one `PatientSample` per patient, and the held-out split.

Each patient gets whichever modalities their datasets hold. Repeated measurements of a
numeric feature (within or across datasets) are reduced by the contract feature's
`reduce` rule; `latest` and `first` order by time, then by reading order (values
without a time count as earlier than any timed one). A molecule, protein, omics
profile or target that two datasets give differently is a problem, never a choice.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

from medfed.model.contract import NumericFeature, StudyContract
from medfed.model.sample import PatientSample
from medfed.sites.errors import DataProblem
from medfed.sites.records import DatasetRead, Measurement, PartialRecord

HOLDOUT_PER_MILLE = 200
"""About 20% of a site's patients (chosen by a hash of their id) are held out for evaluation."""

_EARLIEST = dt.datetime.min.replace(tzinfo=dt.UTC)


def _hash_rank(patient_id: str) -> int:
    digest = hashlib.sha256(patient_id.encode()).digest()
    return int.from_bytes(digest[:4], "big")


def is_held_out(patient_id: str, *, per_mille: int = HOLDOUT_PER_MILLE) -> bool:
    """Whether `patient_id` is in the held-out split: a hash of the id, so the same
    patient is always on the same side, at every site and in every run."""
    return _hash_rank(patient_id) % 1000 < per_mille


def split_by_patient(
    samples: Sequence[PatientSample], *, per_mille: int = HOLDOUT_PER_MILLE, minimum: int = 0
) -> tuple[tuple[PatientSample, ...], tuple[PatientSample, ...]]:
    """(training, held-out) samples: those `is_held_out`, then, while fewer than
    `minimum` (and fewer than half the patients), the next patients in hash order."""
    held = {s.patient_id for s in samples if is_held_out(s.patient_id, per_mille=per_mille)}
    wanted = min(minimum, len(samples) // 2)
    if len(held) < wanted:
        ranked = sorted(
            (s.patient_id for s in samples if s.patient_id not in held),
            key=lambda pid: (_hash_rank(pid) % 1000, pid),
        )
        held.update(ranked[: wanted - len(held)])
    train = tuple(s for s in samples if s.patient_id not in held)
    return train, tuple(s for s in samples if s.patient_id in held)


def reduce_measurements(feature: NumericFeature, measurements: Sequence[Measurement]) -> float:
    """One value from a patient's repeated measurements, by the feature's rule."""
    values = [m.value for m in measurements]
    if feature.reduce == "mean":
        return float(np.mean(values))
    if feature.reduce == "min":
        return min(values)
    if feature.reduce == "max":
        return max(values)
    ordered = sorted(measurements, key=lambda m: (m.time or _EARLIEST, m.order))
    return ordered[-1].value if feature.reduce == "latest" else ordered[0].value


def join_patients(
    reads: Iterable[DatasetRead], contract: StudyContract
) -> tuple[list[PatientSample], list[DataProblem]]:
    """One sample per patient over all datasets, sorted by patient id, and the conflicts."""
    merged: dict[str, PartialRecord] = {}
    problems: list[DataProblem] = []
    for read in reads:
        for patient_id, record in read.records.items():
            if patient_id not in merged:
                merged[patient_id] = PartialRecord(patient_id)
            _merge(merged[patient_id], record, read.dataset, problems)
    features = {feature.name: feature for feature in contract.numeric}
    samples = [
        PatientSample(
            patient_id=record.patient_id,
            numeric={
                name: reduce_measurements(features[name], found)
                for name, found in record.numeric.items()
                if found
            },
            codes={name: frozenset(codes) for name, codes in record.codes.items() if codes},
            omics=record.omics,
            smiles=record.smiles,
            protein=record.protein,
            targets={name: value for name, (value, _) in record.targets.items()},
        )
        for _, record in sorted(merged.items())
    ]
    return samples, problems


def _merge(
    into: PartialRecord, record: PartialRecord, dataset: str, problems: list[DataProblem]
) -> None:
    for name, measurements in record.numeric.items():
        into.numeric.setdefault(name, []).extend(measurements)
    for name, codes in record.codes.items():
        into.codes.setdefault(name, set()).update(codes)
    for name, (value, where) in record.targets.items():
        if name in into.targets and into.targets[name][0] != value:
            problems.append(
                where.problem(
                    f"patient {record.patient_id!r}: {name} is {value:g} in dataset {dataset}"
                    f" but {into.targets[name][0]:g} in {into.targets[name][1].file}"
                )
            )
        else:
            into.targets[name] = (value, where)
    for field in ("smiles", "protein"):
        ours, theirs = getattr(into, field), getattr(record, field)
        if theirs is not None and ours is not None and ours != theirs:
            problems.append(
                DataProblem(
                    dataset, None, field, f"patient {record.patient_id!r} has two {field} values"
                )
            )
        elif theirs is not None:
            setattr(into, field, theirs)
    if record.omics is not None:
        if into.omics is not None and not np.array_equal(into.omics, record.omics, equal_nan=True):
            problems.append(
                DataProblem(
                    dataset, None, "omics", f"patient {record.patient_id!r} has two omics profiles"
                )
            )
        elif into.omics is None:
            into.omics = record.omics
