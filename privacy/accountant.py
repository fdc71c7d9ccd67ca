"""Epsilon of a sequence of DP-SGD events, composed with one of Opacus's accountants.

Two accountants are offered, both upper bounds on the true epsilon:

- "rdp": Renyi DP (Mironov 2017; Mironov, Talwar & Zhang 2019), the conservative
  default; cheap for any setting.
- "prv": numerical composition of privacy loss random variables (Gopi, Lee & Wutschitz
  2021), tighter than RDP: by a few percent at large epsilons, by much more at small
  ones. Opacus returns the upper end of its error interval (its estimate at
  delta - delta/1000, plus `PRV_EPS_ERROR`), so the value stays an upper bound.

Pure accounting: no tensors, no training state, only the events' numbers.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Literal

import numpy as np

from medfed.privacy.errors import AccountingError, DpConfigError
from medfed.privacy.events import DpSgdEvent
from medfed.privacy.rdp import ORDERS, rdp_per_step

AccountantKind = Literal["rdp", "prv"]
"""Which accountant composes the events: Renyi DP or privacy loss random variables."""

_History = list[tuple[float, float, int]]
"""Opacus's accountant history: (noise_multiplier, sample_rate, steps) per event."""

PRV_EPS_ERROR = 0.01
"""The PRV accountant's absolute error allowance on epsilon (Opacus's default), added in
full to its estimate: at small epsilons it dominates the gap to the exact value."""

PRV_MAX_GRID_POINTS = 2**24
"""The largest discretisation grid the PRV accountant may build (about 130 MB per
array). Settings that would need more have an epsilon far beyond any meaningful
guarantee, and would otherwise exhaust the machine's memory."""


def _rdp_epsilon(history: _History, delta: float) -> float:
    """What Opacus's `RDPAccountant(history).get_epsilon(delta)` returns, with each
    mechanism's per-step RDP curve vectorised and memoised (`privacy.rdp`): past events
    are not recomputed every time a site's epsilon or next noise is asked."""
    rdp = sum(rdp_per_step(rate, noise) * steps for noise, rate, steps in history)
    with warnings.catch_warnings():
        # A lone release with much noise (a noised count or metrics) has its optimum
        # beyond the largest order: the value at that order is still an upper bound.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        from opacus.accountants.analysis.rdp import get_privacy_spent  # imports torch

        epsilon, _ = get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    return float(epsilon)


@contextlib.contextmanager
def _quiet_prv_internals() -> Iterator[None]:
    """Silence what Opacus's PRV accountant says about its own internals: it sizes its
    grid with an RDP bound whose optimal order may sit at an end of the range (a looser
    bound only widens the grid), and it evaluates densities far in the tails where exp
    overflows to a probability of zero; an unsampled Gaussian release (sample rate 1:
    a noised count) takes log(1 - q) = log(0) = -inf, which its comparison reads right.
    An invalid operation (0 * inf) raises instead: its NaN would otherwise pass silently
    into the epsilon (and an infinite epsilon is refused after)."""
    with (
        warnings.catch_warnings(),
        np.errstate(over="ignore", divide="ignore", invalid="raise"),
    ):
        warnings.filterwarnings("ignore", message="Optimal order is the")
        yield


def _prv_grid_points(history: _History, delta_error: float) -> float:
    """The size of the grid Opacus's PRVAccountant would discretise on (as its
    `_get_domain` computes it), found with the cheap RDP bound it uses itself."""
    from opacus.accountants.analysis.prv import compute_safe_domain_size
    from opacus.accountants.analysis.prv.prvs import PoissonSubsampledGaussianPRV

    prvs = [PoissonSubsampledGaussianPRV(rate, noise) for noise, rate, _ in history]
    steps = [steps for _, _, steps in history]
    with _quiet_prv_internals():
        half_width = compute_safe_domain_size(
            prvs=prvs,
            max_self_compositions=steps,
            eps_error=PRV_EPS_ERROR,
            delta_error=delta_error,
        )
    mesh = PRV_EPS_ERROR / math.sqrt(sum(steps) * math.log(12 / delta_error) / 2)
    return 2 * float(half_width) / mesh


def _prv_epsilon(history: _History, delta: float) -> float:
    delta_error = delta / 1000  # Opacus's default
    try:
        points = _prv_grid_points(history, delta_error)
    except FloatingPointError as exc:
        raise AccountingError(
            f"the PRV accountant cannot size its grid at delta {delta:g} for these events ({exc})"
        ) from exc
    if not points <= PRV_MAX_GRID_POINTS:
        raise AccountingError(
            f"PRV accounting of these events would need a grid of {points:.3g} points"
            f" (at most {PRV_MAX_GRID_POINTS} allowed): their epsilon at delta {delta:g} is far"
            " beyond any meaningful guarantee; use the RDP accountant for such settings"
        )
    from opacus.accountants import PRVAccountant  # torch: loaded only where PRV is asked for

    accountant = PRVAccountant()
    accountant.history = history
    try:
        with _quiet_prv_internals():
            epsilon = accountant.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR)
    except (RuntimeError, ValueError, FloatingPointError) as exc:
        raise AccountingError(
            f"the PRV accountant cannot compute epsilon at delta {delta:g} for these events ({exc})"
        ) from exc
    if not math.isfinite(epsilon):
        raise AccountingError(
            f"the PRV accountant finds no finite epsilon at delta {delta:g} for these events;"
            " use the RDP accountant for such settings"
        )
    return float(epsilon)


_ACCOUNTANTS: Mapping[AccountantKind, Callable[[_History, float], float]] = {
    "rdp": _rdp_epsilon,
    "prv": _prv_epsilon,
}


def epsilon_of(
    events: Iterable[DpSgdEvent], *, delta: float, accountant: AccountantKind = "rdp"
) -> float:
    """The (epsilon, delta)-DP epsilon of all `events` composed; 0.0 for no events.

    Raises `AccountingError` where the PRV accountant cannot give a value (a setting
    whose epsilon is far beyond any meaningful guarantee).
    """
    if not 0 < delta < 1:
        raise DpConfigError(f"delta must be in (0, 1), got {delta}")
    compose = _ACCOUNTANTS.get(accountant)
    if compose is None:
        raise DpConfigError(f"accountant must be one of {sorted(_ACCOUNTANTS)}, got {accountant!r}")
    # Composition does not depend on order, so events of one mechanism are accounted as
    # one run of all their steps: the same epsilon, far less work for many rounds.
    steps_by_mechanism: dict[tuple[float, float], int] = {}
    for event in events:
        mechanism = (event.noise_multiplier, event.sample_rate)
        steps_by_mechanism[mechanism] = steps_by_mechanism.get(mechanism, 0) + event.steps
    if not steps_by_mechanism:
        return 0.0
    history = [(noise, rate, steps) for (noise, rate), steps in steps_by_mechanism.items()]
    return compose(history, delta)
