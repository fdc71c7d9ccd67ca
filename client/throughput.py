"""Measured DP-SGD throughput of the study's model at this site, for the scheduler.

A short calibration run (a few DP-SGD steps on random patients encoded for the contract,
so no patient is touched and nothing is spent) gives samples per second. It runs as the
site trains: on site.toml's accelerator, in its precision, grad-sample mode and physical
batch size (`[training]`); the figure is cached in the state dir per model identity and
all of these, so it is measured once per setup.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import TensorDataset

from medfed.common import write_atomic
from medfed.model.contract import StudyContract, TaskSpec
from medfed.model.devices import resolve_device
from medfed.model.network import PresetName, build_model, model_identity
from medfed.model.precision import Precision, autocast_dtype
from medfed.model.sample import PatientSample
from medfed.model.tokenizers import encode
from medfed.model.train import train_steps
from medfed.privacy.dpsgd import DpSgdSettings, make_private
from medfed.privacy.modes import DEFAULT_GRAD_SAMPLE_MODE, GradSampleMode

if TYPE_CHECKING:
    from medfed.client.config import SiteConfig

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


@dataclass(frozen=True)
class TrainingSetup:
    """How a site trains: what its throughput depends on besides the model."""

    accelerator: str = "cpu"
    precision: Precision = "fp32"
    grad_sample_mode: GradSampleMode = DEFAULT_GRAD_SAMPLE_MODE
    physical_batch_size: int | None = None

    @classmethod
    def of(cls, config: SiteConfig) -> TrainingSetup:
        """site.toml's accelerator and `[training]` section."""
        training = config.training
        return cls(
            accelerator=config.accelerator,
            precision=training.precision,
            grad_sample_mode=training.grad_sample_mode,
            physical_batch_size=training.physical_batch_size,
        )

    def key(self) -> str:
        """The cache key's setup part, e.g. `cuda/bf16/bk` (`/pb64` with physical batches)."""
        parts = [self.accelerator, self.precision, self.grad_sample_mode]
        if self.physical_batch_size is not None:
            parts.append(f"pb{self.physical_batch_size}")
        return "/".join(parts)


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (cuda, rbln, ...), so the clock sees all of it."""
    backend = getattr(torch, device.type, None)
    synchronize = getattr(backend, "synchronize", None)
    if device.type != "cpu" and callable(synchronize):
        synchronize()


def calibrate(
    preset: PresetName, contract: StudyContract, setup: TrainingSetup | None = None
) -> float:
    """DP-SGD samples per second of the study's model as this site trains it (`setup`:
    its accelerator, precision, grad-sample mode and physical batch size)."""
    setup = setup or TrainingSetup()
    device = resolve_device(setup.accelerator)  # never a silent fallback to the CPU
    tensors = encode(calibration_samples(contract, CALIBRATION_ROWS), contract).tensors()
    model = build_model(preset, contract=contract, seed=0, device=device)
    settings = DpSgdSettings(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=CALIBRATION_BATCH / CALIBRATION_ROWS,
    )
    private = make_private(
        model,
        TensorDataset(*tensors),
        settings=settings,
        learning_rate=0.01,
        grad_sample_mode=setup.grad_sample_mode,
    )

    def steps(count: int) -> int:
        result = train_steps(
            private.model,
            private.optimizer,
            private.loader,
            steps=count,
            contract=contract,
            reduce_loss=private.reduce_loss,
            physical_batch_size=setup.physical_batch_size,
            autocast_dtype=autocast_dtype(setup.precision),
        )
        _synchronize(device)
        return result.samples_seen

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype")
        steps(WARMUP_STEPS)
        started = time.perf_counter()
        seen = steps(CALIBRATION_STEPS)
        elapsed = time.perf_counter() - started
    return seen / max(elapsed, 1e-9)


class ThroughputCache:
    """Measured figures in `<state_dir>/throughput.json`, keyed by model and setup."""

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

    def cached(
        self, preset: PresetName, contract: StudyContract, setup: TrainingSetup
    ) -> float | None:
        """The figure measured before for this model and setup, or None."""
        return self._read().get(f"{model_identity(preset, contract)}@{setup.key()}")

    def get(self, preset: PresetName, contract: StudyContract, setup: TrainingSetup) -> float:
        """The cached figure, or a fresh calibration (then cached, written atomically)."""
        key = f"{model_identity(preset, contract)}@{setup.key()}"
        figures = self._read()
        if key in figures:
            return figures[key]
        figures[key] = calibrate(preset, contract, setup)
        write_atomic(self._path, json.dumps(figures, sort_keys=True).encode("utf-8"))
        return figures[key]
