"""`medfed site ...`: the site operator's commands (a Typer sub-app registered in `cli.py`).

`medfed site check SITE_TOML [--study STUDY_TOML] [--json]` validates site.toml, every
dataset against the study's contract, the accelerator and the credential files, and
prints per dataset the patients, coverage per modality, missingness per feature and
every problem with file, row and column. Exit 0 when all is well, 1 when anything is
wrong, 2 on usage errors.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from medfed.cli_common import fail, guard, stdout
from medfed.model.presets import Suggestion, suggest_preset
from medfed.site_fit import MIN_COVERAGE

if TYPE_CHECKING:
    from rich.console import Console

    from medfed.client import SiteConfig
    from medfed.model import StudyContract
    from medfed.site_fit import FeatureCoverage, StudyFit
    from medfed.sites.errors import DataProblem
    from medfed.sites.manifest import SiteData

site_app = typer.Typer(
    help="The site operator's commands: check the site's configuration and data.",
    no_args_is_help=True,
)


@dataclass(frozen=True)
class SiteCheck:
    """What `medfed site check` found: the data, and the accelerator and credential checks."""

    site_toml: Path
    site_id: str
    contract: StudyContract
    data: SiteData
    accelerator: str
    accelerator_problem: str | None
    credentials: dict[str, bool]
    bundles: dict[str, object] = field(default_factory=dict)
    """Which app bundles the site runs (`bundle_check_of`)."""
    bundles_problem: str | None = None
    identity_problem: str | None = None
    """Why secure rounds would be refused here (`client.site_secagg.identity_problem`)."""
    throughput: dict[str, object] | None = None
    """With `--preset`: DP-SGD patients/s of that model as this site trains (`throughput_of`)."""
    fit: StudyFitReport | None = None
    """Feature coverage and the site's size against the study (`site_fit`)."""

    @property
    def problems(self) -> list[DataProblem]:
        from medfed.client.site_secagg import NOT_SET
        from medfed.sites.errors import DataProblem

        found = list(self.data.problems)
        if self.fit is not None:
            found.extend(self.fit.problems)
        if self.bundles_problem is not None:
            found.append(
                DataProblem(str(self.site_toml), None, None, f"app bundles: {self.bundles_problem}")
            )
        if self.identity_problem is not None and not self.identity_problem.startswith(NOT_SET):
            found.append(
                DataProblem(
                    str(self.site_toml), None, None, f"secure aggregation: {self.identity_problem}"
                )
            )
        if self.accelerator_problem is not None:
            found.append(
                DataProblem(str(self.site_toml), None, "accelerator", self.accelerator_problem)
            )
        for path, exists in self.credentials.items():
            if not exists:
                found.append(
                    DataProblem(path, None, None, "credential file named in site.toml is missing")
                )
        return found

    def to_json(self) -> dict[str, object]:
        from medfed.sites.manifest import problem_json

        return {
            "site_toml": str(self.site_toml),
            "site_id": self.site_id,
            "ok": not self.problems,
            "contract": self.contract.name,
            "contract_sha256": self.contract.sha256(),
            "manifest": self.data.manifest.to_json(),
            "train_patients": len(self.data.train),
            "held_out_patients": len(self.data.held_out),
            "datasets": [summary.to_json() for summary in self.data.datasets],
            "accelerator": {
                "name": self.accelerator,
                "available": self.accelerator_problem is None,
                "problem": self.accelerator_problem,
            },
            "credentials": [{"path": p, "exists": e} for p, e in self.credentials.items()],
            "throughput": self.throughput,
            "bundles": {**self.bundles, "problem": self.bundles_problem},
            "secure_aggregation": {
                "ready": self.identity_problem is None,
                "problem": self.identity_problem,
            },
            "suggestion": self.suggestion.__dict__,
            "problems": [problem_json(problem) for problem in self.problems],
            **({} if self.fit is None else self.fit.to_json()),
        }

    @property
    def suggestion(self) -> Suggestion:
        """The model preset, local steps and sample rate that suit this cohort."""
        sequences = self.contract.molecule is not None or self.contract.protein is not None
        return suggest_preset(patients=len(self.data.train), sequences=sequences)


@dataclass(frozen=True)
class StudyFitReport:
    """What `site check` says of the data against the study beyond its problems."""

    min_coverage: float
    coverage: tuple[FeatureCoverage, ...]
    problems: tuple[DataProblem, ...]
    fit: StudyFit | None
    fit_problem: str | None

    @property
    def warnings(self) -> list[str]:
        found = [] if self.fit is None else list(self.fit.warnings)
        return found + ([] if self.fit_problem is None else [self.fit_problem])

    def to_json(self) -> dict[str, object]:
        return {
            "min_coverage": self.min_coverage,
            "feature_coverage": [item.to_json() for item in self.coverage],
            "study_fit": None if self.fit is None else self.fit.to_json(),
            "warnings": self.warnings,
        }


def study_fit_report(
    config: SiteConfig,
    contract: StudyContract,
    data: SiteData,
    study_toml: Path | None,
    *,
    min_coverage: float,
) -> StudyFitReport:
    """Feature coverage (problems below `min_coverage`) and, with a study.toml, how the
    site's size fits the study's epsilon and the policy's `min_cohort_k`."""
    from medfed.site_fit import coverage_problems, feature_coverage, study_fit_of

    coverage = tuple(feature_coverage(data.samples, contract))
    problems = coverage_problems(coverage, min_coverage=min_coverage, where=str(config.source))
    fit, fit_problem = (None, None)
    if study_toml is not None:
        fit, fit_problem = study_fit_of(
            study_toml,
            train_patients=len(data.train),
            held_out_patients=len(data.held_out),
            policy=config.privacy,
        )
    return StudyFitReport(min_coverage, coverage, tuple(problems), fit, fit_problem)


def load_study_contract(path: Path | None) -> StudyContract:
    """The contract in study.toml's `[contract]` table; the whole file is validated as
    strictly as `round start` does (unknown keys, wrong types, an empty file)."""
    from medfed.coordinator.study import load_study_contract as load
    from medfed.coordinator.study import load_study_file

    if path is not None:
        load_study_file(path)
    return load(path)


def accelerator_problem(accelerator: str) -> str | None:
    """Why `accelerator` cannot be used here, or None: never a silent fall back to CPU.
    Asks `model.devices`, the registry training uses (not for cpu: torch loads slowly)."""
    if accelerator == "cpu":
        return None
    from medfed.model.devices import BACKENDS

    backend = BACKENDS.get(accelerator)  # type: ignore[call-overload]
    if backend is None:
        return f"accelerator {accelerator!r} is not one medfed knows"
    reason = backend.unavailable_reason()
    return None if reason is None else f"accelerator {accelerator!r} is not available: {reason}"


def credential_paths(config: SiteConfig) -> list[Path]:
    """The credential files site.toml names: the site's signing key, the officer's public
    key and, when site.toml has a `[coordinator]` section, its CA and SuperNode key."""
    paths = [config.signing_key_path, config.officer_public_key_path]
    coordinator = getattr(config, "coordinator", None)
    for name in ("root_certificates", "auth_private_key"):
        path = getattr(coordinator, name, None)
        if isinstance(path, Path):
            paths.append(config.resolve(path))
    return paths


def bundle_check_of(config: SiteConfig) -> tuple[dict[str, object], str | None]:
    """Which app bundles the site runs, and why `site start` would refuse it (or None):
    the trusted-entities file must parse; without one, only `allow_unsigned_bundles`
    (reported, weaker) lets the site start. A site without `[coordinator]` runs no
    bundles from a coordinator: nothing to check."""
    from medfed.client.bundle_check import bundle_gate_of
    from medfed.client.errors import ClientError

    path = config.trusted_entities_path
    settings: dict[str, object] = {
        "trusted_entities": None if path is None else str(path),
        "trusted_ids": [],
        "unsigned_allowed": path is None and config.allows_unsigned_bundles,
        "approved_apps": list(config.coordinator.approved_apps if config.coordinator else ()),
    }
    if config.coordinator is None:
        return settings, None
    try:
        gate = bundle_gate_of(config)
    except ClientError as exc:
        return settings, str(exc)
    if gate is not None:
        settings["trusted_ids"] = list(gate.trusted_ids)
    return settings, None


def throughput_of(
    config: SiteConfig, contract: StudyContract, preset: str, accelerator_problem: str | None
) -> dict[str, object]:
    """The scheduler's figure for `preset`: measured (or cached) as the site trains, on its
    accelerator, precision and grad-sample mode; not measured if the accelerator is not."""
    from medfed.client.throughput import ThroughputCache, TrainingSetup

    setup = TrainingSetup.of(config)
    figure: dict[str, object] = {"preset": preset, "setup": setup.key(), "samples_per_s": None}
    if accelerator_problem is None:
        samples = ThroughputCache(config.state_dir).get(preset, contract, setup)  # type: ignore[arg-type]
        figure["samples_per_s"] = round(samples, 3)
    return figure


def run_site_check(
    site_toml: Path,
    study_toml: Path | None,
    *,
    min_coverage: float | None = None,
    preset: str | None = None,
) -> SiteCheck:
    """Everything `medfed site check` reports; config errors raise (one line, exit 1)."""
    from medfed.client.config import load_site_config
    from medfed.sites.manifest import load_site_data

    config: SiteConfig = load_site_config(site_toml)
    contract = load_study_contract(study_toml)
    data = load_site_data(config, contract)
    credentials = {str(path): path.is_file() for path in credential_paths(config)}
    bundles, bundles_problem = bundle_check_of(config)
    from medfed.client.site_secagg import identity_problem

    problem = accelerator_problem(config.accelerator)
    return SiteCheck(
        site_toml=site_toml,
        site_id=config.site.id,
        contract=contract,
        data=data,
        accelerator=config.accelerator,
        accelerator_problem=problem,
        credentials=credentials,
        bundles=bundles,
        bundles_problem=bundles_problem,
        identity_problem=identity_problem(config),
        throughput=None if preset is None else throughput_of(config, contract, preset, problem),
        fit=study_fit_report(
            config,
            contract,
            data,
            study_toml,
            min_coverage=MIN_COVERAGE if min_coverage is None else min_coverage,
        ),
    )


def site_check(
    site_toml: Annotated[Path, typer.Argument(help="The site's site.toml.", dir_okay=False)],
    study: Annotated[
        Path | None,
        typer.Option("--study", help="The study.toml whose \\[contract] the data must meet."),
    ] = None,
    min_coverage: Annotated[
        float,
        typer.Option(
            "--min-coverage",
            min=0.0,
            max=1.0,
            help="The share of patients that must hold each numeric feature of the study.",
        ),
    ] = 0.5,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
    preset: Annotated[
        str | None,
        typer.Option(help="Also measure DP-SGD throughput of this model preset (seconds)."),
    ] = None,
) -> None:
    """Check site.toml, every dataset against the study's contract, the accelerator and
    the credentials; print patients, coverage, missingness and every problem (exit 1)."""
    from medfed.model.presets import PRESET_NAMES

    if preset is not None and preset not in PRESET_NAMES:
        fail(f"unknown preset {preset!r}; choose from {', '.join(sorted(PRESET_NAMES))}", 2)
    check = guard(
        lambda: run_site_check(site_toml, study, min_coverage=min_coverage, preset=preset)
    )
    problems = check.problems
    if as_json:
        sys.stdout.write(json.dumps(check.to_json()) + "\n")
    else:
        _print_check(check, stdout)
    if problems:
        raise typer.Exit(1)


def add_check_command(app: typer.Typer) -> None:
    """Register `check` on a `site` sub-app (this module's, or another module's)."""
    app.command("check")(site_check)


add_check_command(site_app)


def _print_check(check: SiteCheck, console: object) -> None:
    from rich.console import Console

    assert isinstance(console, Console)
    modalities = check.contract.modalities
    table = Table(title=f"site {check.site_id}: data against contract {check.contract.name}")
    for column in ("dataset", "format", "patients", *modalities, "problems"):
        table.add_column(column)
    for summary in check.data.datasets:
        table.add_row(
            Text(summary.name),
            summary.format,
            str(summary.patients),
            *(str(summary.coverage.get(m, 0)) for m in modalities),
            str(len(summary.problems)),
        )
    console.print(table)
    for summary in check.data.datasets:
        missing = ", ".join(f"{name} {count}" for name, count in summary.missing.items() if count)
        if missing:
            console.print(Text(f"{summary.name}: patients missing {missing}"), soft_wrap=True)
    manifest = check.data.manifest
    console.print(
        Text(
            f"{manifest.patients} patients ({len(check.data.train)} train,"
            f" {len(check.data.held_out)} held out); fingerprint {manifest.fingerprint[:16]};"
            f" accelerator {check.accelerator}"
            + ("" if check.accelerator_problem is None else " NOT available")
        ),
        soft_wrap=True,
    )
    if check.bundles.get("unsigned_allowed"):
        console.print(Text("WARNING: this site runs UNSIGNED app bundles"
                           " (allow_unsigned_bundles = true)", style="bold red"))  # fmt: skip
    elif check.bundles.get("trusted_ids"):
        console.print(Text("app bundles signed by: " + ", ".join(check.bundles["trusted_ids"])))  # type: ignore[arg-type]
    for digest in check.bundles.get("approved_apps") or []:  # type: ignore[attr-defined]
        console.print(Text(f"WARNING: this site runs the app bundle {digest}, not medfed's"
                           " own code (approved_apps)", style="bold red"))  # fmt: skip
    from medfed.client.site_secagg import NOT_SET

    if check.identity_problem is not None and check.identity_problem.startswith(NOT_SET):
        console.print(
            Text(f"WARNING: secure aggregation: {check.identity_problem}", style="bold red")
        )
    hint = check.suggestion
    console.print(
        Text(
            f"suggested for this cohort: preset {hint.preset}, local-steps {hint.local_steps},"
            f" sample-rate {hint.sample_rate:g} ({hint.reason})"
        ),
        soft_wrap=True,
    )
    if check.fit is not None:
        _print_fit(check.fit, console)
    if check.throughput is not None:
        figure = check.throughput
        measured = figure["samples_per_s"]
        console.print(Text(
            f"DP-SGD throughput of preset {figure['preset']} ({figure['setup']}): "
            + ("not measured" if measured is None else f"{measured} patients/s")
        ))  # fmt: skip
    problems = check.problems
    for problem in problems:
        console.print(Text(f"problem: {problem}"), soft_wrap=True)
    console.print(Text("all checks passed" if not problems else f"{len(problems)} problems"))


def _print_fit(report: StudyFitReport, console: Console) -> None:
    """Coverage per feature, the noise this site would train with, and its warnings."""
    shown = ", ".join(
        f"{item.name} {item.fraction:.0%}" for item in report.coverage if item.kind != "label"
    )
    labels = ", ".join(
        f"{item.name} {item.covered}" for item in report.coverage if item.kind == "label"
    )
    if shown:
        console.print(Text(f"feature coverage: {shown}"), soft_wrap=True)
    if labels:
        console.print(Text(f"labelled patients: {labels}"), soft_wrap=True)
    fit = report.fit
    if fit is not None and fit.noise_multiplier is not None:
        console.print(
            Text(
                f"under the study's epsilon {fit.target_epsilon:g}: noise multiplier"
                f" {fit.noise_multiplier:.3g}, expected batch {fit.expected_batch:.3g};"
                f" min_cohort_k {fit.min_cohort_k} against {fit.train_patients} training /"
                f" {fit.held_out_patients} held-out patients"
            ),
            soft_wrap=True,
        )
    for warning in report.warnings:
        console.print(Text(f"WARNING: {warning}", style="bold yellow"), soft_wrap=True)
