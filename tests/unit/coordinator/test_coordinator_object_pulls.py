"""The ServerApp's object pulls wait at most 0.5 s for a part still in transit."""

from __future__ import annotations

import time
import warnings

import pytest

with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", r"'click\.utils\.get_\w+_stream' is deprecated", DeprecationWarning
    )
    from flwr.supercore.inflatable import inflatable_utils

from medfed.coordinator.object_pulls import shorten_object_pull_backoff


@pytest.fixture
def restore_defaults() -> object:
    saved = dict(inflatable_utils.pull_objects.__kwdefaults__ or {})
    yield saved
    inflatable_utils.pull_objects.__kwdefaults__ = saved


def test_backoff_is_capped_and_only_ever_shortened(restore_defaults: dict[str, float]) -> None:
    assert restore_defaults["initial_backoff"] == 1  # Flower 1.42's default, what we cap
    assert shorten_object_pull_backoff() == {"initial_backoff": 0.05, "backoff_cap": 0.5}
    assert shorten_object_pull_backoff(initial_s=0.2, cap_s=2.0) == {
        "initial_backoff": 0.05,
        "backoff_cap": 0.5,
    }


def test_a_missing_part_is_asked_for_again_within_the_cap(
    restore_defaults: dict[str, float],
) -> None:
    shorten_object_pull_backoff()
    asks: list[str] = []

    def pull(object_id: str) -> bytes:
        asks.append(object_id)
        if len(asks) < 4:  # in transit for three asks
            raise inflatable_utils.ObjectUnavailableError(object_id)
        return b"content"

    started = time.monotonic()
    got = inflatable_utils.pull_objects(["a"], pull_object_fn=pull)
    assert got == {"a": b"content"}
    assert len(asks) == 4
    assert time.monotonic() - started < 1.0  # Flower's defaults: 1 + 2 + 4 s
