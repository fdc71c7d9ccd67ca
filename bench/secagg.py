"""Secure aggregation's cost as the real message protocol, beside a plain round's.

For each (sites, parameters) it plays one round of `privacy.secagg_protocol` in-process:
a throwaway consortium CA issues every site an identity certificate, the coordinator signs
the round's announcement, each site is a real `SiteRound`, every message goes through its
JSON text (what crosses the wire) and the coordinator unmasks with `unmask_weighted_sum`.
Each site's work in each step (keys, train, reveal: the secure part only, not the
local training) and the coordinator's work between steps are timed apart. Beside it, the
plain path: each site packs its trained model as Flower's float32 bytes and signs its
receipt, the coordinator unpacks, checks and averages as FedAvg does
(`coordinator.strategies.modality_average`).

Sites run in parallel in a deployment, so a round's cost is the critical path: per step
the slowest site plus the coordinator. The serial total is every site's and the
coordinator's work added up (what one core pays when all sites share it). Prints figures;
never passes or fails on them. The real rounds (`bench.secagg_demo`) add what the
protocol rows cannot show: more message round trips per round.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from medfed.coordinator.strategies import Contribution, modality_average, parameter_groups
from medfed.model import wire
from medfed.model.network import arrays_sha256
from medfed.privacy.identity import identity_check, issue_identity_certificate
from medfed.privacy.pki import create_ca
from medfed.privacy.receipts import UpdateReceipt
from medfed.privacy.secagg_protocol import (
    MODULUS,
    Advertisement,
    Announcement,
    SealedShare,
    SignedAnnouncement,
    SiteRound,
    dumps,
    loads,
    masked_sha256,
    reveal_from_json,
    reveal_to_json,
    unmask_weighted_sum,
    weighted_delta,
)
from medfed.privacy.signing import SigningKey

CLIP = 1.0
"""The study's default `secagg-clip`; the updates here stay well inside it."""
STEPS = ("keys", "train", "reveal")
RUN_ID = "bench-secagg"
STUDY_SHA256 = "0" * 64
Arrays = dict[str, np.ndarray]


class ProtocolBenchError(RuntimeError):
    """A message of the benchmark's round did not check out: the protocol is broken."""


@dataclass(frozen=True)
class Options:
    """What to measure: every (sites, parameters) pair, `repeats` rounds each."""

    sites: Sequence[int]
    params: Sequence[int]
    repeats: int = 1
    seed: int = 0


@dataclass(frozen=True)
class Consortium:
    """Throwaway identities: the CA, each site's signing key and certificate, the
    coordinator's announcement key."""

    ca_pem: bytes
    signers: Mapping[str, SigningKey]
    certificates: Mapping[str, str]
    coordinator: SigningKey


def make_consortium(site_ids: Sequence[str]) -> Consortium:
    """A consortium CA that issues every site in `site_ids` an identity certificate."""
    from cryptography.hazmat.primitives import serialization

    ca_key, ca_cert = create_ca("medfed bench consortium CA", valid_days=1)
    signers = {site: SigningKey.generate() for site in site_ids}
    certificates = {
        site: issue_identity_certificate(ca_key, ca_cert, site, key.public, valid_days=1).decode()
        for site, key in signers.items()
    }
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    return Consortium(ca_pem, signers, certificates, SigningKey.generate())


@dataclass(frozen=True)
class Workload:
    """The global model every site received, each site's trained model and patients."""

    global_arrays: Arrays
    trained: Mapping[str, Arrays]
    patients: Mapping[str, int]

    @property
    def weight_cap(self) -> int:
        return max(self.patients.values())


def make_workload(n_sites: int, n_params: int, *, seed: int) -> Workload:
    """A model of two float32 arrays with `n_params` values in all; each site moves it by
    up to 0.1 per value and has 50 to 500 patients."""
    rng = np.random.default_rng(seed)
    sizes = {"encoder.weight": n_params - n_params // 4, "head.weight": n_params // 4}
    global_arrays = {
        name: rng.normal(0, 0.1, size).astype(np.float32) for name, size in sizes.items() if size
    }
    trained = {
        f"site-{i:02d}": {
            name: (value + rng.uniform(-0.1, 0.1, value.size)).astype(np.float32)
            for name, value in global_arrays.items()
        }
        for i in range(n_sites)
    }
    patients = {site: int(rng.integers(50, 501)) for site in trained}
    return Workload(global_arrays, trained, patients)


def reference_weighted_sum(workload: Workload) -> np.ndarray:
    """The plain float64 sum of (patients / cap) * (trained - global), in sorted-name order."""
    cap = workload.weight_cap
    names = sorted(workload.global_arrays)
    total = np.zeros(sum(workload.global_arrays[n].size for n in names), dtype=np.float64)
    for site, arrays in workload.trained.items():
        delta = np.concatenate(
            [
                arrays[n].astype(np.float64).ravel()
                - workload.global_arrays[n].astype(np.float64).ravel()
                for n in names
            ]
        )
        total += delta * (min(workload.patients[site], cap) / cap)
    return total


@dataclass
class Clock:
    """Seconds per (step, site) and per coordinator step."""

    site_s: dict[str, dict[str, float]] = field(default_factory=dict)
    coordinator_s: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def site(self, step: str, site: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        self.site_s.setdefault(step, {})[site] = elapsed

    @contextmanager
    def coordinator(self, step: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        self.coordinator_s[step] = self.coordinator_s.get(step, 0.0) + elapsed

    def slowest_site_s(self) -> dict[str, float]:
        return {step: max(times.values(), default=0.0) for step, times in self.site_s.items()}

    def critical_path_s(self) -> float:
        return sum(self.slowest_site_s().values()) + sum(self.coordinator_s.values())

    def serial_s(self) -> float:
        sites = sum(sum(times.values()) for times in self.site_s.values())
        return sites + sum(self.coordinator_s.values())


@dataclass
class SecureRun:
    """One secure round: its clock, bytes each site uploaded, the sum and the average."""

    clock: Clock
    upload_bytes: dict[str, dict[str, int]]
    weighted_sum: np.ndarray
    averaged: Arrays
    threshold: int


def threshold_for(n_sites: int) -> int:
    """More than half the sites, and at least 2 (the coordinator's default rule)."""
    return max(2, n_sites // 2 + 1)


def _receipt(site: str, model_sha256: str, update_sha256: str) -> UpdateReceipt:
    return UpdateReceipt(
        run_id=RUN_ID, study_sha256=STUDY_SHA256, round=1, model_sha256=model_sha256,
        update_sha256=update_sha256, site_id=site,
    )  # fmt: skip


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ProtocolBenchError(what)


def secure_round(consortium: Consortium, workload: Workload) -> SecureRun:
    """Play one secure round through every message's JSON form, timing each side."""
    clock = Clock()
    names = sorted(workload.trained)
    cap = workload.weight_cap
    model_sha256 = arrays_sha256(workload.global_arrays)
    # Each site's CA check is fresh, so certificates are checked cold (a worker's first
    # round; later rounds hit its cache).
    identities = {site: identity_check(consortium.ca_pem) for site in names}
    with clock.coordinator("keys"):
        announcement = Announcement(
            run_id=RUN_ID, study_sha256=STUDY_SHA256, round=1, model_sha256=model_sha256,
            sites=tuple(names), threshold=threshold_for(len(names)), clip=CLIP, weight_cap=cap,
        )  # fmt: skip
        text = SignedAnnouncement.sign(announcement, consortium.coordinator).to_text()
    states, advert_text = _keys_step(clock, consortium, names, text)
    relay, adverts = _relay_adverts(clock, consortium, announcement, advert_text, text)
    shares_text: dict[str, str] = {}
    uploads: dict[str, Array] = {}
    signatures: dict[str, str] = {}
    for site in names:
        with clock.site("train", site):
            raw = loads(relay, "secagg")
            signed = SignedAnnouncement.from_text(str(raw["announcement"]))
            _check(signed.announcement == states[site].announcement, "announcement changed")
            peers = [Advertisement.from_json(item) for item in raw["adverts"]]
            states[site].check_peers(peers, identities[site])
            update = weighted_delta(
                workload.trained[site], workload.global_arrays,
                patients=workload.patients[site], weight_cap=cap,
            )  # fmt: skip
            sealed, vector = states[site].deal_and_mask(update)
            shares_text[site] = dumps([item.to_json() for item in sealed])
            receipt = _receipt(site, model_sha256, masked_sha256(vector))
            signatures[site] = receipt.sign(consortium.signers[site])
            uploads[site] = Array(vector)
    masked: dict[str, np.ndarray] = {}
    with clock.coordinator("train"):
        size = sum(value.size for value in workload.global_arrays.values())
        for site in names:
            vector = uploads[site].numpy()
            _check(vector.dtype == np.uint32 and vector.shape == (size,), f"{site}: bad masked")
            receipt = _receipt(site, model_sha256, masked_sha256(vector))
            _check(receipt.verify(consortium.signers[site].public, signatures[site]), "receipt")
            masked[site] = vector
    reveal_requests = _reveal_payloads(clock, names, shares_text)
    reveal_text: dict[str, str] = {}
    for site in names:
        with clock.site("reveal", site):
            raw = loads(reveal_requests[site], "secagg reveal")
            sealed = [SealedShare.from_json(item) for item in raw["shares"]]
            reveal = states[site].reveal(raw["survivors"], raw["dropped"], sealed)
            reveal_text[site] = dumps(reveal_to_json(reveal))
    with clock.coordinator("reveal"):
        reveals = [reveal_from_json(loads(reveal_text[site], "reveal")) for site in names]
        total = unmask_weighted_sum(announcement, adverts, masked, reveals)
        averaged = _apply(workload, total)
    upload_bytes = {
        site: {
            "masked_vector": len(uploads[site].data),
            "advertisement": len(advert_text[site].encode()),
            "sealed_shares": len(shares_text[site].encode()),
            "reveal": len(reveal_text[site].encode()),
        }
        for site in names
    }
    return SecureRun(clock, upload_bytes, total, averaged, announcement.threshold)


def _keys_step(
    clock: Clock, consortium: Consortium, names: Sequence[str], text: str
) -> tuple[dict[str, SiteRound], dict[str, str]]:
    """Each site checks the signed announcement and answers its signed advertisement."""
    states: dict[str, SiteRound] = {}
    advert_text: dict[str, str] = {}
    for site in names:
        with clock.site("keys", site):
            signed = SignedAnnouncement.from_text(text)
            signed.verify(consortium.coordinator.public)
            states[site] = SiteRound(
                signed, site, consortium.signers[site], consortium.certificates[site]
            )
            advert_text[site] = dumps(states[site].advertisement.to_json())
    return states, advert_text


def _relay_adverts(
    clock: Clock,
    consortium: Consortium,
    announcement: Announcement,
    advert_text: Mapping[str, str],
    text: str,
) -> tuple[str, dict[str, Advertisement]]:
    """The coordinator checks each advertisement against the site's registered key and
    relays them all with the announcement (the train message's secure part)."""
    digest = announcement.sha256()
    adverts: dict[str, Advertisement] = {}
    with clock.coordinator("keys"):
        for site, reply in advert_text.items():
            advert = Advertisement.from_json(loads(reply, "advertisement"))
            _check(advert.site_id == site and advert.announcement_sha256 == digest, "advert")
            _check(advert.verify(consortium.signers[site].public), f"{site}: advert signature")
            adverts[site] = advert
        relay = dumps(
            {"announcement": text, "adverts": [adverts[s].to_json() for s in sorted(adverts)]}
        )
    return relay, adverts


def _reveal_payloads(
    clock: Clock, names: Sequence[str], shares_text: Mapping[str, str]
) -> dict[str, str]:
    """The coordinator checks each site's sealed shares and routes them to their holders
    with the reveal request (every site survived)."""
    shares: dict[str, list[SealedShare]] = {}
    with clock.coordinator("reveal"):
        for site in names:
            sealed = [SealedShare.from_json(item) for item in loads(shares_text[site], "shares")]
            holders = sorted(item.holder for item in sealed)
            _check(holders == sorted(set(names) - {site}), f"{site}: shares")
            shares[site] = sealed
        return {
            site: dumps(
                {
                    "survivors": list(names),
                    "dropped": [],
                    "shares": [
                        item.to_json() for owner in names for item in shares[owner]
                        if item.holder == site
                    ],
                }
            )
            for site in names
        }  # fmt: skip


def _apply(workload: Workload, total: np.ndarray) -> Arrays:
    """global + sum / (sum of weights), per array, as the coordinator averages."""
    cap = workload.weight_cap
    weight = sum(min(p, cap) / cap for p in workload.patients.values())
    averaged: Arrays = {}
    offset = 0
    for name in sorted(workload.global_arrays):
        reference = workload.global_arrays[name]
        part = total[offset : offset + reference.size].reshape(reference.shape)
        offset += reference.size
        averaged[name] = (reference.astype(np.float64) + part / weight).astype(np.float32)
    return averaged


@dataclass
class PlainRun:
    clock: Clock
    upload_bytes: int
    averaged: Arrays


def plain_round(consortium: Consortium, workload: Workload) -> PlainRun:
    """The plain path: each site packs its trained model (Flower's float32 bytes) and signs
    its receipt; the coordinator unpacks, checks the receipt and averages with FedAvg."""
    clock = Clock()
    model_sha256 = arrays_sha256(workload.global_arrays)
    records: dict[str, ArrayRecord] = {}
    signatures: dict[str, str] = {}
    for site, arrays in workload.trained.items():
        with clock.site("train", site):
            signatures[site] = _receipt(site, model_sha256, arrays_sha256(arrays)).sign(
                consortium.signers[site]
            )
            records[site] = wire.arrays_to_record(arrays, packed=True)
    with clock.coordinator("train"):
        updates = []
        for site, record in records.items():
            arrays = wire.record_to_arrays(RecordDict({wire.ARRAYS: record}))
            receipt = _receipt(site, model_sha256, arrays_sha256(arrays))
            _check(receipt.verify(consortium.signers[site].public, signatures[site]), "receipt")
            updates.append(
                Contribution(site, arrays, workload.patients[site], parameter_groups(arrays))
            )
        averaged, _ = modality_average(workload.global_arrays, updates)
    first = next(iter(records.values()))
    return PlainRun(clock, sum(len(array.data) for array in first.values()), averaged)


def _median(values: Sequence[float]) -> float:
    return round(statistics.median(values), 5)


def _max_diff(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[n].astype(np.float64) - b[n].astype(np.float64)))) for n in a)


def measure(n_sites: int, n_params: int, *, repeats: int, seed: int) -> dict[str, object]:
    """One row: both paths `repeats` times on the same workload; medians and bytes."""
    workload = make_workload(n_sites, n_params, seed=seed)
    consortium = make_consortium(sorted(workload.trained))
    reference = reference_weighted_sum(workload)
    secure_runs: list[SecureRun] = []
    plain_runs: list[PlainRun] = []
    for repeat in range(repeats):  # alternate which path runs first
        if repeat % 2:
            secure_runs.append(secure_round(consortium, workload))
        plain_runs.append(plain_round(consortium, workload))
        if not repeat % 2:
            secure_runs.append(secure_round(consortium, workload))
    return _row(n_sites, n_params, workload, reference, secure_runs, plain_runs)


def _path_figures(clocks: Sequence[Clock]) -> dict[str, object]:
    steps = [step for step in STEPS if any(step in c.site_s for c in clocks)]
    return {
        "slowest_site_s": {s: _median([c.slowest_site_s()[s] for c in clocks]) for s in steps},
        "coordinator_s": {s: _median([c.coordinator_s.get(s, 0.0) for c in clocks]) for s in steps},
        "critical_path_s": _median([c.critical_path_s() for c in clocks]),
        "serial_s": _median([c.serial_s() for c in clocks]),
    }


def _row(
    n_sites: int,
    n_params: int,
    workload: Workload,
    reference: np.ndarray,
    secure_runs: Sequence[SecureRun],
    plain_runs: Sequence[PlainRun],
) -> dict[str, object]:
    secure = _path_figures([run.clock for run in secure_runs])
    plain = _path_figures([run.clock for run in plain_runs])
    parts = {
        key: max(run.upload_bytes[site][key] for run in secure_runs for site in run.upload_bytes)
        for key in ("masked_vector", "advertisement", "sealed_shares", "reveal")
    }
    secure_upload = sum(parts.values())
    float32_bytes = 4 * n_params
    plain_upload = plain_runs[0].upload_bytes
    scale = ((MODULUS // 2 - 1) // n_sites) / CLIP  # privacy.secagg's fixed-point rule
    secure_cp, plain_cp = float(secure["critical_path_s"]), float(plain["critical_path_s"])  # type: ignore[arg-type]
    return {
        "sites": n_sites,
        "params": n_params,
        "threshold": secure_runs[0].threshold,
        "secure": secure,
        "plain": plain,
        "added_critical_path_s": round(secure_cp - plain_cp, 5),
        "upload_bytes": {
            "float32_update": float32_bytes,
            "plain_packed": plain_upload,
            "secure_total": secure_upload,
            **{f"secure_{key}": value for key, value in parts.items()},
        },
        "upload_ratio_secure_to_float32": round(secure_upload / float32_bytes, 5),
        "upload_ratio_masked_vector_to_float32": round(parts["masked_vector"] / float32_bytes, 5),
        "upload_ratio_secure_to_plain": round(secure_upload / plain_upload, 5),
        "max_abs_error_weighted_sum": max(
            float(np.max(np.abs(run.weighted_sum - reference))) for run in secure_runs
        ),
        "error_bound_weighted_sum": n_sites * 0.5 / scale,
        "max_abs_diff_average_vs_fedavg": max(
            _max_diff(s.averaged, p.averaged) for s, p in zip(secure_runs, plain_runs, strict=True)
        ),
        "patients": dict(workload.patients),
    }


def run_benchmark(options: Options) -> dict[str, object]:
    """Every (sites, params) row, and the machine it ran on."""
    rows = [
        measure(n, p, repeats=options.repeats, seed=options.seed + n)
        for p in options.params
        for n in options.sites
    ]
    return {
        "benchmark": "secagg",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "loadavg_at_end": [round(load, 2) for load in os.getloadavg()],
        },
        "modulus": MODULUS,
        "clip": CLIP,
        "repeats": options.repeats,
        "rows": rows,
    }
