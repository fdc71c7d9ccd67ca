"""Empirical audits of what else leaves a site besides the weights (`bench/dp_audit.py`).

- **Differencing attack on metrics.** The attacker asks for the training loss of one
  model over the site's patients, on two neighbouring datasets (with and without one
  patient whose loss sits at the clip), and guesses which one it got. Each trial is one
  membership guess; the correct count gives an empirical epsilon lower bound by the
  same binomial test as the canary audit. Baseline in the same run: the exact mean loss
  (what main sent), which the attacker separates every time.
- **Fingerprint confirmation.** The attacker knows every row but one value and tries
  candidate values: it hashes each candidate dataset and compares with the digest the
  site sent. Baseline: the data's own SHA-256 fingerprint (main), confirmed; medfed
  now sends a site-secret HMAC of it, which no candidate reproduces.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from medfed.model.contract import DEMO_CONTRACT
from medfed.model.sample import PatientSample
from medfed.privacy import release
from medfed.privacy.accountant import epsilon_of
from medfed.privacy.population import keyed_digest, patient_key_secret
from medfed.privacy.release import PatientStats
from medfed.privacy.signing import SigningKey
from medfed.sites.config import DatasetConfig
from medfed.sites.manifest import fingerprint, load_site_data
from medfed.sites.synthetic import write_synthetic_consortium

DELTA = 1e-5
EpsilonBound = Callable[[int, int], float]
"""(guesses, correct) -> the largest epsilon refuted (`dp_audit.epsilon_lower_bound`)."""


def refutable_ceiling(guesses: int, bound: EpsilonBound) -> float:
    """The largest epsilon an audit of `guesses` guesses can refute at all (all correct)."""
    return bound(guesses, guesses)


def guesses_to_refute(epsilon: float, *, confidence: float = 0.95) -> int:
    """The fewest guesses that, all correct, refute `epsilon` at `confidence`:
    P[all r right] = p^r <= 1 - confidence with p = e^eps / (1 + e^eps)."""
    p = 1.0 / (1.0 + math.exp(-epsilon))
    return math.ceil(math.log(1.0 - confidence) / math.log(p))


def differencing_attack(
    *, trials: int, noise_multiplier: float | None, seed: int, bound: EpsilonBound
) -> dict[str, object]:
    """The loss with and without one patient, released `trials` times; `noise_multiplier`
    None is the exact loss (main's reply)."""
    rng = np.random.default_rng(seed)
    others = rng.exponential(0.6, 150)
    empty = PatientStats(loss=np.zeros(0))
    worlds = [
        release.statistics_rows(PatientStats(loss=np.append(others, release.LOSS_CLIP)), empty),
        release.statistics_rows(PatientStats(loss=others), empty),
    ]
    sums = [rows.sum(axis=0)[release.TRAIN_LOSS] for rows in worlds]
    threshold = (sums[0] + sums[1]) / 2
    correct = 0
    for trial in range(trials):
        present = trial % 2 == 0
        rows = worlds[0 if present else 1]
        if noise_multiplier is None:
            value = rows.sum(axis=0)[release.TRAIN_LOSS]
        else:
            value = release.release(rows, noise_multiplier=noise_multiplier)[release.TRAIN_LOSS]
        correct += int((value > threshold) == present)
    accounted = (
        math.inf
        if noise_multiplier is None
        else epsilon_of([release.release_event(noise_multiplier)], delta=DELTA)
    )
    return {
        "released": "exact mean loss (main)" if noise_multiplier is None else "Gaussian release",
        "noise_multiplier": noise_multiplier,
        "accounted_epsilon_per_release": None if math.isinf(accounted) else round(accounted, 4),
        "trials": trials,
        "correct": correct,
        "accuracy": round(correct / trials, 4),
        "empirical_epsilon_lower_bound": bound(trials, correct),
        "max_refutable_epsilon": refutable_ceiling(trials, bound),
    }


def fingerprint_confirmation(*, seed: int, candidates: int = 50) -> dict[str, object]:
    """Confirm one patient's value by hashing candidate datasets against what was sent."""
    with tempfile.TemporaryDirectory(prefix="dp_audit-fp-") as root:
        site = write_synthetic_consortium(Path(root), DEMO_CONTRACT, n_sites=1, seed=seed)[0]
        samples = list(_site_samples(site.table))
    feature = DEMO_CONTRACT.numeric[0].name
    target = next(i for i, s in enumerate(samples) if feature in s.numeric)
    true_value = samples[target].numeric[feature]
    secret = patient_key_secret(SigningKey.generate())
    true_fingerprint = fingerprint(samples, DEMO_CONTRACT)
    sent = {"main: data fingerprint": true_fingerprint, "now: site-secret HMAC": ""}
    sent["now: site-secret HMAC"] = keyed_digest(secret, true_fingerprint)
    values = [true_value + 0.01 * k for k in range(-candidates // 2, candidates // 2 + 1)]
    found: dict[str, float | None] = {}
    for label, digest in sent.items():
        found[label] = next(
            (v for v in values if _candidate_digest(samples, target, feature, v) == digest),
            None,
        )
    return {
        "candidates": len(values),
        "confirmed": {label: value is not None for label, value in found.items()},
        "confirmed_true_value": {
            label: value is not None and value == true_value for label, value in found.items()
        },
    }


def _candidate_digest(samples: list[PatientSample], target: int, feature: str, value: float) -> str:
    numeric: Mapping[str, float] = {**samples[target].numeric, feature: value}
    changed = replace(samples[target], numeric=numeric)
    return fingerprint([*samples[:target], changed, *samples[target + 1 :]], DEMO_CONTRACT)


@dataclass(frozen=True)
class _TableSource:
    """The legacy layout a synthetic site is: `data_dir/patients.csv`, no `[[datasets]]`."""

    data_dir: Path
    datasets: tuple[DatasetConfig, ...] = ()

    @property
    def source(self) -> Path:
        return self.data_dir / "site.toml"


def _site_samples(table: Path) -> tuple[PatientSample, ...]:
    return load_site_data(_TableSource(table.parent), DEMO_CONTRACT).samples
