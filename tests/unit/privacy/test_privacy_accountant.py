"""The accountant against Google's dp-accounting: its RDP accountant for ours, and its
privacy-loss-distribution (PLD) accountant, a tight numerical reference, for PRV."""

from __future__ import annotations

import itertools
import math

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from medfed.privacy.accountant import PRV_EPS_ERROR, AccountantKind, epsilon_of
from medfed.privacy.errors import AccountingError, DpConfigError
from medfed.privacy.events import DpSgdEvent

NOISES = (0.8, 1.2, 2.0)
RATES = (0.01, 0.05, 0.2)
STEPS = (10, 300, 2000)
GRID = [
    (noise, rate, steps, (1e-5, 1e-6)[i % 2])
    for i, (noise, rate, steps) in enumerate(itertools.product(NOISES, RATES, STEPS))
]

# Above this epsilon, dp-accounting drops the fractional orders below 2 (its series for
# them stops after 1000 terms) and so overstates epsilon; it is only an upper bound there.
# Such budgets are far outside any meaningful guarantee.
REFERENCE_EXACT_BELOW = 20.0


def reference_epsilon(events: list[DpSgdEvent], delta: float) -> float:
    accountant = RdpAccountant()
    for event in events:
        sampled = dp_event.PoissonSampledDpEvent(
            event.sample_rate, dp_event.GaussianDpEvent(event.noise_multiplier)
        )
        accountant.compose(sampled, event.steps)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(("noise", "rate", "steps", "delta"), GRID)
def test_epsilon_matches_dp_accounting(noise: float, rate: float, steps: int, delta: float) -> None:
    event = DpSgdEvent(noise_multiplier=noise, sample_rate=rate, steps=steps)
    ours = epsilon_of([event], delta=delta)
    reference = reference_epsilon([event], delta)
    if reference < REFERENCE_EXACT_BELOW:
        assert ours == pytest.approx(reference, rel=0.01)
    else:
        assert 0 < ours <= reference * 1.01


def test_issue_anchor_value() -> None:
    event = DpSgdEvent(noise_multiplier=1.5, sample_rate=0.04, steps=2250)
    assert epsilon_of([event], delta=1e-5) == pytest.approx(7.329, abs=0.01)
    assert epsilon_of([event], delta=1e-5, accountant="rdp") == pytest.approx(7.329, abs=0.01)
    assert reference_epsilon([event], 1e-5) == pytest.approx(7.329, abs=0.01)


def test_composition_of_different_events_matches_dp_accounting() -> None:
    first = DpSgdEvent(noise_multiplier=1.1, sample_rate=0.02, steps=500)
    second = DpSgdEvent(noise_multiplier=1.7, sample_rate=0.08, steps=120)
    composed = epsilon_of([first, second], delta=1e-5)
    assert composed == pytest.approx(reference_epsilon([first, second], 1e-5), rel=0.01)
    assert composed > max(epsilon_of([first], delta=1e-5), epsilon_of([second], delta=1e-5))


def test_splitting_steps_does_not_change_epsilon() -> None:
    whole = DpSgdEvent(noise_multiplier=1.3, sample_rate=0.05, steps=400)
    halves = [DpSgdEvent(noise_multiplier=1.3, sample_rate=0.05, steps=200)] * 2
    assert epsilon_of(halves, delta=1e-5) == pytest.approx(epsilon_of([whole], delta=1e-5))


def test_accepts_a_one_shot_iterable() -> None:
    event = DpSgdEvent(noise_multiplier=1.0, sample_rate=0.1, steps=50)
    from_generator = epsilon_of((e for e in [event, event]), delta=1e-5)
    assert from_generator == pytest.approx(epsilon_of([event, event], delta=1e-5))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_no_events_spend_nothing(accountant: AccountantKind) -> None:
    assert epsilon_of([], delta=1e-5, accountant=accountant) == 0.0


def test_smaller_delta_costs_more_epsilon() -> None:
    event = DpSgdEvent(noise_multiplier=1.0, sample_rate=0.05, steps=100)
    assert epsilon_of([event], delta=1e-7) > epsilon_of([event], delta=1e-5)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 1.5, math.nan])
def test_delta_out_of_range_is_refused(delta: float, accountant: AccountantKind) -> None:
    event = DpSgdEvent(noise_multiplier=1.0, sample_rate=0.05, steps=10)
    with pytest.raises(DpConfigError, match="delta"):
        epsilon_of([event], delta=delta, accountant=accountant)


def test_unknown_accountant_is_refused() -> None:
    event = DpSgdEvent(noise_multiplier=1.0, sample_rate=0.05, steps=10)
    with pytest.raises(DpConfigError, match="accountant must be one of"):
        epsilon_of([event], delta=1e-5, accountant="gdp")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("noise", "rate", "steps", "field"),
    [
        (0.0, 0.1, 1, "noise_multiplier"),
        (-1.0, 0.1, 1, "noise_multiplier"),
        (math.nan, 0.1, 1, "noise_multiplier"),
        (math.inf, 0.1, 1, "noise_multiplier"),
        (1.0, 0.0, 1, "sample_rate"),
        (1.0, 1.01, 1, "sample_rate"),
        (1.0, math.nan, 1, "sample_rate"),
        (1.0, 0.1, 0, "steps"),
        (1.0, 0.1, -3, "steps"),
    ],
)
def test_event_rejects_invalid_parameters(
    noise: float, rate: float, steps: int, field: str
) -> None:
    with pytest.raises(DpConfigError, match=field):
        DpSgdEvent(noise_multiplier=noise, sample_rate=rate, steps=steps)


def test_event_is_immutable() -> None:
    event = DpSgdEvent(noise_multiplier=1.0, sample_rate=1.0, steps=1)
    with pytest.raises(AttributeError):
        event.steps = 2  # type: ignore[misc]


# PRV against dp-accounting's PLD accountant. Both discretise the privacy loss and
# report a pessimistic epsilon; Opacus's PRV adds its whole error allowance
# (PRV_EPS_ERROR = 0.01) to its estimate. Measured over PRV_GRID: PRV - PLD lies in
# [0.0083, 0.0119], i.e. never below PLD and at most PRV_EPS_ERROR + 0.015% of PLD above
# it (at epsilon 0.1 that is 10% relative, at epsilon 60 0.02%). Stated tolerance: PLD <=
# PRV <= PLD + PRV_EPS_ERROR + PRV_ABOVE_PLD_REL * PLD.
PLD_DISCRETIZATION = 1e-3
PRV_ABOVE_PLD_REL = 0.002
PRV_NOISES = (0.8, 1.5, 2.5)
PRV_RATES = (0.01, 0.05, 0.2)
PRV_STEPS = (50, 500)
PRV_GRID = [
    pytest.param(
        noise,
        rate,
        steps,
        (1e-5, 1e-6)[i % 2],
        # The largest epsilons need the largest PRV grids (0.4 to 1 s each).
        marks=(pytest.mark.slow,) if rate == 0.2 and noise < 2 else (),
    )
    for i, (noise, rate, steps) in enumerate(itertools.product(PRV_NOISES, PRV_RATES, PRV_STEPS))
]


def pld_epsilon(events: list[DpSgdEvent], delta: float) -> float:
    accountant = PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    for event in events:
        sampled = dp_event.PoissonSampledDpEvent(
            event.sample_rate, dp_event.GaussianDpEvent(event.noise_multiplier)
        )
        accountant.compose(sampled, event.steps)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(("noise", "rate", "steps", "delta"), PRV_GRID)
def test_prv_matches_dp_accounting_pld_and_rdp_bounds_both(
    noise: float, rate: float, steps: int, delta: float
) -> None:
    event = DpSgdEvent(noise_multiplier=noise, sample_rate=rate, steps=steps)
    prv = epsilon_of([event], delta=delta, accountant="prv")
    pld = pld_epsilon([event], delta)
    assert pld <= prv <= pld + PRV_EPS_ERROR + PRV_ABOVE_PLD_REL * pld
    # RDP is an upper bound, looser than both numerical accountants.
    rdp = epsilon_of([event], delta=delta, accountant="rdp")
    assert rdp >= pld
    assert rdp >= prv


def test_prv_of_the_anchor_is_tighter_than_rdp() -> None:
    event = DpSgdEvent(noise_multiplier=1.5, sample_rate=0.04, steps=2250)
    prv = epsilon_of([event], delta=1e-5, accountant="prv")
    pld = pld_epsilon([event], 1e-5)
    assert pld <= prv <= pld + PRV_EPS_ERROR + PRV_ABOVE_PLD_REL * pld
    assert prv < 7.329 * 0.95


def test_prv_composition_of_different_events_matches_pld() -> None:
    first = DpSgdEvent(noise_multiplier=1.1, sample_rate=0.02, steps=500)
    second = DpSgdEvent(noise_multiplier=1.7, sample_rate=0.08, steps=120)
    prv = epsilon_of([first, second], delta=1e-5, accountant="prv")
    pld = pld_epsilon([first, second], 1e-5)
    assert pld <= prv <= pld + PRV_EPS_ERROR + PRV_ABOVE_PLD_REL * pld
    assert prv > epsilon_of([first], delta=1e-5, accountant="prv")


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_events_of_one_mechanism_compose_as_one_run(accountant: AccountantKind) -> None:
    rounds = [DpSgdEvent(noise_multiplier=1.2, sample_rate=0.05, steps=30)] * 3
    other = DpSgdEvent(noise_multiplier=2.0, sample_rate=0.05, steps=30)
    whole = DpSgdEvent(noise_multiplier=1.2, sample_rate=0.05, steps=90)
    interleaved = [rounds[0], other, rounds[1], rounds[2]]
    assert epsilon_of(interleaved, delta=1e-5, accountant=accountant) == pytest.approx(
        epsilon_of([whole, other], delta=1e-5, accountant=accountant), rel=1e-9
    )


def test_prv_refuses_settings_beyond_any_guarantee() -> None:
    hopeless = DpSgdEvent(noise_multiplier=0.01, sample_rate=0.05, steps=90)
    with pytest.raises(AccountingError, match="far beyond any meaningful guarantee"):
        epsilon_of([hopeless], delta=1e-5, accountant="prv")
