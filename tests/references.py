"""Trusted references that tests compare medfed against (never medfed's own code)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import dp_accounting
from dp_accounting import rdp
from opacus.accountants import RDPAccountant


class _Event(Protocol):
    noise_multiplier: float
    sample_rate: float
    steps: int


def dp_accounting_epsilon(events: Iterable[_Event], delta: float) -> float:
    """Google's dp-accounting RDP epsilon of Poisson-sampled Gaussian steps, over Opacus's
    orders from 2 up (the optimum lies there for these settings, and dp-accounting's
    fractional orders below 2 do not always converge)."""
    accountant = rdp.RdpAccountant(orders=[a for a in RDPAccountant.DEFAULT_ALPHAS if a >= 2])
    for event in events:
        accountant.compose(
            dp_accounting.PoissonSampledDpEvent(
                event.sample_rate, dp_accounting.GaussianDpEvent(event.noise_multiplier)
            ),
            event.steps,
        )
    return float(accountant.get_epsilon(delta))
