"""Joining per patient: reduce rules against plain Python, conflicts, the split, the manifest."""

from __future__ import annotations

import datetime as dt
import statistics

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from medfed.model.contract import NumericFeature
from medfed.model.sample import PatientSample
from medfed.sites.join import is_held_out, join_patients, reduce_measurements, split_by_patient
from medfed.sites.manifest import build_manifest, fingerprint
from medfed.sites.records import DatasetRead, Measurement, PartialRecord, Where

from .cohort import CONTRACT

WHERE = Where("f.csv", 2, "x")


def _feature(reduce: str) -> NumericFeature:
    return NumericFeature.model_validate(
        {"name": "x", "unit": "1", "minimum": -1e9, "maximum": 1e9, "reference_mean": 0,
         "reference_scale": 1, "reduce": reduce}
    )  # fmt: skip


def _day(n: int) -> dt.datetime:
    return dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(days=n)


values = st.lists(st.tuples(st.floats(-1e6, 1e6), st.integers(0, 400)), min_size=1, max_size=12)


@given(values)
def test_reduce_rules_match_plain_python(pairs: list[tuple[float, int]]) -> None:
    measurements = [Measurement(v, _day(d), i, WHERE) for i, (v, d) in enumerate(pairs)]
    by_time = sorted(range(len(pairs)), key=lambda i: (pairs[i][1], i))
    assert reduce_measurements(_feature("latest"), measurements) == pairs[by_time[-1]][0]
    assert reduce_measurements(_feature("first"), measurements) == pairs[by_time[0]][0]
    assert reduce_measurements(_feature("min"), measurements) == min(v for v, _ in pairs)
    assert reduce_measurements(_feature("max"), measurements) == max(v for v, _ in pairs)
    assert reduce_measurements(_feature("mean"), measurements) == pytest.approx(
        statistics.fmean(v for v, _ in pairs), rel=1e-9, abs=1e-6
    )


def test_latest_without_times_is_the_last_read() -> None:
    measurements = [Measurement(v, None, i, WHERE) for i, v in enumerate([3.0, 1.0, 2.0])]
    assert reduce_measurements(_feature("latest"), measurements) == 2.0
    timed = [*measurements, Measurement(0.5, _day(0), 9, WHERE)]
    assert reduce_measurements(_feature("latest"), timed) == 0.5  # timed beats untimed


def _read(name: str, **records: PartialRecord) -> DatasetRead:
    return DatasetRead(name, records, ())


def test_datasets_join_into_one_sample_per_patient() -> None:
    labs = PartialRecord("p1", numeric={"glucose": [Measurement(5.0, _day(1), 1, WHERE)]})
    ehr = PartialRecord(
        "p1",
        numeric={"glucose": [Measurement(7.0, _day(2), 2, WHERE)]},
        codes={"diagnoses": {"E11"}},
        targets={"readmitted_30d": (1.0, WHERE)},
    )
    other = PartialRecord("p2", smiles="CCO")
    samples, problems = join_patients(
        [_read("labs", p1=labs), _read("ehr", p1=ehr, p2=other)], CONTRACT
    )
    assert problems == []
    assert [s.patient_id for s in samples] == ["p1", "p2"]
    assert samples[0].numeric == {"glucose": 7.0}  # latest across datasets
    assert samples[0].codes == {"diagnoses": frozenset({"E11"})}
    assert samples[0].targets == {"readmitted_30d": 1.0}
    assert samples[1].smiles == "CCO" and samples[1].numeric == {}


def test_conflicting_labels_and_molecules_across_datasets_are_problems() -> None:
    a = PartialRecord("p1", smiles="CCO", targets={"readmitted_30d": (1.0, Where("a.csv", 2))})
    b = PartialRecord("p1", smiles="CCN", targets={"readmitted_30d": (0.0, Where("b.csv", 7))})
    _, problems = join_patients([_read("a", p1=a), _read("b", p1=b)], CONTRACT)
    assert [(p.file, p.row) for p in problems] == [("b.csv", 7), ("b", None)]
    assert "readmitted_30d is 0 in dataset b but 1 in a.csv" in problems[0].message
    assert "two smiles values" in problems[1].message


def test_split_is_by_patient_id_stable_and_about_a_fifth() -> None:
    ids = [f"patient-{i}" for i in range(5000)]
    held = [pid for pid in ids if is_held_out(pid)]
    assert 0.18 < len(held) / len(ids) < 0.22
    assert held == [pid for pid in ids if is_held_out(pid)]  # the same every time
    samples = [PatientSample(pid, {}, {}) for pid in ids[:100]]
    train, held_out = split_by_patient(samples)
    assert {s.patient_id for s in train} | {s.patient_id for s in held_out} == set(ids[:100])
    assert not {s.patient_id for s in train} & {s.patient_id for s in held_out}


def _sample(pid: str, glucose: float, omics: list[float] | None = None) -> PatientSample:
    return PatientSample(
        pid,
        {"glucose": glucose},
        {"diagnoses": frozenset({"E11"})},
        omics=None if omics is None else np.array(omics, dtype=np.float32),
        targets={"readmitted_30d": 1.0},
    )


def test_fingerprint_ignores_order_and_sees_every_bit() -> None:
    a = [_sample("p1", 5.0), _sample("p2", 6.0)]
    assert fingerprint(a, CONTRACT) == fingerprint(a[::-1], CONTRACT)
    nudged = [_sample("p1", float(np.nextafter(5.0, 6.0))), _sample("p2", 6.0)]
    assert fingerprint(nudged, CONTRACT) != fingerprint(a, CONTRACT)
    renamed = [_sample("p1", 5.0), _sample("p3", 6.0)]
    assert fingerprint(renamed, CONTRACT) != fingerprint(a, CONTRACT)
    assert fingerprint(a[:1], CONTRACT) != fingerprint(a, CONTRACT)


def test_manifest_holds_counts_not_values() -> None:
    samples = [_sample("p1", 5.25), _sample("p2", 6.5), PatientSample("p3", {}, {}, smiles="CCO")]
    manifest = build_manifest(samples, CONTRACT, ("labs",))
    document = manifest.to_json()
    assert document["patients"] == 3
    assert document["coverage"] == {"clinical": 2}
    assert document["labelled"] == {"readmitted_30d": 2}
    assert document["contract_sha256"] == CONTRACT.sha256()
    text = str(document)
    for raw in ("5.25", "6.5", "p1", "CCO", "E11"):
        assert raw not in text


def test_a_small_site_gets_its_minimum_held_out_in_hash_order() -> None:
    import hashlib

    ids = [f"p{i}" for i in range(6)]
    samples = [PatientSample(pid, {}, {}) for pid in ids]

    def rank(pid: str) -> int:
        return int.from_bytes(hashlib.sha256(pid.encode()).digest()[:4], "big") % 1000

    by_hash = sorted(ids, key=rank)
    train, held_out = split_by_patient(samples, per_mille=0, minimum=2)
    assert {s.patient_id for s in held_out} == set(by_hash[:2])
    assert len(train) == 4
    # never more than half the patients, whatever the minimum
    _, held_out = split_by_patient(samples, per_mille=0, minimum=50)
    assert len(held_out) == 3
    # a fraction already above the minimum is left as it is
    _, held_out = split_by_patient(samples, per_mille=1000, minimum=2)
    assert len(held_out) == 6


def test_the_contracts_holdout_keys_leave_old_digests_alone() -> None:
    from medfed.model.contract import DEMO_CONTRACT

    # DEMO_CONTRACT's digest before task units and hold-out keys existed (main, 2026-12-04)
    assert DEMO_CONTRACT.sha256() == (
        "0e186d850ba5f1672100c5edb90d924c0712adb4b907e5506480937d0e37105f"
    )
    changed = DEMO_CONTRACT.model_copy(update={"holdout_fraction": 0.3})
    assert changed.sha256() != DEMO_CONTRACT.sha256()
