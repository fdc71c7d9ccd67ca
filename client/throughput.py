"""Measured DP-SGD throughput of the study's model at this site, for the scheduler.

A short calibration run (a few DP-SGD steps on random patients encoded for the contract,
so no patient is touched and nothing is spent) gives samples per second; the figure is
cached per model identity and accelerator in the state dir, so it is measured once.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
from torch.utils.data import TensorDataset

from medfed.common import write_atomic
from medfed.model.contract import StudyContract, TaskSpec
from medfed.model.network import PresetName, build_model, model_identity
from medfed.model.sample import PatientSample
from medfed.model.tokenizers import encode
from medfed.model.train import train_steps
from medfed.privacy.dpsgd import DpSgdSettings, make_private

CACHE_NAME = "throughput.json"
CALIBRATION_ROWS = 512
CALIBRATION_BATCH = 64
CALIBRATION_STEPS = 6
WARMUP_STEPS = 2
_CALIBRATION_SMILES = ("CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "CN1CCC[C@H]1c1cccnc1")


def _label(task: TaskSpec, rng: np.random.Generator) -> dict[str, float]:
    if task.kind == "binary":
        return {task.target: float(rng.integers(0, 2))}
    if task.kind == "multiclass":
        return {task.target: float(rng.integers(0, len(task.classes)))}
    if task.kind == "regression":
        return {task.target: float(rng.normal())}
    assert task.event is not None  # a survival task's validator guarantees its event field
    return {task.target: float(rng.uniform(1.0, 100.0)), task.event: float(rng.integers(0, 2))}


def calibration_samples(contract: StudyContract, n: int, *, seed: int = 0) -> list[PatientSample]:
    """`n` random patients with every modality and label of `contract` (no patient's data)."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        protein = contract.protein
        samples.append(
            PatientSample(
                patient_id=f"calibration-{i}",
                numeric={
                    f.name: float(rng.uniform(f.minimum, f.maximum)) for f in contract.numeric
                },
                codes={f.name: frozenset(f.vocabulary[:1]) for f in contract.categorical},
                omics=None
                if contract.omics is None
                else rng.lognormal(size=len(contract.omics.genes)).astype(np.float32),
                smiles=None
                if contract.molecule is None
                else _CALIBRATION_SMILES[i % len(_CALIBRATION_SMILES)][
                    : contract.molecule.max_length
                ],
                protein=None
                if protein is None
                else "".join(rng.choice(list(protein.alphabet), size=protein.max_length)),
                targets={k: v for task in contract.tasks for k, v in _label(task, rng).items()},
            )
        )
    return samples


def calibrate(preset: PresetName, contract: StudyContract) -> float:
    """DP-SGD samples per second of the study's model on this process's CPU threads."""
    tensors = encode(calibration_samples(contract, CALIBRATION_ROWS), contract).tensors()
    model = build_model(preset, contract=contract, seed=0)
    settings = DpSgdSettings(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=CALIBRATION_BATCH / CALIBRATION_ROWS,
    )
    private = make_private(model, TensorDataset(*tensors), settings=settings, learning_rate=0.01)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        train_steps(
            private.model,
            private.optimizer,
            private.loader,
            steps=WARMUP_STEPS,
            contract=contract,
            reduce_loss=private.reduce_loss,
        )
        started = time.perf_counter()
        result = train_steps(
            private.model,
            private.optimizer,
            private.loader,
            steps=CALIBRATION_STEPS,
            contract=contract,
            reduce_loss=private.reduce_loss,
        )
        elapsed = time.perf_counter() - started
    return result.samples_seen / max(elapsed, 1e-9)


class ThroughputCache:
    """Measured figures in `<state_dir>/throughput.json`, keyed by model and accelerator."""

    def __init__(self, state_dir: Path) -> None:
        self._path = state_dir / CACHE_NAME

    def _read(self) -> dict[str, float]:
        try:
            document = json.loads(self._path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(document, dict):
            return {}
        return {
            str(key): float(value)
            for key, value in document.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and value > 0
        }

    def get(self, preset: PresetName, contract: StudyContract, accelerator: str) -> float:
        """The cached figure, or a fresh calibration (then cached, written atomically)."""
        key = f"{model_identity(preset, contract)}@{accelerator}"
        figures = self._read()
        if key in figures:
            return figures[key]
        figures[key] = calibrate(preset, contract)
        write_atomic(self._path, json.dumps(figures, sort_keys=True).encode("utf-8"))
        return figures[key]
