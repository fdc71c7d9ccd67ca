"""The SuperNode wrapper's capped waits: long sleeps are cut to the cap, short ones kept,
and every other `time` function is the real one."""

from __future__ import annotations

import importlib
import sys
import time

import pytest

from medfed.client.supernode import _CappedSleep, main


def test_sleeps_are_capped_and_other_time_functions_pass_through() -> None:
    capped = _CappedSleep(0.05)
    started = time.monotonic()
    capped.sleep(3)
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    capped.sleep(0.02)
    assert time.monotonic() - started >= 0.02
    assert capped.monotonic is time.monotonic and capped.time is time.time


def test_the_supernode_heartbeats_often_enough_for_flowers_shortest_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A killed SuperNode is held online (and refused again) for HEARTBEAT_PATIENCE
    # intervals after its last heartbeat: the wrapper announces Flower's shortest
    # interval, and the sender must then beat well inside the window it announced.
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as fleet
    import flwr.supernode.start_client_internal as internal
    from flwr.common.constant import (
        HEARTBEAT_BASE_MULTIPLIER,
        HEARTBEAT_CALL_TIMEOUT,
        HEARTBEAT_MIN_INTERVAL,
        HEARTBEAT_PATIENCE,
        HEARTBEAT_RANDOM_RANGE,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")  # the module

    patched = ((fleet, "HEARTBEAT_DEFAULT_INTERVAL"), (heartbeat, "HEARTBEAT_DEFAULT_INTERVAL"),
               (internal, "time"))  # fmt: skip
    for module, name in patched:
        monkeypatch.setattr(module, name, getattr(module, name))  # undone after the test
    monkeypatch.setattr(pull_objects, "__kwdefaults__", dict(pull_objects.__kwdefaults__ or {}))
    ran: list[list[str]] = []
    monkeypatch.setattr(cli, "flower_supernode", lambda: ran.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["client.supernode", "0.2", "--superlink", "x:1"])

    main()

    assert ran == [["flower-supernode", "--superlink", "x:1"]]
    assert fleet.HEARTBEAT_DEFAULT_INTERVAL == HEARTBEAT_MIN_INTERVAL == 10
    assert heartbeat.HEARTBEAT_DEFAULT_INTERVAL == HEARTBEAT_MIN_INTERVAL
    longest_gap_s = (HEARTBEAT_MIN_INTERVAL - HEARTBEAT_CALL_TIMEOUT) * (
        HEARTBEAT_BASE_MULTIPLIER + HEARTBEAT_RANDOM_RANGE[1]
    ) + HEARTBEAT_CALL_TIMEOUT
    assert longest_gap_s < HEARTBEAT_PATIENCE * HEARTBEAT_MIN_INTERVAL / 2
