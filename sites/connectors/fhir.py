"""FHIR R4 Bundles (JSON) and bulk-export NDJSON, validated with `fhir.resources` (R4B).

Read: Patient (registers the patient; `gender` and `birthDate` for `patient = "sex"` /
`"age"` features), Observation and its `component`s (numeric features by LOINC code
from value[x]: Quantity with its UCUM unit, integer, boolean, string, CodeableConcept,
the last three through the feature's `recode`; `local` categorical features by
`categorical.X.code` from the value; targets by code, a Quantity's unit converted to
the task's), Condition (ICD-10 or SNOMED codes), MedicationRequest and
MedicationStatement (ATC or RxNorm codes). Every resource is validated against the
FHIR model first; an invalid one is a problem naming the file, the entry (a Bundle's
entry number, an NDJSON line) and the resource. Other resource types are validated and
otherwise ignored.

Which features are read: those listed in the dataset's `[datasets.numeric]` (code =
the LOINC code, default the contract feature's `loinc`) and `[datasets.categorical]`;
an empty section means every contract feature that has a LOINC code / every categorical
feature, matched by its code system.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from medfed.model.contract import StudyContract
from medfed.sites.config import DatasetConfig, NumericSource
from medfed.sites.connectors.tables import dataset_texts
from medfed.sites.demographics import UNKNOWN_GENDER, BirthDateError, age_at, parse_birth_date
from medfed.sites.records import DatasetRead, RecordBuilder, Where, parse_time

CODE_SYSTEMS: dict[str, tuple[str, ...]] = {
    "icd10": ("http://hl7.org/fhir/sid/icd-10", "http://hl7.org/fhir/sid/icd-10-cm"),
    "atc": ("http://www.whocc.no/atc",),
    "rxnorm": ("http://www.nlm.nih.gov/research/umls/rxnorm",),
    "snomed": ("http://snomed.info/sct",),
    "loinc": ("http://loinc.org",),
}
"""The FHIR `coding.system` URIs of each contract code system."""

RESOURCES = ("Patient", "Observation", "Condition", "MedicationRequest", "MedicationStatement")
"""The resource types read (others are validated and ignored); docs/site.md lists them."""
VALUE_TYPES = ("valueQuantity", "valueInteger", "valueBoolean", "valueString",
               "valueCodeableConcept")  # fmt: skip
"""The Observation value[x] types that map onto a number or a code."""

_CONDITION_SYSTEMS = ("icd10", "snomed")
_MEDICATION_SYSTEMS = ("atc", "rxnorm")


def read_fhir(dataset: DatasetConfig, contract: StudyContract, base: Path) -> DatasetRead:
    """Read every Bundle (`.json`) or bulk export (`.ndjson`) file of a `fhir` dataset."""
    builder = RecordBuilder(contract, dataset, one_row_per_patient=False)
    builder.check_mapping(Where(f"dataset {dataset.name}"))
    mapper = _Mapper(builder)
    for path, text in dataset_texts(dataset.paths, base, dataset.encoding, builder.problems):
        for where, resource in _resources(str(path), text, builder):
            mapper.take(resource, where)
    return builder.result()


def _resources(name: str, text: str, builder: RecordBuilder) -> Iterator[tuple[Where, Any]]:
    """Each resource as a validated FHIR model, with where it sits in the file."""
    if name.lower().endswith(".ndjson"):
        for line, content in enumerate(text.splitlines(), start=1):
            if content.strip():
                yield from _validated(
                    name, line, _json(content, Where(name, line), builder), builder
                )
        return
    document = _json(text, Where(name), builder)
    if isinstance(document, dict) and document.get("resourceType") == "Bundle":
        entries = document.get("entry", [])
        if not isinstance(entries, list):
            builder.problem(Where(name, None, "Bundle.entry"), "is not a list")
            return
        for number, entry in enumerate(entries, start=1):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if resource is None:
                builder.problem(Where(name, number, "Bundle.entry"), "entry holds no resource")
                continue
            yield from _validated(name, number, resource, builder)
    elif document is not None:
        yield from _validated(name, 1, document, builder)


def _json(text: str, where: Where, builder: RecordBuilder) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        builder.problem(where, f"is not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})")
    except RecursionError:
        builder.problem(where, "is JSON nested too deeply")
    return None


def _validated(
    name: str, row: int, resource: Any, builder: RecordBuilder
) -> Iterator[tuple[Where, Any]]:
    if resource is None:
        return
    kind = resource.get("resourceType") if isinstance(resource, dict) else None
    if not isinstance(kind, str):
        builder.problem(Where(name, row), "is not a FHIR resource (no resourceType)")
        return
    where = Where(name, row, f"{kind}/{resource.get('id', '?')}")
    try:
        model = get_fhir_model_class(kind)
    except (ValueError, KeyError, AttributeError):
        builder.problem(where, f"resourceType {kind!r} is not a FHIR R4 resource")
        return
    try:
        yield where, model.model_validate(resource)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(resource)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        builder.problem(where, f"invalid FHIR {kind}: {field}: {first['msg']}{more}")
    except (ValueError, TypeError, RecursionError) as exc:
        builder.problem(where, f"invalid FHIR {kind}: {exc}")


class _Mapper:
    """Maps validated resources onto the builder, by the dataset's codes."""

    def __init__(self, builder: RecordBuilder) -> None:
        self.builder = builder
        contract, dataset = builder.contract, builder.dataset
        sources = builder.numeric_sources() or {
            f.name: NumericSource(code=f.loinc) for f in contract.numeric if f.loinc
        }
        self.numeric: dict[str, list[tuple[str, NumericSource]]] = {}
        self.demographics = {n: s for n, s in sources.items() if s.patient is not None}
        for name, source in sources.items():
            if source.patient is not None:
                continue
            code = source.code or builder.numeric_feature(name).loinc
            if code is None:
                builder.problem(
                    Where(f"dataset {dataset.name}", None, f"numeric.{name}"),
                    "needs a code (the LOINC code of its Observations) or a patient field",
                )
            else:
                self.numeric.setdefault(code, []).append((name, source))
        self.targets = {s.code: name for name, s in builder.target_sources().items() if s.code}
        self.valued = {s.code: name for name, s in builder.categorical_sources().items() if s.code}
        chosen = set(dataset.categorical) or {f.name for f in contract.categorical}
        chosen -= set(self.valued.values())
        self.categorical = [f for f in contract.categorical if f.name in chosen]

    def take(self, resource: Any, where: Where) -> None:
        kind = resource.get_resource_type()
        if kind == "Patient":
            if resource.id:
                self._patient(resource, str(resource.id), where)
            return
        patient_id = _patient_of(resource)
        if kind not in RESOURCES:
            return
        if patient_id is None:
            self.builder.problem(where, "has no subject reference to a Patient")
            return
        if kind == "Observation":
            self._observation(resource, patient_id, where)
        elif kind == "Condition":
            self._codes(resource.code, _CONDITION_SYSTEMS, patient_id, where)
        else:
            self._codes(resource.medicationCodeableConcept, _MEDICATION_SYSTEMS, patient_id, where)

    def _patient(self, resource: Any, patient_id: str, where: Where) -> None:
        """Register the patient; read `Patient.gender` and age from `Patient.birthDate`."""
        self.builder.record(patient_id)
        index = self.builder.dataset.index_date
        for name, source in self.demographics.items():
            at = Where(
                where.file, where.row, f"{where.column}.{_PATIENT_FIELDS[str(source.patient)]}"
            )
            if source.patient == "sex":
                gender = str(resource.gender or "")
                if gender not in UNKNOWN_GENDER:
                    self.builder.add_numeric(
                        patient_id, name, gender, unit=None, time=None, where=at
                    )
            elif resource.birthDate is not None and index is not None:
                try:
                    age = age_at(parse_birth_date(resource.birthDate), index)
                except BirthDateError as exc:
                    self.builder.problem(at, str(exc))
                    continue
                self.builder.add_numeric(patient_id, name, age, unit="a", time=None, where=at)

    def _observation(self, resource: Any, patient_id: str, where: Where) -> None:
        time = _time_of(resource)
        parts = [(resource.code, resource)] + [
            (component.code, component) for component in resource.component or []
        ]
        for concept, holder in parts:
            for coding in (concept.coding or []) if concept is not None else []:
                code = str(coding.code or "")
                for name, source in self.numeric.get(code, []):
                    self._numeric(holder, code, name, source, patient_id, time, where)
                if code in self.valued:
                    self._valued_code(holder, code, self.valued[code], patient_id, where)
                if code in self.targets and holder is resource:
                    value, unit = _value_of(holder)
                    self.builder.add_target(patient_id, self.targets[code], value, where, unit=unit)

    def _numeric(
        self,
        holder: Any,
        code: str,
        name: str,
        source: NumericSource,
        patient_id: str,
        time: dt.datetime | None,
        where: Where,
    ) -> None:
        value, unit = _value_of(holder)
        if value is None:
            kinds = [f for f in _UNREADABLE if getattr(holder, f, None) is not None]
            what = f"a {kinds[0]}, which maps to no number" if kinds else "no value"
            self.builder.problem(where, f"Observation {code} ({name}) has {what}")
            return
        self.builder.add_numeric(
            patient_id, name, value, unit=source.unit or unit, time=time, where=where
        )

    def _valued_code(
        self, holder: Any, code: str, name: str, patient_id: str, where: Where
    ) -> None:
        value, _ = _value_of(holder)
        if value is None:
            self.builder.problem(where, f"Observation {code} ({name}) has no coded value")
            return
        text = ("true" if value else "false") if isinstance(value, bool) else str(value).strip()
        self.builder.add_codes(patient_id, name, [text], where)

    def _codes(self, concept: Any, systems: tuple[str, ...], patient_id: str, where: Where) -> None:
        if concept is None:
            return
        for coding in concept.coding or []:
            for feature in self.categorical:
                if feature.system in systems and coding.system in CODE_SYSTEMS[feature.system]:
                    self.builder.add_codes(patient_id, feature.name, [str(coding.code)], where)


def _patient_of(resource: Any) -> str | None:
    subject = getattr(resource, "subject", None)
    reference = getattr(subject, "reference", None) if subject is not None else None
    if not reference:
        return None
    return str(reference).removeprefix("Patient/")


def _time_of(resource: Any) -> dt.datetime | None:
    for value in (resource.effectiveDateTime, resource.issued):
        if value is not None:
            return parse_time(value)
    period = resource.effectivePeriod
    return parse_time(period.start) if period is not None and period.start else None


_UNREADABLE = ("valueRange", "valueRatio", "valueSampledData", "valueTime", "valueDateTime",
               "valuePeriod")  # fmt: skip
_PATIENT_FIELDS = {"sex": "gender", "age": "birthDate"}


def _value_of(holder: Any) -> tuple[object, str | None]:
    """An Observation's (or component's) value[x] and the unit it states: Quantity (its
    UCUM code, else its unit text), integer, boolean, string, or a CodeableConcept's
    first code; (None, None) for the types that hold no single value."""
    quantity = holder.valueQuantity
    if quantity is not None:
        return quantity.value, quantity.code or quantity.unit
    for value in (holder.valueInteger, holder.valueBoolean, holder.valueString):
        if value is not None:
            return value, None
    concept = holder.valueCodeableConcept
    if concept is not None and concept.coding:
        return concept.coding[0].code, None
    return None, None
