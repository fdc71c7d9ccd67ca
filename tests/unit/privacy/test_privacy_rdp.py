"""The vectorised RDP curve against Opacus's own per-order series (the previous
implementation), and calibration on it against calibration on Opacus's accountant."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from medfed.privacy import accountant
from medfed.privacy.calibration import calibrate_noise
from medfed.privacy.events import DpSgdEvent
from medfed.privacy.rdp import ORDERS, rdp_per_step

RATES = (1e-4, 1e-3, 0.01, 0.05, 0.2, 0.5, 0.9, 1.0)
NOISES = (0.3, 0.5, 0.8, 1.0, 1.5, 3.0, 10.0, 100.0)


def test_orders_are_opacus_defaults() -> None:
    assert list(ORDERS) == list(RDPAccountant.DEFAULT_ALPHAS)


@pytest.mark.parametrize(("rate", "noise"), list(itertools.product(RATES, NOISES)))
def test_rdp_curve_matches_opacus(rate: float, noise: float) -> None:
    ours = rdp_per_step(rate, noise)
    opacus = np.asarray(compute_rdp(q=rate, noise_multiplier=noise, steps=1, orders=list(ORDERS)))
    # log(A) near 0 is only known to some hundred ulps of 1 (both series sum many terms
    # near 1, in different orders), and dividing by (order - 1) >= 0.1 amplifies that
    # tenfold: floating-point noise (at rate 0.5, noise 100, order 1.1 both float series
    # lie ~1e-9 above the 50-digit mpmath value, 1.3e-12 apart). Epsilons agree to 1e-9.
    np.testing.assert_allclose(ours, opacus, rtol=1e-9, atol=1e-11)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        for steps in (1, 30, 3000, 100_000):
            ours_eps, _ = get_privacy_spent(orders=list(ORDERS), rdp=ours * steps, delta=1e-5)
            opacus_eps, _ = get_privacy_spent(orders=list(ORDERS), rdp=opacus * steps, delta=1e-5)
            assert ours_eps == pytest.approx(opacus_eps, rel=1e-9)


def test_rdp_curve_is_read_only() -> None:
    with pytest.raises(ValueError):
        rdp_per_step(0.05, 1.0)[0] = 0.0


def _opacus_rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """The previous implementation of `privacy.accountant._rdp_epsilon`."""
    reference = RDPAccountant()
    reference.history = history
    return float(reference.get_epsilon(delta=delta))


@pytest.mark.parametrize(
    ("target", "rate", "steps", "prior"),
    [
        (8.0, 0.05, 30, ()),
        (2.0, 0.01, 300, ()),
        (1.0, 0.2, 10, ()),
        (8.0, 0.05, 30, (DpSgdEvent(noise_multiplier=1.1, sample_rate=0.05, steps=60),)),
    ],
)
def test_calibration_equals_calibration_on_opacus(
    monkeypatch: pytest.MonkeyPatch,
    target: float,
    rate: float,
    steps: int,
    prior: tuple[DpSgdEvent, ...],
) -> None:
    def calibrate() -> float:
        return calibrate_noise(
            target_epsilon=target,
            delta=1e-5,
            sample_rate=rate,
            steps=steps,
            n_patients=3000,
            prior_events=prior,
        )

    ours = calibrate()
    events = (*prior, DpSgdEvent(noise_multiplier=ours, sample_rate=rate, steps=steps))
    ours_eps = accountant.epsilon_of(events, delta=1e-5)
    monkeypatch.setitem(accountant._ACCOUNTANTS, "rdp", _opacus_rdp_epsilon)
    assert calibrate() == ours
    assert accountant.epsilon_of(events, delta=1e-5) == pytest.approx(ours_eps, rel=1e-9)
