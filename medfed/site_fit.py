"""Whether a site's data can serve a study: feature coverage, size under the budget, k.

`medfed site check` reports these beside the data problems. A contract feature that too
few of the site's patients have is a problem (the site would train on a column of
blanks), a site too small for the study's epsilon is warned with the noise multiplier
it would train with, and the policy's `min_cohort_k` is set against the site's counts
(below it, the site's metrics never leave it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medfed.model.contract import StudyContract
from medfed.model.sample import PatientSample
from medfed.sites.errors import DataProblem

if TYPE_CHECKING:
    from medfed.privacy.policy import PrivacyPolicy

MIN_COVERAGE = 0.5
"""A numeric feature held by fewer than this share of a site's patients is a problem."""
NOISE_WARNING = 2.0
"""Above this noise multiplier a site's updates are mostly noise."""
BATCH_WARNING = 8.0
"""Below this expected batch (patients per DP-SGD step) each step's noise swamps it."""


@dataclass(frozen=True)
class FeatureCoverage:
    """How many of a site's patients hold one contract feature or label."""

    name: str
    kind: str  # "numeric", "categorical" or "label"
    covered: int
    patients: int
    optional: bool = False

    @property
    def fraction(self) -> float:
        return self.covered / self.patients if self.patients else 0.0

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "kind": self.kind, "covered": self.covered,
                "patients": self.patients, "fraction": round(self.fraction, 4),
                "optional": self.optional}  # fmt: skip


def feature_coverage(
    samples: Sequence[PatientSample], contract: StudyContract
) -> list[FeatureCoverage]:
    """Coverage of every numeric and categorical feature and every label field."""
    n = len(samples)
    found = [
        FeatureCoverage(f.name, "numeric", sum(f.name in s.numeric for s in samples), n, f.optional)
        for f in contract.numeric
    ]
    found += [
        FeatureCoverage(
            f.name, "categorical", sum(bool(s.codes.get(f.name)) for s in samples), n, f.optional
        )
        for f in contract.categorical
    ]
    labels = dict.fromkeys(name for task in contract.tasks for name in task.label_fields)
    found += [
        FeatureCoverage(name, "label", sum(name in s.targets for s in samples), n)
        for name in labels
    ]
    return found


def coverage_problems(
    coverage: Sequence[FeatureCoverage], *, min_coverage: float, where: str
) -> list[DataProblem]:
    """Numeric features below `min_coverage`, categorical features no patient holds
    (features the contract marks `optional` excepted), and a study none of whose labels
    reaches `min_coverage`: each one problem at `where`."""
    problems: list[DataProblem] = []
    for item in coverage:
        if item.patients == 0 or item.optional:
            continue
        short = item.kind == "numeric" and item.fraction < min_coverage
        if short or (item.kind == "categorical" and item.covered == 0):
            problems.append(
                DataProblem(
                    where,
                    None,
                    item.name,
                    f"the study's {item.kind} feature {item.name} is held by {item.covered} of"
                    f" {item.patients} patients ({item.fraction:.0%}; at least"
                    f" {min_coverage:.0%} needed): map it in [[datasets]]",
                )
            )
    labels = [item for item in coverage if item.kind == "label" and item.patients]
    if labels and all(item.fraction < min_coverage for item in labels):
        shown = ", ".join(f"{i.name} {i.covered} of {i.patients}" for i in labels)
        problems.append(DataProblem(where, None, None, f"too few patients are labelled ({shown})"))
    return problems


@dataclass(frozen=True)
class StudyFit:
    """How a site of this size would train under the study's budget."""

    train_patients: int
    held_out_patients: int
    min_cohort_k: int
    target_epsilon: float
    noise_multiplier: float | None
    """What the site would train with (before any spending), None if no noise meets
    the budget."""
    expected_batch: float
    warnings: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "train_patients": self.train_patients,
            "held_out_patients": self.held_out_patients,
            "min_cohort_k": self.min_cohort_k,
            "target_epsilon": self.target_epsilon,
            "noise_multiplier": self.noise_multiplier,
            "expected_batch": round(self.expected_batch, 3),
            "warnings": list(self.warnings),
        }


def study_fit(
    *,
    train_patients: int,
    held_out_patients: int,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    min_cohort_k: int,
    min_noise_multiplier: float,
    accountant: str,
) -> StudyFit:
    """The noise multiplier this site would get for all the study's `steps` (as the
    site's privacy gate calibrates it, before any spending), and what is wrong with it."""
    from medfed.privacy.calibration import calibrate_noise, poisson_rate
    from medfed.privacy.errors import PrivacyError

    warnings: list[str] = []
    noise: float | None = None
    batch = 0.0
    if train_patients >= 1:
        rate = poisson_rate(train_patients, sample_rate)
        batch = rate * train_patients
        try:
            noise = max(
                min_noise_multiplier,
                calibrate_noise(
                    target_epsilon=target_epsilon, delta=delta, sample_rate=rate, steps=steps,
                    n_patients=train_patients, accountant=accountant,  # type: ignore[arg-type]
                ),
            )  # fmt: skip
        except PrivacyError as exc:
            warnings.append(f"this site cannot train under epsilon {target_epsilon:g}: {exc}")
    if noise is not None and (noise > NOISE_WARNING or batch < BATCH_WARNING):
        warnings.append(
            f"too small to train usefully under epsilon {target_epsilon:g}: {train_patients}"
            f" training patients would get noise multiplier {noise:.3g} on an expected batch"
            f" of {batch:.3g} patients (noise std {noise / max(batch, 1e-9):.3g} x the"
            " clipping norm per averaged step)"
        )
    if train_patients < min_cohort_k:
        warnings.append(
            f"min_cohort_k {min_cohort_k} > {train_patients} training patients: this site"
            " refuses to train and no training metric leaves it"
        )
    if held_out_patients < min_cohort_k:
        warnings.append(
            f"min_cohort_k {min_cohort_k} > {held_out_patients} held-out patients: this"
            " site's held-out metrics never leave it (set the contract's holdout_min or"
            " the policy's min_cohort_k)"
        )
    return StudyFit(
        train_patients, held_out_patients, min_cohort_k, target_epsilon, noise, batch,
        tuple(warnings),
    )  # fmt: skip


def study_fit_of(
    study_toml: Path, *, train_patients: int, held_out_patients: int, policy: PrivacyPolicy
) -> tuple[StudyFit | None, str | None]:
    """`study_fit` for the study in `study_toml` and the site's privacy `policy`;
    (None, why) when the study's settings cannot be read."""
    from medfed.coordinator.errors import CoordinatorError
    from medfed.coordinator.study import load_study_file

    try:
        study = load_study_file(study_toml)
    except CoordinatorError as exc:
        return None, f"cannot size the site against the study: {exc}"
    return study_fit(
        train_patients=train_patients,
        held_out_patients=held_out_patients,
        target_epsilon=study.target_epsilon,
        delta=study.delta,
        sample_rate=study.sample_rate,
        steps=study.num_rounds * study.local_steps,
        min_cohort_k=policy.min_cohort_k,
        min_noise_multiplier=policy.min_noise_multiplier,
        accountant=policy.accountant,
    ), None
