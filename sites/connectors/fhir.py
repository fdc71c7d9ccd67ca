"""FHIR R4 Bundles (JSON) and bulk-export NDJSON, validated with `fhir.resources` (R4B).

Read: Patient (registers the patient), Observation (numeric features by LOINC code with
UCUM units, and targets by code), Condition (ICD-10 or SNOMED codes), MedicationRequest
and MedicationStatement (ATC or RxNorm codes). Every resource is validated against the
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
from medfed.sites.records import DatasetRead, RecordBuilder, Where, parse_time

CODE_SYSTEMS: dict[str, tuple[str, ...]] = {
    "icd10": ("http://hl7.org/fhir/sid/icd-10", "http://hl7.org/fhir/sid/icd-10-cm"),
    "atc": ("http://www.whocc.no/atc",),
    "rxnorm": ("http://www.nlm.nih.gov/research/umls/rxnorm",),
    "snomed": ("http://snomed.info/sct",),
    "loinc": ("http://loinc.org",),
}
"""The FHIR `coding.system` URIs of each contract code system."""

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
        self.numeric: dict[str, tuple[str, NumericSource]] = {}
        for name, source in sources.items():
            code = source.code or builder.numeric_feature(name).loinc
            if code is None:
                builder.problem(
                    Where(f"dataset {dataset.name}", None, f"numeric.{name}"),
                    "needs a code (the LOINC code of its Observations)",
                )
            else:
                self.numeric[code] = (name, source)
        self.targets = {s.code: name for name, s in builder.target_sources().items() if s.code}
        chosen = set(dataset.categorical) or {f.name for f in contract.categorical}
        self.categorical = [f for f in contract.categorical if f.name in chosen]

    def take(self, resource: Any, where: Where) -> None:
        kind = resource.get_resource_type()
        if kind == "Patient":
            if resource.id:
                self.builder.record(str(resource.id))
            return
        patient_id = _patient_of(resource)
        if kind not in ("Observation", "Condition", "MedicationRequest", "MedicationStatement"):
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

    def _observation(self, resource: Any, patient_id: str, where: Where) -> None:
        codings = (resource.code.coding or []) if resource.code is not None else []
        time = _time_of(resource)
        for coding in codings:
            code = str(coding.code or "")
            if code in self.numeric:
                name, source = self.numeric[code]
                quantity = resource.valueQuantity
                if quantity is None or quantity.value is None:
                    self.builder.problem(where, f"Observation {code} ({name}) has no valueQuantity")
                    continue
                unit = source.unit or quantity.code or quantity.unit
                self.builder.add_numeric(
                    patient_id, name, float(quantity.value), unit=unit, time=time, where=where
                )
            if code in self.targets:
                self.builder.add_target(patient_id, self.targets[code], _value_of(resource), where)

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


def _value_of(resource: Any) -> object:
    if resource.valueQuantity is not None:
        return resource.valueQuantity.value
    for value in (resource.valueInteger, resource.valueBoolean, resource.valueString):
        if value is not None:
            return value
    concept = resource.valueCodeableConcept
    if concept is not None and concept.coding:
        return concept.coding[0].code
    return None
