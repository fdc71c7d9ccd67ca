"""The site's API as typed values: what the coordinator asks for and what the site answers.

The same values travel in-process (simulation, tests) and inside Flower messages;
`client.client_app` converts between the two and validates every field.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.network import PresetName
from model.train import EvalResult


@dataclass(frozen=True)
class TrainRequest:
    """Train the global model for some local steps under DP-SGD."""

    run_id: str
    round: int
    arrays: dict[str, np.ndarray]
    model_sha256: str
    preset: PresetName
    n_features: int
    local_steps: int
    learning_rate: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    delta: float


@dataclass(frozen=True)
class TrainReply:
    """The site's update, its spend and the incoming model's local evaluation."""

    site_id: str
    arrays: dict[str, np.ndarray]
    num_examples: int
    train_loss: float
    epsilon: float
    incoming_eval: EvalResult


@dataclass(frozen=True)
class EvaluateRequest:
    """Evaluate the global model on the site's held-out patients."""

    run_id: str
    round: int
    arrays: dict[str, np.ndarray]
    model_sha256: str
    preset: PresetName
    n_features: int


@dataclass(frozen=True)
class EvaluateReply:
    """Metrics of the global model on the site's held-out patients."""

    site_id: str
    result: EvalResult
