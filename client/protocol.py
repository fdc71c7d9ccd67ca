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
    study: str
    study_sha256: str
    round: int
    planned_rounds: int
    arrays: dict[str, np.ndarray]
    model_sha256: str
    preset: PresetName
    n_features: int
    local_steps: int
    learning_rate: float
    target_epsilon: float
    max_grad_norm: float
    sample_rate: float
    delta: float


@dataclass(frozen=True)
class ModelCheck:
    """How a received global model does at this site: its loss on the training patients
    and its metrics on the held-out patients."""

    train_examples: int
    train_loss: float
    held_out: EvalResult


@dataclass(frozen=True)
class TrainReply:
    """The site's update, its spend, and how the model it received did here."""

    site_id: str
    arrays: dict[str, np.ndarray]
    local_loss: float
    epsilon: float
    noise_multiplier: float
    incoming: ModelCheck
    receipt_signature: str

    @property
    def num_examples(self) -> int:
        """Patients the update was trained on: the weight of this update in FedAvg."""
        return self.incoming.train_examples


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
    """How the global model does at this site."""

    site_id: str
    result: ModelCheck
