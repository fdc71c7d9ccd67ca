"""The network and its presets.

Parameters are named by group (`encoders.<modality>.*`, `fusion.*`, `heads.<task>.*`)
so that aggregation can work per group. Only layers that Opacus computes per-sample
gradients for are used (no BatchNorm).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from model.presets import PRESETS, Preset, PresetName

__all__ = ["MedModel", "PresetName", "arrays_sha256", "build_model", "load_arrays", "state_arrays"]


class ClinicalEncoder(nn.Module):
    """Projects a vector of standardised clinical features into the hidden space."""

    def __init__(self, n_features: int, hidden: int) -> None:
        super().__init__()
        self.project = nn.Linear(n_features, hidden)
        self.activation = nn.GELU()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        encoded: torch.Tensor = self.activation(self.project(features))
        return encoded


class FusionBlock(nn.Module):
    """A pre-norm residual MLP block."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual: torch.Tensor = self.mlp(self.norm(x))
        return x + residual


class MedModel(nn.Module):
    """Clinical encoder, fusion blocks and one binary outcome head (one logit per sample)."""

    def __init__(self, n_features: int, preset: Preset) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({"clinical": ClinicalEncoder(n_features, preset.hidden)})
        self.fusion = nn.Sequential(
            *(FusionBlock(preset.hidden) for _ in range(preset.fusion_layers))
        )
        self.heads = nn.ModuleDict({"outcome": nn.Linear(preset.hidden, 1)})

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.fusion(self.encoders["clinical"](features))
        logits: torch.Tensor = self.heads["outcome"](hidden).squeeze(-1)
        return logits


def build_model(preset: PresetName, *, n_features: int, seed: int) -> MedModel:
    """Build a freshly initialised model; the same seed gives the same weights."""
    if n_features < 1:
        raise ValueError(f"n_features must be at least 1, got {n_features}")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return MedModel(n_features, PRESETS[preset])
    finally:
        torch.random.set_rng_state(generator_state)


def state_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters as float32 numpy arrays, keyed by parameter name."""
    return {
        name: tensor.detach().cpu().numpy().astype(np.float32, copy=True)
        for name, tensor in model.state_dict().items()
    }


def load_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load arrays into the model after checking names, shapes and dtypes exactly."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise ValueError(f"parameter names differ: missing {missing}, unexpected {unexpected}")
    for name, tensor in expected.items():
        array = arrays[name]
        if array.dtype != np.float32:
            raise ValueError(f"parameter {name}: dtype {array.dtype}, expected float32")
        if tuple(array.shape) != tuple(tensor.shape):
            raise ValueError(
                f"parameter {name}: shape {tuple(array.shape)}, expected {tuple(tensor.shape)}"
            )
        if not np.isfinite(array).all():
            raise ValueError(f"parameter {name}: contains NaN or Inf")
    model.load_state_dict({name: torch.from_numpy(np.array(arrays[name])) for name in expected})


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """A digest of named arrays, independent of dict order: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        for field in (name.encode(), str(array.dtype).encode(), str(array.shape).encode()):
            # Each field is length-prefixed, so no two different inputs frame alike.
            digest.update(len(field).to_bytes(8, "big"))
            digest.update(field)
        data = array.tobytes()
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()
