"""An empirical privacy audit of medfed's DP-SGD in one training run per setting.

Steinke, Nasr & Jagielski (2023), "Privacy auditing with one (1) training run": add m
canaries to the training data, include each one independently with probability 1/2,
train once, then guess from the trained model which canaries were in. Under
epsilon-DP the number of correct guesses among r is stochastically dominated by
Binomial(r, e^eps / (1 + e^eps)), so a high count refutes small epsilons; the largest
epsilon refuted at 95% confidence is an empirical lower bound on the true one.

Canaries are rows with random standardised features and random labels, which a model
can only memorise. Each is scored by its negative loss under the trained model; the
top k scores are guessed "in", the bottom k "out", the rest abstain. Prints one JSON
document on stdout (progress on stderr); it reports figures and never passes or fails
on them.

It also audits what else leaves a site (`bench/dp_audit_outputs.py`): the differencing
attack on the released loss and the confirmation of a candidate dataset against the
sent data digest, each beside main's behaviour as the in-run baseline. Every result
states the largest epsilon its number of guesses could refute at all.

    .venv/bin/python bench/dp_audit.py [--refute-up-to 8] [--canaries M]
        [--guesses-per-side K] [--seed 7]

By default the canaries and guesses are sized so that an audit whose guesses are all
right refutes epsilon up to `--refute-up-to` (8: 8932 guesses, so 17864 canaries).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from medfed.bench.dp_audit_outputs import (
    differencing_attack,
    fingerprint_confirmation,
    guesses_to_refute,
    refutable_ceiling,
)
from medfed.model.contract import DEMO_CONTRACT
from medfed.model.network import build_model
from medfed.model.tokenizers import complete_numeric_inputs, encode
from medfed.model.train import train_steps
from medfed.privacy.accountant import epsilon_of
from medfed.privacy.calibration import calibrate_noise
from medfed.privacy.dpsgd import DpSgdSettings, PrivateTraining, make_private
from medfed.privacy.policy import PrivacyPolicy
from medfed.sites.config import DatasetConfig
from medfed.sites.manifest import load_site_data
from medfed.sites.synthetic import write_synthetic_consortium

THREADS = 2
DEFAULT_METRICS_NOISE = PrivacyPolicy.model_fields["metrics_noise_multiplier"].default
"""The noise a site's policy puts on its metrics unless the officer sets another."""
CONFIDENCE = 0.95
DELTA = 1e-5
SAMPLE_RATE = 0.05
MAX_GRAD_NORM = 5.0
LEARNING_RATE = 0.08
DEMO_STEPS = 90
"""The demo's training: 3 rounds of 30 local steps at one site."""
SENSITIVE_STEPS = 3000
SENSITIVE_DATA_ROWS = 200
"""A configuration in which the attack has power: fewer rows make each canary a larger
share of every Poisson batch, and more steps let a model memorise it."""
BASELINE_NOISE = 0.1
CLAIMED_EPSILONS = (2.0, 8.0)
MAX_BOUND_EPSILON = 50.0

NOTES = [
    "Method: Steinke, Nasr & Jagielski (2023), black-box, one training run per setting."
    " empirical_epsilon_lower_bound is the largest epsilon such that"
    " P[Binomial(guesses, e^eps/(1+e^eps)) >= correct] <= 0.05 (exact binomial tail);"
    " 0 means no epsilon is refuted at 95% confidence. With r guesses it can never exceed"
    " the bound for r correct out of r (max_refutable_epsilon: 4.19 for 200 guesses, 8.0"
    " for 8932), so a claimed epsilon above that cannot be refuted at this audit's size"
    " whatever the training does.",
    "outputs audits what else a reply carries. differencing: the training loss with and"
    " without one patient whose loss sits at the clip, guessed from each release; the exact"
    " loss (main) is the in-run baseline. fingerprint: candidate values of one patient's"
    " first feature hashed into candidate datasets and compared with the digest sent; the"
    " data's own fingerprint (main) is the baseline, the site-secret HMAC is what is sent"
    " now.",
    "The delta term is ignored: the test treats the mechanism as pure epsilon-DP. The"
    " paper's (epsilon, delta) version of the test adds a delta-dependent term to the"
    " binomial tail, so ignoring it makes the reported bound a slight overestimate at"
    " delta = 1e-5.",
    "A lower bound far below the claimed epsilon does not mean the accounting is loose by"
    " that much: a one-run black-box audit with 1000 canaries and 200 guesses is weak, and"
    " the demo's 90 steps at batch ~220 barely let any model memorise a single row.",
    "demo configuration: the demo's training (one synthetic site's training rows, 90 DP-SGD"
    " steps = 3 rounds x 30, sample rate 0.05, clipping 5.0, learning rate 0.08, tiny"
    " model). sensitive configuration: the same but 200 of the site's rows and 3000 steps,"
    " where the attack can see memorisation; the noise for a claimed epsilon is calibrated"
    " for each configuration's steps and real sample rate.",
    "baseline settings use noise multiplier 0.1 with clipping 5.0: no meaningful"
    " guarantee (accounted_epsilon shows what RDP gives), to show what the audit sees"
    " when noise is small.",
    "loss_drop repeats the guess with each canary's score centred by its loss under the"
    " initial model (known to the auditor, independent of which canaries were in); it is"
    " a second, separately valid test, not a maximum over tests.",
    "Canary features, labels and inclusions come from a seeded generator (--seed) and are"
    " the same in every setting;"
    " DP-SGD's noise and batch sampling come from the operating system's secure source,"
    " so figures vary from run to run.",
]


@dataclass(frozen=True)
class Setting:
    """One training to audit: its configuration and either a claimed epsilon or a noise."""

    name: str
    configuration: str
    steps: int
    data_rows: int | None
    claimed_epsilon: float | None
    noise_multiplier: float | None = None


@dataclass(frozen=True)
class Guesses:
    """The outcome of guessing membership from one score."""

    guesses: int
    correct: int
    empirical_epsilon_lower_bound: float


def log(message: str) -> None:
    print(f"[dp_audit] {message}", file=sys.stderr, flush=True)


def binomial_tail(trials: int, successes: int, probability: float) -> float:
    """P[Binomial(trials, probability) >= successes], summed exactly in log space."""
    if successes <= 0:
        return 1.0
    if successes > trials:
        return 0.0
    if probability >= 1.0:
        return 1.0
    if probability <= 0.0:
        return 0.0
    log_terms = [
        math.lgamma(trials + 1)
        - math.lgamma(k + 1)
        - math.lgamma(trials - k + 1)
        + k * math.log(probability)
        + (trials - k) * math.log1p(-probability)
        for k in range(successes, trials + 1)
    ]
    largest = max(log_terms)
    return math.exp(largest) * math.fsum(math.exp(term - largest) for term in log_terms)


def epsilon_lower_bound(guesses: int, correct: int, *, confidence: float = CONFIDENCE) -> float:
    """The largest epsilon refuted at `confidence` by `correct` right guesses of `guesses`
    (0.0 when not even epsilon = 0 is refuted), by bisection to 1e-4."""

    def refuted(epsilon: float) -> bool:
        probability = 1.0 / (1.0 + math.exp(-epsilon))
        return binomial_tail(guesses, correct, probability) <= 1.0 - confidence

    if guesses == 0 or not refuted(0.0):
        return 0.0
    low, high = 0.0, MAX_BOUND_EPSILON
    if refuted(high):
        return high
    while high - low > 1e-4:
        middle = (low + high) / 2
        low, high = (middle, high) if refuted(middle) else (low, middle)
    return round(low, 4)


def guess(scores: np.ndarray, included: np.ndarray, per_side: int) -> Guesses:
    """Guess "in" for the `per_side` highest scores and "out" for the lowest."""
    order = np.argsort(scores, kind="stable")
    guessed_out, guessed_in = order[:per_side], order[-per_side:]
    correct = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
    guesses = 2 * per_side
    return Guesses(guesses, correct, epsilon_lower_bound(guesses, correct))


@dataclass(frozen=True)
class _SyntheticSiteData:
    """What `load_site_data` needs of a site (`SiteDataSource`): its table's folder."""

    data_dir: Path
    source: Path
    datasets: tuple[DatasetConfig, ...] = ()


def demo_rows(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training rows of the demo's first synthetic site, read as a site reads them
    (`load_site_data`, then the model's encoding)."""
    with tempfile.TemporaryDirectory(prefix="dp_audit-") as root:
        site = write_synthetic_consortium(Path(root), DEMO_CONTRACT, n_sites=1, seed=seed)[0]
        folder = site.table.parent
        data = load_site_data(_SyntheticSiteData(folder, folder / "site.toml"), DEMO_CONTRACT)
    batch = encode(list(data.require_clean().train), DEMO_CONTRACT)
    labels = batch.targets[DEMO_CONTRACT.tasks[0].name][0]
    return batch.inputs[0].numpy(), labels.numpy().astype(np.int64)


def canary_losses(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        losses = nn.functional.binary_cross_entropy_with_logits(
            model(*complete_numeric_inputs(features))["readmission"],
            labels.float(),
            reduction="none",
        )
    return np.asarray(losses.numpy(), dtype=np.float64)


def wrap(dataset: TensorDataset, *, noise: float, model_seed: int) -> PrivateTraining:
    model = build_model("tiny", contract=DEMO_CONTRACT, seed=model_seed)
    settings = DpSgdSettings(
        noise_multiplier=noise, max_grad_norm=MAX_GRAD_NORM, sample_rate=SAMPLE_RATE
    )
    return make_private(model, dataset, settings=settings, learning_rate=LEARNING_RATE)


def audit(
    setting: Setting,
    data: tuple[np.ndarray, np.ndarray],
    *,
    canaries: int,
    per_side: int,
    seed: int,
) -> dict[str, object]:
    started = time.perf_counter()
    rng = np.random.default_rng([seed, canaries])
    features, labels = data
    if setting.data_rows is not None:
        features, labels = features[: setting.data_rows], labels[: setting.data_rows]
    canary_x = rng.standard_normal((canaries, features.shape[1])).astype(np.float32)
    canary_y = rng.integers(0, 2, canaries).astype(np.int64)
    included = rng.random(canaries) < 0.5
    all_labels = torch.from_numpy(np.concatenate([labels, canary_y[included]]).astype(np.float32))
    train = TensorDataset(  # the layout of EncodedBatch.tensors(): inputs, target, labelled
        *complete_numeric_inputs(torch.from_numpy(np.concatenate([features, canary_x[included]]))),
        all_labels,
        torch.ones(len(all_labels), dtype=torch.bool),
    )
    model_seed = seed + 1
    noise = setting.noise_multiplier
    if setting.claimed_epsilon is not None:
        # The rate Opacus really samples at, for this many rows, is what the noise must
        # be calibrated for: ask make_private itself.
        real_rate = wrap(train, noise=1.0, model_seed=model_seed).sample_rate
        noise = calibrate_noise(
            target_epsilon=setting.claimed_epsilon,
            delta=DELTA,
            sample_rate=real_rate,
            steps=setting.steps,
            n_patients=len(train),
        )
    if noise is None:
        raise ValueError(f"setting {setting.name} has neither a claimed epsilon nor a noise")
    private = wrap(train, noise=noise, model_seed=model_seed)
    canary_features, canary_labels = torch.from_numpy(canary_x), torch.from_numpy(canary_y)
    initial = canary_losses(private.model, canary_features, canary_labels)
    with warnings.catch_warnings():
        # Opacus's hooks fire on module outputs since inputs need no gradient: expected.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        train_steps(
            private.model,
            private.optimizer,
            private.loader,
            steps=setting.steps,
            contract=DEMO_CONTRACT,
            reduce_loss=private.reduce_loss,
        )
    trained = canary_losses(private.model, canary_features, canary_labels)
    by_loss = guess(-trained, included, per_side)
    by_drop = guess(initial - trained, included, per_side)
    with warnings.catch_warnings():
        # At the baseline's noise RDP's best order is its smallest: a loose bound on an
        # epsilon that is meaningless anyway.
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        accounted = epsilon_of([private.event(setting.steps)], delta=DELTA)
    wall_s = time.perf_counter() - started
    log(
        f"{setting.name}: noise {noise:.4g}, {by_loss.correct}/{by_loss.guesses} correct,"
        f" bound {by_loss.empirical_epsilon_lower_bound:.3f} ({wall_s:.1f} s)"
    )
    return {
        "name": setting.name,
        "configuration": setting.configuration,
        "claimed_epsilon": setting.claimed_epsilon,
        "noise_multiplier": noise,
        "accounted_epsilon": round(accounted, 4),
        "steps": setting.steps,
        "sample_rate": private.sample_rate,
        "training_rows": len(train),
        "canaries": canaries,
        "canaries_included": int(included.sum()),
        "guesses": by_loss.guesses,
        "max_refutable_epsilon": refutable_ceiling(by_loss.guesses, epsilon_lower_bound),
        "correct": by_loss.correct,
        "empirical_epsilon_lower_bound": by_loss.empirical_epsilon_lower_bound,
        "loss_drop": {
            "guesses": by_drop.guesses,
            "correct": by_drop.correct,
            "empirical_epsilon_lower_bound": by_drop.empirical_epsilon_lower_bound,
        },
        "wall_s": round(wall_s, 2),
    }


def settings() -> list[Setting]:
    configurations = (
        ("demo", DEMO_STEPS, None),
        ("sensitive", SENSITIVE_STEPS, SENSITIVE_DATA_ROWS),
    )
    found: list[Setting] = []
    for configuration, steps, rows in configurations:
        for epsilon in CLAIMED_EPSILONS:
            name = f"{configuration}-eps{epsilon:g}"
            found.append(Setting(name, configuration, steps, rows, claimed_epsilon=epsilon))
        found.append(
            Setting(
                f"{configuration}-baseline",
                configuration,
                steps,
                rows,
                claimed_epsilon=None,
                noise_multiplier=BASELINE_NOISE,
            )
        )
    return found


def machine_facts() -> dict[str, object]:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": version("torch"),
        "opacus": version("opacus"),
        "loadavg_at_start": [round(load, 2) for load in os.getloadavg()],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--refute-up-to",
        type=float,
        default=8.0,
        help="size the audit to refute epsilon up to this when every guess is right",
    )
    parser.add_argument("--canaries", type=int, default=None, help="m, the number of canaries")
    parser.add_argument(
        "--guesses-per-side", type=int, default=None, help="k: guesses 'in' and 'out' each"
    )
    parser.add_argument("--seed", type=int, default=7, help="data, canaries and inclusions")
    parser.add_argument(
        "--metric-trials", type=int, default=None, help="trials of the differencing attack"
    )
    options = parser.parse_args(argv)
    needed = guesses_to_refute(options.refute_up_to)
    if options.guesses_per_side is None:
        options.guesses_per_side = math.ceil(needed / 2)
    if options.canaries is None:
        options.canaries = 2 * options.guesses_per_side
    if options.metric_trials is None:
        options.metric_trials = 2 * math.ceil(needed / 2)
    if not 0 < 2 * options.guesses_per_side <= options.canaries:
        parser.error("--guesses-per-side must be positive and at most half of --canaries")
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    date_utc = datetime.now(UTC).isoformat(timespec="seconds")
    machine = machine_facts()
    data = demo_rows(options.seed)
    results = [
        audit(
            setting,
            data,
            canaries=options.canaries,
            per_side=options.guesses_per_side,
            seed=options.seed,
        )
        for setting in settings()
    ]
    outputs = {
        "differencing": [
            differencing_attack(
                trials=options.metric_trials,
                noise_multiplier=noise,
                seed=options.seed,
                bound=epsilon_lower_bound,
            )
            for noise in (None, DEFAULT_METRICS_NOISE)
        ],
        "fingerprint": fingerprint_confirmation(seed=options.seed),
    }
    document: dict[str, object] = {
        "benchmark": "dp_audit",
        "date_utc": date_utc,
        "machine": machine,
        "config": {
            "canaries": options.canaries,
            "refute_up_to": options.refute_up_to,
            "guesses_per_side": options.guesses_per_side,
            "confidence": CONFIDENCE,
            "delta": DELTA,
            "sample_rate": SAMPLE_RATE,
            "max_grad_norm": MAX_GRAD_NORM,
            "learning_rate": LEARNING_RATE,
            "accountant": "rdp",
            "seed": options.seed,
        },
        "settings": results,
        "outputs": outputs,
        "wall_s": round(time.perf_counter() - started, 2),
        "notes": NOTES,
    }
    sys.stdout.write(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
