"""Epsilon of a sequence of DP-SGD events, composed with Opacus's RDP accountant."""

from __future__ import annotations

from collections.abc import Iterable

from opacus.accountants import RDPAccountant

from privacy.errors import DpConfigError
from privacy.events import DpSgdEvent


def epsilon_of(events: Iterable[DpSgdEvent], *, delta: float) -> float:
    """The (epsilon, delta)-DP epsilon of all `events` composed; 0.0 for no events."""
    if not 0 < delta < 1:
        raise DpConfigError(f"delta must be in (0, 1), got {delta}")
    history = [(event.noise_multiplier, event.sample_rate, event.steps) for event in events]
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = history
    return float(accountant.get_epsilon(delta=delta))
