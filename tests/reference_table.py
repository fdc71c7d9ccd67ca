"""The tests' own reader of a synthetic site's table (CSV, one row per patient): the
reference that what a site trained on is checked against, written apart from the site's
connectors (`medfed.sites.connectors`, `medfed.sites.manifest`), which the sites run.

Every row is checked: a missing or repeated patient id, a value that is not a
number, outside the feature's plausible range, or an outcome other than 0/1 is a
problem named by file, row and column. A table with any problem is refused whole,
so nothing is ever trained on a bad row.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.model.contract import StudyContract
from medfed.sites.errors import DataError, DataProblem

HOLDOUT_PER_MILLE = 200
"""About 20% of a site's patients (chosen by a hash of their id) are held out for evaluation."""


@dataclass(frozen=True)
class SiteTable:
    """A validated table: standardised features and outcomes, split by patient."""

    fingerprint: str
    train_features: np.ndarray
    train_labels: np.ndarray
    eval_features: np.ndarray
    eval_labels: np.ndarray

    @property
    def patients(self) -> int:
        return len(self.train_labels) + len(self.eval_labels)


def _is_holdout(patient_id: str) -> bool:
    digest = hashlib.sha256(patient_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < HOLDOUT_PER_MILLE


def _parse_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _records(
    reader: csv.DictReader[str], name: str, problems: list[DataProblem]
) -> Iterator[tuple[int, dict[str | Any, str | Any]]]:
    """Each record with the file's line number where it ends (blank lines counted, as an
    editor shows them); a CSV syntax error becomes a problem and ends the reading."""
    while True:
        starts_at = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            # The record that failed starts right after the last one read.
            problems.append(
                DataProblem(name, starts_at, None, f"starts a record that is not valid CSV ({exc})")
            )
            return
        yield reader.line_num, row


def read_site_table(path: Path, contract: StudyContract) -> SiteTable:
    """Read and validate `path`; raise `DataError` naming every problem found."""
    name = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(
            [DataProblem(name, None, None, f"cannot be read ({exc.strerror})")]
        ) from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError([DataProblem(name, None, None, "is not UTF-8 text")]) from exc
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
    except csv.Error as exc:
        raise DataError([DataProblem(name, 1, None, f"is not valid CSV ({exc})")]) from exc
    required = [contract.patient_id, *contract.feature_names, contract.tasks[0].target]
    missing = [column for column in required if column not in header]
    if missing:
        raise DataError([DataProblem(name, 1, column, "column is missing") for column in missing])
    problems: list[DataProblem] = []
    seen_ids: set[str] = set()
    rows: list[tuple[str, list[float], int]] = []
    for row_number, row in _records(reader, name, problems):
        if None in row:
            problems.append(DataProblem(name, row_number, None, "has more fields than the header"))
            continue
        patient_id = (row[contract.patient_id] or "").strip()
        if not patient_id:
            problems.append(DataProblem(name, row_number, contract.patient_id, "is empty"))
        elif patient_id in seen_ids:
            problems.append(
                DataProblem(
                    name, row_number, contract.patient_id, f"repeats patient {patient_id!r}"
                )
            )
        seen_ids.add(patient_id)
        values: list[float] = []
        for feature in contract.numeric:
            cell = (row[feature.name] or "").strip()
            value = _parse_number(cell)
            if value is None:
                problems.append(
                    DataProblem(name, row_number, feature.name, f"{cell!r} is not a number")
                )
            elif not feature.minimum <= value <= feature.maximum:
                problems.append(
                    DataProblem(
                        name,
                        row_number,
                        feature.name,
                        f"{value:g} {feature.unit} is outside the plausible range"
                        f" [{feature.minimum:g}, {feature.maximum:g}]",
                    )
                )
            else:
                values.append((value - feature.reference_mean) / feature.reference_scale)
        outcome = (row[contract.tasks[0].target] or "").strip()
        if outcome not in ("0", "1"):
            problems.append(
                DataProblem(
                    name, row_number, contract.tasks[0].target, f"{outcome!r} is not 0 or 1"
                )
            )
        if len(values) == len(contract.numeric) and outcome in ("0", "1"):
            rows.append((patient_id, values, int(outcome)))
    if problems:
        raise DataError(problems)
    if not rows:
        raise DataError([DataProblem(name, None, None, "holds no patients")])
    holdout = np.array([_is_holdout(patient_id) for patient_id, _, _ in rows])
    features = np.array([values for _, values, _ in rows], dtype=np.float32)
    labels = np.array([outcome for _, _, outcome in rows], dtype=np.int64)
    canonical = hashlib.sha256(contract.sha256().encode())
    canonical.update(features.tobytes())
    canonical.update(labels.tobytes())
    return SiteTable(
        fingerprint=canonical.hexdigest(),
        train_features=features[~holdout],
        train_labels=labels[~holdout],
        eval_features=features[holdout],
        eval_labels=labels[holdout],
    )
