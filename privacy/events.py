"""Privacy events as immutable values.

A `DpSgdEvent` means: `steps` steps of DP-SGD with Poisson sampling at `sample_rate`
and Gaussian noise of `noise_multiplier` times the clipping norm. Its meaning never
changes; a different mechanism gets a new event type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from medfed.privacy.errors import DpConfigError


@dataclass(frozen=True)
class DpSgdEvent:
    """Steps of Poisson-sampled Gaussian DP-SGD (one sample per patient)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise DpConfigError(f"noise_multiplier must be positive, got {self.noise_multiplier}")
        if not (0 < self.sample_rate <= 1):
            raise DpConfigError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 1:
            raise DpConfigError(f"steps must be at least 1, got {self.steps}")
