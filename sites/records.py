"""What a connector hands the join: per-patient partial records, and every problem found.

Connectors only locate values (file, row, column) and hand them to `RecordBuilder`,
which does what is the same for every format: parse the number, convert the unit,
check the plausible range, check codes against the vocabulary and targets against the
task. So every format reports a bad value in the same words.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

import numpy as np

from medfed.model.contract import CategoricalFeature, NumericFeature, StudyContract, TaskSpec
from medfed.sites.config import CategoricalSource, DatasetConfig, NumericSource, TargetSource
from medfed.sites.errors import DataProblem
from medfed.sites.units import UnitError, canonical_unit, convert


@dataclass(frozen=True)
class Where:
    """Where a value was read: the file, the row (line or record number), the column."""

    file: str
    row: int | None = None
    column: str | None = None

    def problem(self, message: str) -> DataProblem:
        return DataProblem(self.file, self.row, self.column, message)


@dataclass(frozen=True)
class Measurement:
    """One numeric value in the contract's unit; `order` is the reading order."""

    value: float
    time: dt.datetime | None
    order: int
    where: Where


@dataclass
class PartialRecord:
    """What one dataset holds for one patient (any part may be empty)."""

    patient_id: str
    numeric: dict[str, list[Measurement]] = field(default_factory=dict)
    codes: dict[str, set[str]] = field(default_factory=dict)
    omics: np.ndarray | None = None
    smiles: str | None = None
    protein: str | None = None
    targets: dict[str, tuple[float, Where]] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetRead:
    """A connector's result: the dataset's records by patient id, and its problems."""

    dataset: str
    records: Mapping[str, PartialRecord]
    problems: tuple[DataProblem, ...]


def parse_number(cell: object) -> float | None:
    """A finite float from a cell (text or number); None if it is not one."""
    if isinstance(cell, bool):
        return float(cell)
    if isinstance(cell, int | float | Decimal):
        value = float(cell)
    elif isinstance(cell, str):
        try:
            value = float(cell.strip())
        except ValueError:
            return None
    else:
        return None
    return value if math.isfinite(value) else None


def is_blank(cell: object) -> bool:
    """True for a missing cell: None, NaN or empty text."""
    if cell is None:
        return True
    if isinstance(cell, float) and math.isnan(cell):
        return True
    return isinstance(cell, str) and not cell.strip()


def parse_time(cell: object) -> dt.datetime | None:
    """An ISO date or date-time (naive ones taken as UTC); None if it is not one."""
    if isinstance(cell, dt.datetime):
        stamp = cell
    elif isinstance(cell, dt.date):
        stamp = dt.datetime(cell.year, cell.month, cell.day)
    elif isinstance(cell, str):
        try:
            stamp = dt.datetime.fromisoformat(cell.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
    else:
        return None
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=dt.UTC)


class RecordBuilder:
    """Collects one dataset's records and problems, checking each value as it arrives."""

    def __init__(
        self, contract: StudyContract, dataset: DatasetConfig, *, one_row_per_patient: bool
    ) -> None:
        self.contract = contract
        self.dataset = dataset
        self.one_row_per_patient = one_row_per_patient
        self.records: dict[str, PartialRecord] = {}
        self.problems: list[DataProblem] = []
        self._order = 0
        self._numeric = {feature.name: feature for feature in contract.numeric}
        self._categorical = {feature.name: feature for feature in contract.categorical}
        self._targets = {name: task for task in contract.tasks for name in task.label_fields}

    def result(self) -> DatasetRead:
        return DatasetRead(self.dataset.name, dict(self.records), tuple(self.problems))

    def record(self, patient_id: str) -> PartialRecord:
        if patient_id not in self.records:
            self.records[patient_id] = PartialRecord(patient_id)
        return self.records[patient_id]

    def problem(self, where: Where, message: str) -> None:
        self.problems.append(where.problem(message))

    def patient(self, cell: object, where: Where) -> str | None:
        """The patient id in `cell`, or None (and a problem) when it is empty."""
        if is_blank(cell):
            self.problem(where, "patient id is empty")
            return None
        text = str(int(cell)) if isinstance(cell, float) and cell.is_integer() else str(cell)
        return text.strip()

    def numeric_feature(self, name: str) -> NumericFeature:
        return self._numeric[name]

    def add_numeric(
        self,
        patient_id: str,
        name: str,
        cell: object,
        *,
        unit: str | None,
        time: dt.datetime | None,
        where: Where,
    ) -> None:
        """Parse `cell` (or map it through the source's `recode`), convert it from `unit`
        to the contract's, range-check, and keep it."""
        if is_blank(cell):
            return
        feature = self._numeric[name]
        source = self.dataset.numeric.get(name)
        recode = source.recode if source is not None else {}
        text = _recode_key(cell)
        if text in recode:
            raw, unit = recode[text], feature.unit  # recoded values are in the contract's unit
        else:
            parsed = parse_number(cell) if not isinstance(cell, bool) or not recode else None
            if parsed is None:
                known = f" (recode knows {sorted(recode)})" if recode else ""
                self.problem(where, f"{cell!r} is not a number{known}")
                return
            raw = parsed
        try:
            value = convert(raw, unit or feature.unit, feature.unit, analyte=feature.name)
        except UnitError as exc:
            self.problem(where, str(exc))
            return
        if not feature.minimum <= value <= feature.maximum:
            converted = unit is not None and canonical_unit(unit) != feature.unit
            shown = f"{raw:g} {unit} = {value:g}" if converted else f"{value:g}"
            self.problem(
                where,
                f"{shown} {feature.unit} is outside the plausible range"
                f" [{feature.minimum:g}, {feature.maximum:g}]",
            )
            return
        measurements = self.record(patient_id).numeric.setdefault(name, [])
        if self.one_row_per_patient and measurements and measurements[0].value != value:
            first = measurements[0].where.row
            self.problem(
                where,
                f"patient {patient_id!r} repeats with a different {name}"
                f" ({value:g}, not {measurements[0].value:g} as at row {first})",
            )
            return
        self._order += 1
        measurements.append(Measurement(value, time, self._order, where))

    def add_codes(self, patient_id: str, name: str, codes: list[str], where: Where) -> None:
        """Recode `codes` through the dataset's mapping; each must be in the vocabulary."""
        feature: CategoricalFeature = self._categorical[name]
        source = self.dataset.categorical.get(name)
        recode = source.recode if source is not None else {}
        known = set(feature.vocabulary)
        kept = self.record(patient_id).codes.setdefault(name, set())
        for code in codes:
            mapped = recode.get(code, code)
            if mapped in known:
                kept.add(mapped)
            else:
                self.problem(
                    where, f"code {code!r} is not in the {feature.system} vocabulary of {name}"
                )

    def add_target(
        self, patient_id: str, name: str, cell: object, where: Where, *, unit: str | None = None
    ) -> None:
        """Check a label against its task's kind, convert a time or regression target
        from `unit` (the record's; the dataset's `unit` wins) to the task's, and keep it
        (conflicts are problems)."""
        if is_blank(cell):
            return
        task = self._targets[name]
        value = self._label(task, name, cell, where)
        if value is None:
            return
        if name == task.target and task.kind in ("survival", "regression"):
            value = self._target_unit(task, name, value, unit, where)
            if value is None:
                return
        targets = self.record(patient_id).targets
        if name in targets and targets[name][0] != value:
            earlier = targets[name][1]
            self.problem(
                where,
                f"patient {patient_id!r} has {name} {value:g} here but {targets[name][0]:g}"
                f" at {earlier.file}, row {earlier.row}",
            )
            return
        targets[name] = (value, where)

    def _target_unit(
        self, task: TaskSpec, name: str, value: float, unit: str | None, where: Where
    ) -> float | None:
        source = self.dataset.targets.get(name)
        local = (source.unit if source is not None else None) or unit
        if task.unit is None:
            if local is not None:
                self.problem(
                    where,
                    f"{name} is in {local!r} but the study contract gives task {task.name} no"
                    " unit to convert it to (set unit in the contract's task)",
                )
                return None
            return value
        try:
            return convert(value, local or task.unit, task.unit)
        except UnitError as exc:
            self.problem(where, str(exc))
            return None

    def _label(self, task: TaskSpec, name: str, cell: object, where: Where) -> float | None:
        source = self.dataset.targets.get(name)
        text = _recode_key(cell)
        if source is not None and text in source.recode:
            value: float | None = source.recode[text]
        elif task.kind == "multiclass" and text in task.classes:
            value = float(task.classes.index(text))
        else:
            value = parse_number(cell)
        if value is None:
            self.problem(where, f"{cell!r} is not a number")
            return None
        binary = task.kind == "binary" or (task.kind == "survival" and name == task.event)
        if binary and value not in (0.0, 1.0):
            self.problem(where, f"{value:g} is not 0 or 1")
            return None
        if task.kind == "multiclass" and (
            not value.is_integer() or not 0 <= value < len(task.classes)
        ):
            self.problem(where, f"{cell!r} is not one of the classes {list(task.classes)}")
            return None
        if task.kind == "survival" and name == task.target and value < 0:
            self.problem(where, f"survival time {value:g} is negative")
            return None
        return value

    def numeric_sources(self) -> dict[str, NumericSource]:
        """The dataset's numeric mapping, less names the contract lacks (`check_mapping`)."""
        return {k: v for k, v in self.dataset.numeric.items() if k in self._numeric}

    def categorical_sources(self) -> dict[str, CategoricalSource]:
        return {k: v for k, v in self.dataset.categorical.items() if k in self._categorical}

    def target_sources(self) -> dict[str, TargetSource]:
        return {k: v for k, v in self.dataset.targets.items() if k in self._targets}

    def check_mapping(self, where: Where) -> None:
        """Every name the dataset maps must be in the contract (one problem per name)."""
        pairs = (
            ("numeric", self.dataset.numeric, self._numeric),
            ("categorical", self.dataset.categorical, self._categorical),
            ("targets", self.dataset.targets, self._targets),
        )
        for section, mapped, known in pairs:
            for name in mapped:
                if name not in known:
                    self.problem(
                        where,
                        f"[datasets.{section}] maps {name!r}, which the study contract lacks"
                        f" (it has {sorted(known)})",
                    )


def _recode_key(cell: object) -> str:
    """How a cell is looked up in a `recode` table: text stripped, booleans as FHIR
    writes them (`true`/`false`), whole numbers without a decimal point (`8507`)."""
    if isinstance(cell, bool):
        return "true" if cell else "false"
    if isinstance(cell, float) and cell.is_integer():
        return str(int(cell))
    return str(cell).strip()
