"""The audit of what else leaves a site: main's outputs are broken by the attacks, the
outputs sent now are not, and the audit says which epsilon it could refute at all."""

from __future__ import annotations

import math

from medfed.bench.dp_audit import epsilon_lower_bound, parse_args
from medfed.bench.dp_audit_outputs import (
    differencing_attack,
    fingerprint_confirmation,
    guesses_to_refute,
    refutable_ceiling,
)


def test_the_audit_is_sized_to_refute_epsilon_8_by_default() -> None:
    options = parse_args([])
    guesses = 2 * options.guesses_per_side
    assert refutable_ceiling(guesses, epsilon_lower_bound) >= 8.0
    assert options.canaries >= guesses
    # One guess fewer could not: the sizing is the exact binomial bound.
    assert epsilon_lower_bound(guesses_to_refute(8.0) - 1, guesses_to_refute(8.0) - 1) < 8.0


def test_the_differencing_attack_breaks_the_exact_loss_and_not_the_release() -> None:
    exact = differencing_attack(
        trials=300, noise_multiplier=None, seed=3, bound=epsilon_lower_bound
    )
    noised = differencing_attack(
        trials=300, noise_multiplier=20.0, seed=3, bound=epsilon_lower_bound
    )
    assert exact["accuracy"] == 1.0
    assert exact["empirical_epsilon_lower_bound"] == exact["max_refutable_epsilon"]
    # The release refutes no epsilon above what it accounts (with 95% confidence).
    accounted = noised["accounted_epsilon_per_release"]
    assert isinstance(accounted, float) and math.isfinite(accounted)
    assert noised["empirical_epsilon_lower_bound"] <= accounted


def test_a_candidate_value_is_confirmed_by_the_fingerprint_and_not_by_the_hmac() -> None:
    result = fingerprint_confirmation(seed=7, candidates=20)
    assert result["confirmed_true_value"] == {
        "main: data fingerprint": True,
        "now: site-secret HMAC": False,
    }
