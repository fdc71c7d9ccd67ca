"""`medfed bench utility`: is the federated model worth having, on real data?

For each example study (`examples/consortium`), on its one fixed held-out split (each
site's own held-out patients, chosen by a hash of the patient id, pooled), side by side:

- pooled, non-private: a classical reference (lifelines `CoxPHFitter` for survival,
  scikit-learn logistic regression for binary, ridge for regression tasks) and medfed's
  own network trained centrally (Adam, no DP);
- each site alone, both models, and their mean (every model scored on the pooled
  held-out patients: what a site would get by not joining);
- federated without DP (`inf`): the study's strategy (`coordinator.strategies`, the
  code the coordinator aggregates with) over plain local SGD with the study's learning
  rate, local steps and sample rate, its batch gradient clipped to the study's
  max-grad-norm, for at least `PLAIN_ROUNDS` rounds, in this process (a run that
  diverges counts as `diverged`, its metric not a number);
  the sites' real code always adds DP noise (its policy has a minimum noise), so no real
  round can be noise-free;
- federated with DP at each epsilon: the real round loop (`coordinator.rounds.run_study`)
  over an in-memory grid (`medfed.bench.memory_grid`) to the real site handlers (DP-SGD with
  Opacus, the privacy gate and ledger, the egress guard, secure aggregation as the study
  asks), on copies of the example sites with fresh keys and approvals.

Every figure is a mean and standard deviation over seeds; the federated arms also give
the held-out metric after each round (learning curves). Held-out scoring is done here,
centrally, on data the benchmark holds; it is not the metric the sites release.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from medfed.client.trainer import trainable_groups
from medfed.coordinator.rounds import run_study, strategy_of
from medfed.coordinator.strategies import Contribution
from medfed.coordinator.study import StudySettings, load_study_file
from medfed.model.contract import StudyContract, TaskSpec
from medfed.model.metrics import auroc, concordance_index, rmse
from medfed.model.network import build_model, load_arrays, state_arrays
from medfed.model.tabular import modality_features
from medfed.model.tokenizers import encode, input_layout, split_tensors
from medfed.model.train import evaluate, train_steps
from medfed.sites.manifest import SiteData, load_site_data

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "consortium"
STUDIES = ("lung", "breast", "freesolv", "amp")
METRIC = {"survival": "c_index", "binary": "auroc", "regression": "rmse", "multiclass": "accuracy"}
COX_PENALIZER = 0.1
"""lifelines' L2 penalty on standardised features: a strong, stable Cox reference."""
RIDGE_ALPHA = 1.0
LOGISTIC_C = 1.0
CENTRAL_STEPS = 400
CENTRAL_BATCH = 64
CENTRAL_LR = 0.01
"""Adam's learning rate for the central linear and MLP models."""
CENTRAL_LR_TRANSFORMER = 0.001
"""Adam's usual rate for a transformer: at 0.01 the fusion transformer collapsed to one
output on amp (AUROC 0.500) and stalled on freesolv (RMSE 2.02, 1.60 at 0.001)."""
CENTRAL_WEIGHT_DECAY = 0.01
"""Adam's L2 term for the central medfed models (a light ridge: they have no held-out
set to stop on)."""
PLAIN_ROUNDS = 20
"""Rounds of the federated arm without DP: with no privacy budget to spend, nothing
limits its steps, so it runs at least this many rounds of the study's local steps."""
Tensors = tuple[torch.Tensor, ...]
REPORTED_SETTINGS = frozenset(
    {
        "preset", "num-server-rounds", "local-steps", "learning-rate", "max-grad-norm",
        "sample-rate", "strategy", "secure-aggregation", "secagg-clip", "delta",
        "server-learning-rate",
    }
)  # fmt: skip


@dataclass(frozen=True)
class StudyData:
    """One example study: its settings, each site's data, and the pooled held-out set."""

    name: str
    settings: StudySettings
    sites: Mapping[str, SiteData]
    train: Mapping[str, Tensors]
    held_out: Tensors
    groups: Mapping[str, frozenset[str]]
    """The parameter groups each site trains, decided from its site.toml."""

    @property
    def contract(self) -> StudyContract:
        return self.settings.contract

    @property
    def task(self) -> TaskSpec:
        return self.contract.tasks[0]

    @property
    def metric(self) -> str:
        return METRIC[self.task.kind]

    def pooled_train(self) -> Tensors:
        samples = [s for data in self.sites.values() for s in data.train]
        return encode(samples, self.contract).tensors()


def load_study(name: str, *, rounds: int | None = None, examples: Path = EXAMPLES) -> StudyData:
    """The example study `name` as every one of its sites reads it (`rounds` replaces the
    study's round count)."""
    from medfed.client.config import load_site_config

    settings = load_study_file(examples / "studies" / f"{name}.toml")
    if rounds is not None:
        settings = StudySettings.from_run_config(
            {**settings.to_run_config(), "num-server-rounds": rounds}
        )
    sites: dict[str, SiteData] = {}
    groups: dict[str, frozenset[str]] = {}
    for path in sorted(examples.glob(f"{name}-*/site.toml")):
        config = load_site_config(path)
        sites[config.site.id] = load_site_data(config, settings.contract).require_clean()
        groups[config.site.id] = frozenset(trainable_groups(config, settings.contract))
    train = {s: encode(list(d.train), settings.contract).tensors() for s, d in sites.items()}
    held = [sample for data in sites.values() for sample in data.held_out]
    return StudyData(
        name, settings, sites, train, encode(held, settings.contract).tensors(), groups
    )


# --- classical references ------------------------------------------------------------------


def design_matrix(contract: StudyContract, tensors: Tensors) -> np.ndarray:
    """The linear preset's features (standardised by the contract) as a numpy matrix."""
    inputs, _ = split_tensors(contract, tensors)
    named = dict(zip(input_layout(contract), inputs, strict=True))
    parts = [modality_features(m, contract, named) for m in contract.modalities]
    return torch.cat(parts, dim=1).numpy().astype(np.float64)


def labels(contract: StudyContract, tensors: Tensors) -> np.ndarray:
    _, targets = split_tensors(contract, tensors)
    target, labelled = targets[contract.tasks[0].name]
    if not bool(labelled.all()):
        raise ValueError("the benchmark needs every patient labelled")
    return target.numpy().astype(np.float64)


def score(task: TaskSpec, truth: np.ndarray, prediction: np.ndarray) -> float:
    """The task's metric: c-index (risk), AUROC (logit), RMSE (value)."""
    if task.kind == "survival":
        return concordance_index(truth[:, 0], truth[:, 1], prediction)
    if task.kind == "binary":
        return auroc(truth, prediction)
    return rmse(truth, prediction)


def classical(task: TaskSpec, x: np.ndarray, y: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """The classical model fitted on (x, y), its predictions on `x_test` (risk, logit or
    value). Columns constant in `x` are left out (a site may lack a feature)."""
    keep = x.std(axis=0) > 1e-9
    x, x_test = x[:, keep], x_test[:, keep]
    if task.kind == "survival":
        import pandas as pd
        from lifelines import CoxPHFitter

        columns = [f"x{i}" for i in range(x.shape[1])]
        frame = pd.DataFrame(x, columns=columns).assign(T=y[:, 0], E=y[:, 1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fitter = CoxPHFitter(penalizer=COX_PENALIZER).fit(frame, "T", "E")
        risk = fitter.predict_log_partial_hazard(pd.DataFrame(x_test, columns=columns))
        return np.asarray(risk, dtype=np.float64)
    if task.kind == "binary":
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=LOGISTIC_C, max_iter=5000).fit(x, y)
        return np.asarray(model.decision_function(x_test), dtype=np.float64)
    from sklearn.linear_model import Ridge

    return np.asarray(Ridge(alpha=RIDGE_ALPHA).fit(x, y).predict(x_test), dtype=np.float64)


def classical_score(study: StudyData, train: Tensors) -> float:
    """The classical model trained on `train`, scored on the pooled held-out patients;
    NaN when it cannot be fitted (too few events or patients)."""
    contract = study.contract
    try:
        prediction = classical(
            study.task,
            design_matrix(contract, train),
            labels(contract, train),
            design_matrix(contract, study.held_out),
        )
    except Exception:  # lifelines' convergence errors on a site of a dozen patients
        return math.nan
    return score(study.task, labels(contract, study.held_out), prediction)


# --- medfed's network, centrally and federated without DP ------------------------------


def held_out_metric(study: StudyData, arrays: Mapping[str, np.ndarray]) -> float:
    """The global model `arrays` scored on the pooled held-out patients."""
    model = build_model(study.settings.preset, contract=study.contract, seed=0)
    load_arrays(model, arrays)
    return evaluate(model, study.held_out, study.contract)[study.task.name][study.metric]


def central_lr(preset: str) -> float:
    """The central arm's Adam learning rate for a preset."""
    return CENTRAL_LR if preset in ("linear", "mlp") else CENTRAL_LR_TRANSFORMER


def central_score(study: StudyData, train: Tensors, *, seed: int) -> float:
    """medfed's network trained on `train` alone, without DP (Adam, a light L2 term),
    scored on the pooled held-out patients."""
    contract = study.contract
    model = build_model(study.settings.preset, contract=contract, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    n = int(train[0].shape[0])
    loader = DataLoader(
        TensorDataset(*train), batch_size=min(CENTRAL_BATCH, n), shuffle=True, generator=generator
    )
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=central_lr(study.settings.preset),
        weight_decay=CENTRAL_WEIGHT_DECAY,
    )
    train_steps(model, optimizer, loader, steps=CENTRAL_STEPS, contract=contract)
    return held_out_metric(study, state_arrays(model))


def federated_plain(study: StudyData, *, seed: int) -> list[float]:
    """Federated without DP: the study's strategy over plain local SGD (the study's
    learning rate, local steps and sample rate as the batch share), for at least
    `PLAIN_ROUNDS` rounds. The held-out metric of the initial model and after every round."""
    settings = study.settings
    strategy = strategy_of(settings)
    model = build_model(settings.preset, contract=study.contract, seed=settings.seed + seed)
    global_arrays = state_arrays(model)
    generator = torch.Generator().manual_seed(seed)
    groups = study.groups
    curve = [held_out_metric(study, global_arrays)]
    rounds = max(settings.num_rounds, PLAIN_ROUNDS)
    for _ in range(rounds):
        contributions = []
        for site, tensors in study.train.items():
            load_arrays(model, global_arrays)
            n = int(tensors[0].shape[0])
            batch = max(1, round(settings.sample_rate * n))
            loader = DataLoader(
                TensorDataset(*tensors), batch_size=batch, shuffle=True, generator=generator
            )
            optimizer = _ClippedSGD(
                model.parameters(), lr=settings.learning_rate, max_norm=settings.max_grad_norm
            )
            train_steps(
                model, optimizer, loader, steps=settings.local_steps, contract=study.contract
            )
            contributions.append(Contribution(site, state_arrays(model), n, groups[site]))
        global_arrays = strategy.aggregate(global_arrays, contributions).arrays
        if not all(np.isfinite(array).all() for array in global_arrays.values()):
            # Diverged: the rest of the curve (and the final metric) is not a number,
            # which the summary counts apart rather than the run failing.
            curve.extend([math.nan] * (rounds - len(curve) + 1))
            return curve
        curve.append(held_out_metric(study, global_arrays))
    return curve


class _ClippedSGD(torch.optim.SGD):
    """Plain SGD whose batch gradient is clipped to the study's `max-grad-norm` before
    each step: the no-DP arm's counterpart of DP-SGD's per-patient clipping (without
    it, a transformer at the study's DP-tuned learning rate can diverge)."""

    def __init__(self, params: Any, *, lr: float, max_norm: float) -> None:
        super().__init__(params, lr=lr)
        self._max_norm = max_norm

    def step(self, closure: Any = None) -> Any:
        parameters = [p for group in self.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, self._max_norm)
        return super().step(closure)


# --- federated with DP, through the real round loop -----------------------------------------


@dataclass(frozen=True)
class DpRun:
    """One real federated run: the held-out metric per round and what the sites spent."""

    curve: list[float]
    epsilon_spent: float
    noise_multiplier: float
    seconds: float


def federated_dp(
    name: str,
    study: StudyData,
    *,
    epsilon: float,
    seed: int,
    changes: Mapping[str, Any] | None = None,
) -> DpRun:
    """The study over the real round loop and real site handlers at `epsilon` (with
    `changes` to the study's keys, for sweeps on these public studies)."""
    from medfed.bench.memory_grid import MemoryGrid, site_contexts
    from medfed.consortium import write_example_consortium
    from medfed.flower.grid import server_identity

    started = time.perf_counter()
    overrides = {
        "target-epsilon": float(epsilon),
        "seed": study.settings.seed + seed,
        "num-server-rounds": study.settings.num_rounds,
        **(changes or {}),
    }
    with tempfile.TemporaryDirectory(prefix="medfed-utility-") as folder:
        settings, sites = write_example_consortium(Path(folder), name, overrides=overrides)
        grid = MemoryGrid(site_contexts([site.site_toml for site in sites]))
        with server_identity(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = run_study(
                grid,  # type: ignore[arg-type]
                settings,
                settings.contract,
                run_id=f"utility-{name}-{epsilon:g}-{seed}",
                report=lambda _: None,
                connect_timeout_s=10.0,
            )
    if results.status != "completed":
        raise RuntimeError(f"{name} at epsilon {epsilon:g}: the run {results.status}")
    rounds = settings.num_rounds
    keys = [str(r) for r in range(1, rounds + 1)] + ["final"]
    curve = [held_out_metric(study, grid.models[key]) for key in keys]
    last = results.per_round[-1]
    return DpRun(
        curve,
        max(last.epsilon_by_site.values()),
        statistics.fmean(last.noise_by_site.values()),
        time.perf_counter() - started,
    )


# --- one study, every arm --------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Mean and (sample) standard deviation over the finite values, and the values."""
    finite = [v for v in values if math.isfinite(v)]
    mean = statistics.fmean(finite) if finite else math.nan
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0 if finite else math.nan
    return {"mean": mean, "std": std, "values": list(values)}


def curve_summary(curves: Sequence[Sequence[float]]) -> dict[str, Any]:
    """A federated arm: its final metric over seeds and the mean learning curve."""
    result = summary([curve[-1] for curve in curves])
    result["diverged"] = sum(not math.isfinite(curve[-1]) for curve in curves)
    result["curve_mean"] = [
        statistics.fmean(finite) if (finite := [v for v in point if math.isfinite(v)]) else math.nan
        for point in zip(*curves, strict=True)
    ]
    result["initial"] = summary([curve[0] for curve in curves])
    return result


def epsilon_key(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def run_study_arms(
    name: str,
    *,
    seeds: int,
    epsilons: Sequence[float],
    rounds: int | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Every arm of one study, as the JSON document's entry for it."""
    study = load_study(name, rounds=rounds)
    started = time.perf_counter()
    pooled = study.pooled_train()
    classical_pooled = classical_score(study, pooled)  # deterministic: one fit
    medfed_pooled = [central_score(study, pooled, seed=s) for s in range(seeds)]
    progress(f"{name}: pooled references done")
    alone_classical = {site: classical_score(study, t) for site, t in study.train.items()}
    alone_medfed = {
        site: summary([central_score(study, t, seed=s) for s in range(seeds)])
        for site, t in study.train.items()
    }
    progress(f"{name}: sites alone done")
    federated: dict[str, Any] = {}
    for epsilon in epsilons:
        if math.isinf(epsilon):
            federated["inf"] = curve_summary([federated_plain(study, seed=s) for s in range(seeds)])
        else:
            runs = [federated_dp(name, study, epsilon=epsilon, seed=s) for s in range(seeds)]
            entry = curve_summary([run.curve for run in runs])
            entry["epsilon_spent"] = max(run.epsilon_spent for run in runs)
            entry["noise_multiplier"] = statistics.fmean(run.noise_multiplier for run in runs)
            entry["seconds_per_run"] = statistics.fmean(run.seconds for run in runs)
            federated[epsilon_key(epsilon)] = entry
        progress(f"{name}: federated at epsilon {epsilon_key(epsilon)} done")
    settings = study.settings
    return {
        "task": study.task.kind,
        "metric": study.metric,
        "higher_is_better": study.metric != "rmse",
        "patients": {
            "train": {site: int(t[0].shape[0]) for site, t in study.train.items()},
            "held_out": int(study.held_out[0].shape[0]),
        },
        "settings": {
            key: value
            for key, value in settings.model_dump(by_alias=True, exclude={"contract"}).items()
            if key in REPORTED_SETTINGS
        },
        "pooled": {"classical": summary([classical_pooled]), "medfed": summary(medfed_pooled)},
        "sites_alone": {
            "classical": {site: summary([v]) for site, v in alone_classical.items()},
            "medfed": alone_medfed,
            "classical_mean": summary([statistics.fmean(_finite(alone_classical.values()))]),
            "medfed_mean": summary(
                [
                    statistics.fmean(_finite(e["values"][s] for e in alone_medfed.values()))
                    for s in range(seeds)
                ]
            ),
        },
        "federated": federated,
        "seconds": time.perf_counter() - started,
    }


def _finite(values: Any) -> list[float]:
    finite = [float(v) for v in values if math.isfinite(v)]
    return finite or [math.nan]


def run_utility_bench(
    studies: Sequence[str],
    *,
    seeds: int,
    epsilons: Sequence[float],
    command: str,
    rounds: int | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """The whole benchmark: every arm of every study, and how and where it ran."""
    import os
    import platform

    started = time.perf_counter()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    document: dict[str, Any] = {"studies": {}}
    for name in studies:
        document["studies"][name] = run_study_arms(
            name, seeds=seeds, epsilons=epsilons, rounds=rounds, progress=progress
        )
    document["config"] = {
        "studies": list(studies),
        "seeds": seeds,
        "epsilons": [epsilon_key(e) for e in epsilons],
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch"
        f" {torch.__version__}, {torch.get_num_threads()} threads",
        "seconds": time.perf_counter() - started,
        "references": {
            "cox_penalizer": COX_PENALIZER,
            "ridge_alpha": RIDGE_ALPHA,
            "logistic_c": LOGISTIC_C,
            "central": {"optimizer": "adam", "lr": CENTRAL_LR,
                        "lr_transformer": CENTRAL_LR_TRANSFORMER, "steps": CENTRAL_STEPS,
                        "batch": CENTRAL_BATCH, "weight_decay": CENTRAL_WEIGHT_DECAY},
            "federated_no_dp_rounds_at_least": PLAIN_ROUNDS,
        },
    }  # fmt: skip
    return document
