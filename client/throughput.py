"""Measured DP-SGD throughput of the study's model at this site, for the scheduler.

A short calibration run (a few DP-SGD steps on random inputs of the contract's shape,
so no patient is touched and nothing is spent) gives samples per second; the figure is
cached per model identity and accelerator in the state dir, so it is measured once.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from model.network import PresetName, build_model
from model.train import train_steps
from privacy.dpsgd import DpSgdSettings, make_private

CACHE_NAME = "throughput.json"
CALIBRATION_ROWS = 512
CALIBRATION_BATCH = 64
CALIBRATION_STEPS = 6
WARMUP_STEPS = 2


def model_identity(preset: PresetName, n_features: int) -> str:
    """What the throughput depends on: the network's preset and input width."""
    return f"{preset}/{n_features}"


def calibrate(preset: PresetName, n_features: int) -> float:
    """DP-SGD samples per second of `preset` on this process's CPU threads."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(CALIBRATION_ROWS, n_features, generator=generator)
    labels = torch.randint(0, 2, (CALIBRATION_ROWS,), generator=generator).float()
    model = build_model(preset, n_features=n_features, seed=0)
    settings = DpSgdSettings(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=CALIBRATION_BATCH / CALIBRATION_ROWS,
    )
    private = make_private(
        model, TensorDataset(features, labels), settings=settings, learning_rate=0.01
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        train_steps(private.model, private.optimizer, private.loader, steps=WARMUP_STEPS)
        started = time.perf_counter()
        result = train_steps(
            private.model, private.optimizer, private.loader, steps=CALIBRATION_STEPS
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

    def get(self, preset: PresetName, n_features: int, accelerator: str) -> float:
        """The cached figure, or a fresh calibration (then cached, written atomically)."""
        key = f"{model_identity(preset, n_features)}@{accelerator}"
        figures = self._read()
        if key in figures:
            return figures[key]
        figures[key] = calibrate(preset, n_features)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self._path.parent, prefix=".throughput-")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(figures, out, sort_keys=True)
        os.replace(temporary, self._path)
        return figures[key]
