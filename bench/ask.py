"""`medfed bench ask`: are the consortium's answers the pooled ones, and how honest is DP?

On the lung example consortium (four hospitals, each reading its own format) it runs,
side by side in one process:

1. **equality without DP**: the federated Cox fit (sites' Efron terms summed, Newton at
   the coordinator), stratified by site and unstratified (risk sets across sites, from the
   sites' summed per-time aggregates), against lifelines `CoxPHFitter` on the pooled
   rows (with `strata=["site"]`, and without); Kaplan-Meier and the log-rank test
   against lifelines on a one-day grid;
2. **DP at each epsilon**: the example query (`examples/consortium/queries/lung-ecog.toml`)
   answered `--repeats` times the way the sites answer it (their code: cohort, clamping,
   sensitivity, noise calibrated by the accountant), and how often the hazard ratios'
   intervals cover the pooled estimate, how often the fit is estimable at all, and the
   share of grid points where the pooled KM curve lies inside the noisy band;
3. with `--daemons N`: the time a query takes end to end over N real site daemons (the
   synthetic demo hospitals; `examples/consortium/queries/readmission.toml`).

Prints figures; never passes or fails on them.
"""

from __future__ import annotations

import json
import math
import platform
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.analysis import cox, cox_grid, survival
from medfed.analysis.answers import NewtonState, one_shot_answer, piece_noise_var
from medfed.analysis.layout import step_layout
from medfed.analysis.newton import NewtonTerms, newton_fit
from medfed.analysis.query import (
    AskQuery,
    ContractNames,
    CoxAnalysis,
    KaplanMeierAnalysis,
    LogisticAnalysis,
    query_from,
)
from medfed.client.ask_answers import cohort, noised, scaled, step_parts, value_of
from medfed.model.contract import StudyContract
from medfed.model.query_names import query_names
from medfed.model.sample import PatientSample
from medfed.privacy.calibration import calibrate_noise

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "consortium"
LUNG_QUERY = EXAMPLES / "queries" / "lung-ecog.toml"
COVARIATES = ("age", "female", "ecog")


@dataclass(frozen=True)
class AskBenchOptions:
    epsilons: tuple[float, ...] = (1.0, 3.0, 10.0)
    repeats: int = 100
    daemons: int = 0
    seed: int = 0


def lung_sites(work: Path) -> tuple[StudyContract, dict[str, tuple[PatientSample, ...]]]:
    """Each lung example site's patients as its own code reads them."""
    from medfed.client.config import SITE_TOML, load_site_config
    from medfed.consortium import write_example_consortium
    from medfed.sites.manifest import load_site_data

    study, _ = write_example_consortium(work / "sites", "lung", site_keys_dir=work / "keys")
    sites = {}
    for path in sorted((work / "sites").glob(f"*/{SITE_TOML}")):
        config = load_site_config(path)
        sites[config.site.id] = load_site_data(config, study.contract).require_clean().samples
    return study.contract, sites


def _arrays(
    samples: Sequence[PatientSample], names: ContractNames
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Complete cases: raw covariates (clamped), scaled ones, time, event."""
    time_field, event_field = names.survival["survival"]
    rows = []
    for sample in samples:
        values = [value_of(sample, f) for f in (*COVARIATES, time_field, event_field)]
        if (
            all(v is not None and math.isfinite(v) for v in values)
            and sample.numeric.get("age", 0) >= 18
        ):
            rows.append([float(v) for v in values])  # type: ignore[arg-type]
    table = np.array(rows)
    raw = np.column_stack(
        [np.clip(table[:, j], *names.numeric[f]) for j, f in enumerate(COVARIATES)]
    )
    x = np.column_stack([scaled(table[:, j], names.numeric[f]) for j, f in enumerate(COVARIATES)])
    return raw, x, table[:, -2], table[:, -1] > 0.5


def _per_unit(beta: np.ndarray, names: ContractNames) -> np.ndarray:
    halves = np.array([(names.numeric[f][1] - names.numeric[f][0]) / 2 for f in COVARIATES])
    result: np.ndarray = beta / halves
    return result


def _relative(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.max(np.abs(ours - theirs) / np.maximum(np.abs(theirs), 1e-12)))


def equality(
    contract: StudyContract, sites: Mapping[str, Sequence[PatientSample]]
) -> dict[str, Any]:
    """Federated fits without DP beside lifelines on the pooled rows."""
    import pandas as pd
    from lifelines import CoxPHFitter, KaplanMeierFitter
    from lifelines.statistics import logrank_test

    names = query_names(contract)
    data = {site: _arrays(samples, names) for site, samples in sites.items()}
    p = len(COVARIATES)

    def stratified(beta: np.ndarray) -> NewtonTerms:
        terms = [cox.cox_site_terms(x, t, e, beta) for _, x, t, e in data.values()]
        return sum(terms[1:], terms[0])

    grid = np.arange(0, max(float(t.max()) for _, _, t, _ in data.values()) + 1)

    def pooled_risk_sets(beta: np.ndarray) -> NewtonTerms:
        sums = sum(cox_grid.cox_grid_sums(x, t, e, beta, grid=grid) for _, x, t, e in data.values())
        return cox_grid.cox_terms_from_grid(np.asarray(sums), p=p, grid_size=grid.size, beta=beta)

    fit_s = newton_fit(stratified, p, max_iterations=50, tolerance=1e-13)
    fit_u = newton_fit(pooled_risk_sets, p, max_iterations=50, tolerance=1e-13)
    frame = pd.concat(
        [
            pd.DataFrame(
                {
                    **{f: raw[:, j] for j, f in enumerate(COVARIATES)},
                    "time": t,
                    "event": e.astype(int),
                    "site": site,
                }
            )
            for site, (raw, _, t, e) in data.items()
        ],
        ignore_index=True,
    )
    precise = {"precision": 1e-12, "r_precision": 1e-15}
    lifelines_s = CoxPHFitter().fit(frame, "time", "event", strata=["site"], fit_options=precise)
    lifelines_u = CoxPHFitter().fit(
        frame.drop(columns="site"), "time", "event", fit_options=precise
    )
    ref_s = lifelines_s.params_[list(COVARIATES)].to_numpy()
    ref_u = lifelines_u.params_[list(COVARIATES)].to_numpy()
    times, events = frame["time"].to_numpy(), frame["event"].to_numpy() > 0
    edges = np.arange(0, times.max() + 2)
    counts = survival.survival_rows(times, events, edges=edges).sum(axis=0)
    deaths, lost = survival.split_survival_sums(counts, n_groups=1, n_bins=edges.size - 1)
    (curve,) = survival.km_from_counts(deaths, lost, edges=edges, noise_var=0.0)
    km = KaplanMeierFitter().fit(times, events)
    reference = km.survival_function_at_times(edges[1:] - 1e-9).to_numpy()
    poor = frame["ecog"].to_numpy() >= 2
    groups = survival.survival_rows(times, events, poor, edges=edges, groups=[True, False]).sum(
        axis=0
    )
    d2, c2 = survival.split_survival_sums(groups, n_groups=2, n_bins=edges.size - 1)
    ours_lr = survival.logrank_from_counts(d2, c2)
    theirs_lr = logrank_test(times[poor], times[~poor], events[poor], events[~poor])
    return {
        "patients": len(frame),
        "sites": {site: len(raw) for site, (raw, *_) in data.items()},
        "cox_stratified": {
            "federated": _per_unit(fit_s.beta, names).tolist(),
            "lifelines": ref_s.tolist(),
            "max_relative_difference": _relative(_per_unit(fit_s.beta, names), ref_s),
            "std_error_max_relative_difference": _relative(
                _per_unit(fit_s.std_error, names),
                lifelines_s.standard_errors_[list(COVARIATES)].to_numpy(),
            ),
        },
        "cox_pooled_risk_sets": {
            "federated": _per_unit(fit_u.beta, names).tolist(),
            "lifelines": ref_u.tolist(),
            "max_relative_difference": _relative(_per_unit(fit_u.beta, names), ref_u),
        },
        "kaplan_meier_max_abs_difference": float(np.max(np.abs(curve.survival - reference))),
        "logrank": {"federated": ours_lr.statistic, "lifelines": float(theirs_lr.test_statistic)},
        "reference": {"stratified": ref_s.tolist(), "curve": reference.tolist()},
    }


def answer_in_process(
    query: AskQuery,
    sites: Mapping[str, Sequence[PatientSample]],
    names: ContractNames,
    *,
    rng: np.random.Generator,
    dp: bool = True,
) -> list[dict[str, Any]]:
    """The query answered as over the wire (the sites' code, the coordinator's sums and
    Newton steps), without Flower: for the benchmark's repeats."""
    patients = {site: cohort(samples, query) for site, samples in sites.items()}
    z = 0.0
    if dp:
        z = calibrate_noise(target_epsilon=query.epsilon, delta=query.delta, sample_rate=1.0,
                            steps=query.releases(), n_patients=100)  # fmt: skip
    newton = {i: NewtonState.start(a) for i, a in enumerate(query.analyses)
              if isinstance(a, CoxAnalysis | LogisticAnalysis)}  # fmt: skip
    answers: list[dict[str, Any]] = []
    for step in range(query.iterations):
        betas = {i: s.beta for i, s in newton.items() if not s.done(step)}
        vectors = [
            noised(step_parts(query, mine, names, step, betas), noise_multiplier=z, rng=rng)
            for mine in patients.values()
        ]
        total = np.sum(vectors, axis=0)
        for slot in step_layout(query, step):
            analysis = query.analyses[slot.index]
            noise = piece_noise_var(analysis, [z] * len(vectors))
            summed = total[slot.start : slot.stop]
            if slot.newton:
                newton[slot.index].update(summed, noise, sites=len(vectors))
            else:
                answers.append(
                    {"index": slot.index, **one_shot_answer(analysis, summed, noise, names)}
                )
    answers += [{"index": i, **state.answer(names)} for i, state in newton.items()]
    return sorted(answers, key=lambda a: int(str(a["index"])))


def _query_at(epsilon: float) -> AskQuery:
    from medfed.asks import load_query_file

    document = json.loads(load_query_file(LUNG_QUERY).canonical_json())
    return query_from({**document, "epsilon": epsilon}, where=str(LUNG_QUERY))


def dp_coverage(
    contract: StudyContract,
    sites: Mapping[str, Sequence[PatientSample]],
    reference: Mapping[str, Any],
    options: AskBenchOptions,
) -> list[dict[str, Any]]:
    """Per epsilon: interval coverage of the pooled estimates over repeated answers."""
    names = query_names(contract)
    pooled_hr = np.array(reference["stratified"])
    rows = []
    for epsilon in options.epsilons:
        query = _query_at(epsilon)
        km_index = next(
            i for i, a in enumerate(query.analyses) if isinstance(a, KaplanMeierAnalysis)
        )
        exact = answer_in_process(query, sites, names, rng=np.random.default_rng(0), dp=False)
        truth = exact[km_index]["curves"]
        rng = np.random.default_rng(options.seed)
        estimable = covered = inside = points = 0
        widths = []
        for _ in range(options.repeats):
            answers = answer_in_process(query, sites, names, rng=rng)
            fit = next(a for a in answers if a["kind"] == "cox")
            if fit["estimable"]:
                estimable += 1
                rows_ = fit["coefficients"]
                ok = [r["ci_low"] <= pooled_hr[j] <= r["ci_high"] for j, r in enumerate(rows_)]
                covered += int(all(ok))
                widths.append(float(np.mean([r["ci_high"] - r["ci_low"] for r in rows_])))
            for noisy, clean in zip(answers[km_index]["curves"], truth, strict=True):
                lower, upper = np.array(noisy["lower"]), np.array(noisy["upper"])
                s = np.array(clean["survival"])
                inside += int(np.sum((lower - 1e-12 <= s) & (s <= upper + 1e-12)))
                points += s.size
        rows.append({
            "epsilon": epsilon,
            "releases": query.releases(),
            "noise_multiplier": calibrate_noise(target_epsilon=epsilon, delta=query.delta,
                                                sample_rate=1.0, steps=query.releases(),
                                                n_patients=100),
            "cox_estimable_share": estimable / options.repeats,
            "cox_all_intervals_cover_pooled_share": (covered / estimable) if estimable else None,
            "cox_mean_interval_width_per_unit": float(np.mean(widths)) if widths else None,
            "km_points_inside_band_share": inside / points if points else None,
        })  # fmt: skip
    return rows


def daemons_timing(count: int, repeats: int = 3) -> dict[str, Any]:
    """Seconds per query over `count` real site daemons (synthetic demo hospitals)."""
    from medfed.asks import load_query_file
    from medfed.demo import DemoOptions, demo_federation

    base = json.loads(load_query_file(EXAMPLES / "queries" / "readmission.toml").canonical_json())
    seconds, walls = [], []
    with demo_federation(DemoOptions(sites=count), notify=lambda line: None) as federation:
        for index in range(repeats + 1):  # the first query warms the sites' data
            query = query_from({**base, "name": f"bench-{index}"}, where="bench")
            started = time.monotonic()
            record = federation.ask(query)
            if index and record["status"] == "completed":
                walls.append(time.monotonic() - started)
                seconds.append(float(record["seconds"]))  # type: ignore[arg-type]
    return {"daemons": count, "query_s": seconds, "submit_to_evidence_s": walls,
            "median_submit_to_evidence_s": float(np.median(walls)) if walls else None}  # fmt: skip


def run_ask_bench(options: AskBenchOptions) -> dict[str, Any]:
    """Every figure of the module's docstring, in one document."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="medfed-bench-ask-") as folder:
        contract, sites = lung_sites(Path(folder))
        equal = equality(contract, sites)
        coverage = dp_coverage(contract, sites, equal["reference"], options)
    document: dict[str, Any] = {
        "benchmark": "ask",
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "equality": {k: v for k, v in equal.items() if k != "reference"},
        "dp": coverage,
        "repeats": options.repeats,
    }
    if options.daemons:
        document["end_to_end"] = daemons_timing(options.daemons)
    document["wall_s"] = round(time.monotonic() - started, 1)
    return document
