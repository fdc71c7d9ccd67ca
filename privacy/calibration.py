"""The smallest DP-SGD noise that keeps a study within its privacy budget.

`calibrate_noise` searches on the accountant itself (a bracketing root search, then
rounding up), so the noise it returns is exactly as safe as the accounting that will
later be recorded for it: composed after any earlier spending, its epsilon at `delta`
never exceeds the target. Pure accounting, like `privacy.accountant`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal

from medfed.privacy.accountant import AccountantKind, epsilon_of
from medfed.privacy.errors import AccountingError, DpConfigError, InfeasibleBudgetError
from medfed.privacy.events import DpSgdEvent

MAX_NOISE_MULTIPLIER = 100.0
"""No budget is met by more noise than this: beyond it training learns nothing useful."""

MIN_NOISE_MULTIPLIER = 0.01
"""The search goes no lower: a budget that even this little noise meets protects nobody."""

SIGNIFICANT_DIGITS = 4
"""The result is rounded up to this many significant digits, so it is never below the
exact minimum and reads cleanly in configuration and logs."""

_RELATIVE_TOLERANCE = 1e-5
"""The search stops when its bracket, or epsilon's gap below the target, is this narrow
(relative): well inside the rounding step."""


def poisson_rate(patients: int, sample_rate: float) -> float:
    """The sampling rate Opacus really uses for `sample_rate` over `patients` rows.

    Opacus samples each row with probability 1 / (batches per epoch) of the loader it
    wraps; `make_private` builds that loader with this batch size. (Here, not in
    `privacy.dpsgd`, so that sizing a site needs no torch.)
    """
    batch_size = max(1, round(sample_rate * patients))
    return 1.0 / math.ceil(patients / batch_size)


def _round_up(value: float) -> Decimal:
    """`value` rounded up to `SIGNIFICANT_DIGITS` significant digits."""
    exact = Decimal(value)
    step = Decimal(1).scaleb(exact.adjusted() - SIGNIFICANT_DIGITS + 1)
    return exact.quantize(step, rounding=ROUND_CEILING)


def _next_up(value: Decimal) -> Decimal:
    """The next value after `value` that has `SIGNIFICANT_DIGITS` significant digits."""
    return _round_up(float(value + Decimal(1).scaleb(value.adjusted() - SIGNIFICANT_DIGITS + 1)))


def _check_budget(*, target_epsilon: float, delta: float, n_patients: int) -> None:
    if not math.isfinite(target_epsilon):
        raise DpConfigError(f"target epsilon must be finite, got {target_epsilon}")
    if target_epsilon <= 0:
        raise InfeasibleBudgetError(
            f"target epsilon {target_epsilon:g} is not positive, and every training step"
            " spends some privacy"
        )
    if n_patients < 1:
        raise DpConfigError(f"n_patients must be at least 1, got {n_patients}")
    if not 0 < delta < 1:
        raise DpConfigError(f"delta must be in (0, 1), got {delta}")
    if delta >= 1 / n_patients:
        # With delta >= 1/N, a mechanism that publishes one random patient's row whole
        # would satisfy the guarantee.
        raise InfeasibleBudgetError(
            f"delta {delta:g} is not below 1/N = 1/{n_patients} for {n_patients} patients"
        )


@dataclass(frozen=True)
class _Probe:
    """The accountant at one noise multiplier: log(epsilon / target), +inf if unaccountable."""

    noise: float
    excess: float


def _bracket(
    excess: Callable[[float], float],
    *,
    start: float,
    factor: float,
    ceiling: _Probe,
    target_epsilon: float,
) -> tuple[_Probe, _Probe]:
    """Probes (low, high) with low over the target and high within it: `ceiling` (the
    most noise allowed, already found within) if `start` is over, else the first of
    `start` divided by `factor` again and again that is over, and the probe before it."""
    probe = _Probe(start, excess(start))
    if probe.excess > 0:
        return probe, ceiling
    while True:
        high, noise = probe, probe.noise / factor
        if noise < MIN_NOISE_MULTIPLIER:
            raise DpConfigError(
                f"target epsilon {target_epsilon:g} is met even by a noise multiplier of"
                f" {high.noise:.3g}: such a budget protects nobody, choose a smaller one"
            )
        probe = _Probe(noise, excess(noise))
        if probe.excess > 0:
            return probe, high


def _solve(excess: Callable[[float], float], low: _Probe, high: _Probe) -> float:
    """A noise multiplier within the target and within `_RELATIVE_TOLERANCE` of the
    smallest one, by the Illinois variant of regula falsi on log(noise): log(epsilon) is
    close to linear there, so a handful of probes do what bisection needs twenty for.
    The bracket is kept throughout, so the answer is always the upper, safe end."""
    f_low, f_high = low.excess, high.excess
    moved = ""  # which end the last probe replaced
    while high.noise - low.noise > _RELATIVE_TOLERANCE * high.noise:
        if high.excess > -_RELATIVE_TOLERANCE:
            break  # epsilon is already this close below the target
        x_low, x_high = math.log(low.noise), math.log(high.noise)
        if math.isfinite(f_low):
            x = (x_low * f_high - x_high * f_low) / (f_high - f_low)
        else:
            x = (x_low + x_high) / 2
        probe = _Probe(math.exp(x), excess(math.exp(x)))
        if probe.excess > 0:
            low, f_low = probe, probe.excess
            if moved == "low":
                f_high /= 2  # Illinois: an end kept twice in a row would stall the search
            moved = "low"
        else:
            high, f_high = probe, probe.excess
            if moved == "high":
                f_low /= 2
            moved = "high"
    return high.noise


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    n_patients: int,
    accountant: AccountantKind = "rdp",
    prior_events: Sequence[DpSgdEvent] = (),
) -> float:
    """The smallest noise multiplier for `steps` more DP-SGD steps at `sample_rate`
    that keeps the epsilon of `prior_events` plus those steps at or below
    `target_epsilon` at `delta`, rounded up to 4 significant digits.

    Raises `InfeasibleBudgetError` when no such noise exists within
    `MAX_NOISE_MULTIPLIER`, the prior events alone spend the target, the target is not
    positive, or `delta` is not below 1/`n_patients`.
    """
    _check_budget(target_epsilon=target_epsilon, delta=delta, n_patients=n_patients)
    DpSgdEvent(noise_multiplier=1.0, sample_rate=sample_rate, steps=steps)  # validates both
    prior = tuple(prior_events)
    spent = epsilon_of(prior, delta=delta, accountant=accountant)
    if spent >= target_epsilon:
        raise InfeasibleBudgetError(
            f"the prior events already spend epsilon {spent:.4g} at delta {delta:g},"
            f" which leaves nothing of the target epsilon {target_epsilon:g}"
        )

    def epsilon_at(noise: float) -> float:
        event = DpSgdEvent(noise_multiplier=noise, sample_rate=sample_rate, steps=steps)
        return epsilon_of((*prior, event), delta=delta, accountant=accountant)

    def excess(noise: float) -> float:
        with warnings.catch_warnings():
            # A search probe, not a result: where its RDP optimum lies does not matter.
            warnings.filterwarnings("ignore", message="Optimal order is the")
            try:
                return math.log(epsilon_at(noise) / target_epsilon)
            except AccountingError:
                # Only settings with an epsilon far beyond any budget fail to account;
                # counting them as over the target can only make the answer noisier.
                return math.inf

    ceiling = _Probe(MAX_NOISE_MULTIPLIER, excess(MAX_NOISE_MULTIPLIER))
    if ceiling.excess > 0:
        after = f" after prior spending of epsilon {spent:.4g}" if prior else ""
        raise InfeasibleBudgetError(
            f"epsilon {target_epsilon:g} is too small for {steps} steps at rate"
            f" {sample_rate:g}{after}: it would need a noise multiplier above"
            f" {MAX_NOISE_MULTIPLIER:g}"
        )
    start, factor = 1.0, 2.0
    if accountant != "rdp":
        # RDP bounds the other accountants from above: its answer is a near, cheap start.
        # Being looser, it may see no room where the tighter accountant does.
        with contextlib.suppress(InfeasibleBudgetError):
            start = calibrate_noise(
                target_epsilon=target_epsilon,
                delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                n_patients=n_patients,
                prior_events=prior,
            )
            factor = 4 / 3
    low, high = _bracket(
        excess,
        start=min(start, MAX_NOISE_MULTIPLIER),
        factor=factor,
        ceiling=ceiling,
        target_epsilon=target_epsilon,
    )
    noise = _round_up(_solve(excess, low, high))
    # Rounding up keeps a monotone accountant within the target; a discretised one
    # (PRV) may wobble by a grid step, so the result is checked, not assumed.
    while float(noise) < MAX_NOISE_MULTIPLIER and excess(float(noise)) > 0:
        noise = _next_up(noise)
    return min(float(noise), MAX_NOISE_MULTIPLIER)
