"""The SuperNode wrapper's capped waits: long sleeps are cut to the cap, short ones kept,
and every other `time` function is the real one."""

from __future__ import annotations

import time

from client.supernode import _CappedSleep


def test_sleeps_are_capped_and_other_time_functions_pass_through() -> None:
    capped = _CappedSleep(0.05)
    started = time.monotonic()
    capped.sleep(3)
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    capped.sleep(0.02)
    assert time.monotonic() - started >= 0.02
    assert capped.monotonic is time.monotonic and capped.time is time.time
