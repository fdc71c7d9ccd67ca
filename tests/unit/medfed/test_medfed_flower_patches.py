"""Flower's door: the patches (object pulls wait at most 0.5 s for a part still in
transit; the SuperNode's polls are paced, fast when busy and slow when idle, and it
heartbeats often enough to rejoin fast) and the flwr version check."""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
import time
import warnings
from importlib import metadata
from pathlib import Path

import pytest

with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", r"'click\.utils\.get_\w+_stream' is deprecated", DeprecationWarning
    )
    from medfed.client.supernode import main as supernode_main
    from medfed.common.pace import MessageMark, Pace
    from medfed.flower import FlowerVersionError, require_supported_flwr, testing, version
    from medfed.flower.patches import PacedSleep, paced_pulls, shorten_object_pull_backoff
    from medfed.flower.testing import inflatable_utils


def _stock_defaults() -> dict[str, object]:
    """`pull_objects`' backoff defaults as Flower's source writes them (another test in
    this process may have shortened the live ones already)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(inflatable_utils.pull_objects)))
    function = tree.body[0]
    assert isinstance(function, ast.FunctionDef)
    arguments = function.args
    return {
        argument.arg: getattr(inflatable_utils, default.id)
        if isinstance(default, ast.Name)
        else ast.literal_eval(default)
        for argument, default in zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True)
        if argument.arg in ("initial_backoff", "backoff_cap") and default is not None
    }


@pytest.fixture
def restore_defaults() -> object:
    saved = dict(inflatable_utils.pull_objects.__kwdefaults__ or {})
    stock = {**saved, **_stock_defaults()}
    inflatable_utils.pull_objects.__kwdefaults__ = dict(stock)
    yield stock
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


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_paced_supernode_waits_for_work_briefly_while_busy_and_long_when_idle() -> None:
    clock = FakeClock()
    pace = Pace(busy_s=0.01, idle_s=0.3, busy_window_s=60.0, clock=clock)
    paced = PacedSleep(pace)

    def seconds_of(sleep: float) -> float:
        started = time.monotonic()
        paced.sleep(sleep)
        return time.monotonic() - started

    assert seconds_of(3) < 0.2  # Flower's wait for work, just after a message
    assert seconds_of(0.5) < 0.2  # a wait for a reply: always capped at the busy pace
    clock.now += 61  # a minute without a message
    assert 0.3 <= seconds_of(3) < 1.0
    assert seconds_of(0.5) < 0.2
    assert seconds_of(0.005) >= 0.005  # a shorter wait is never lengthened
    assert paced.monotonic is time.monotonic and paced.time is time.time


def test_every_message_the_supernode_pulls_makes_it_busy_and_marks_it(tmp_path: Path) -> None:
    clock = FakeClock()
    pace = Pace(busy_s=0.2, idle_s=2.0, busy_window_s=60.0, clock=clock)
    mark = MessageMark(tmp_path)
    answers = iter([None, 17, None])
    pull = paced_pulls(lambda **_: next(answers), pace, mark)
    clock.now += 100
    assert pull(state=None) is None and pace.wait_s() == 2.0  # nothing came: still idle
    assert mark.stamp() == 0  # and the executor is not woken
    assert pull(state=None) == 17 and pace.wait_s() == 0.2  # a run's message: busy
    assert mark.stamp() > 0  # the executor asks for its task now
    clock.now += 59
    assert pull(state=None) is None and pace.wait_s() == 0.2
    clock.now += 2
    assert pace.wait_s() == 2.0


@pytest.mark.parametrize(("busy", "idle"), [(0.0, 1.0), (2.0, 1.0)])
def test_a_pace_whose_idle_wait_is_shorter_than_its_busy_one_is_refused(
    busy: float, idle: float
) -> None:
    with pytest.raises(ValueError, match="busy_s <= idle_s"):
        Pace(busy_s=busy, idle_s=idle)


def test_the_supernode_heartbeats_often_enough_for_flowers_shortest_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A killed SuperNode is held online (and refused again) for HEARTBEAT_PATIENCE
    # intervals after its last heartbeat: the wrapper announces Flower's shortest
    # interval, and the sender must then beat well inside the window it announced.
    from flwr.common.constant import (
        HEARTBEAT_BASE_MULTIPLIER,
        HEARTBEAT_CALL_TIMEOUT,
        HEARTBEAT_MIN_INTERVAL,
        HEARTBEAT_PATIENCE,
        HEARTBEAT_RANDOM_RANGE,
    )

    fleet, heartbeat = testing.fleet_connection_module, testing.heartbeat_module
    internal, cli = testing.supernode_internal_module, testing.supernode_cli_module
    patched = ((fleet, "HEARTBEAT_DEFAULT_INTERVAL"), (heartbeat, "HEARTBEAT_DEFAULT_INTERVAL"),
               (internal, "time"), (internal, "_pull_and_store_message"))  # fmt: skip
    for module, name in patched:
        monkeypatch.setattr(module, name, getattr(module, name))  # undone after the test
    pull_objects = inflatable_utils.pull_objects
    monkeypatch.setattr(pull_objects, "__kwdefaults__", dict(pull_objects.__kwdefaults__ or {}))
    ran: list[list[str]] = []
    monkeypatch.setattr(cli, "flower_supernode", lambda: ran.append(list(sys.argv)))
    argv = ["medfed.client.supernode", "0.2", "2.5", "--superlink", "x:1"]
    monkeypatch.setattr(sys, "argv", argv)

    supernode_main()

    assert ran == [["flower-supernode", "--superlink", "x:1"]]
    assert isinstance(internal.time, PacedSleep)
    assert (internal.time.pace.busy_s, internal.time.pace.idle_s) == (0.2, 2.5)
    assert internal._pull_and_store_message.__wrapped__ is not None
    assert pull_objects.__kwdefaults__["backoff_cap"] == 0.2
    assert fleet.HEARTBEAT_DEFAULT_INTERVAL == HEARTBEAT_MIN_INTERVAL == 10
    assert heartbeat.HEARTBEAT_DEFAULT_INTERVAL == HEARTBEAT_MIN_INTERVAL
    longest_gap_s = (HEARTBEAT_MIN_INTERVAL - HEARTBEAT_CALL_TIMEOUT) * (
        HEARTBEAT_BASE_MULTIPLIER + HEARTBEAT_RANDOM_RANGE[1]
    ) + HEARTBEAT_CALL_TIMEOUT
    assert longest_gap_s < HEARTBEAT_PATIENCE * HEARTBEAT_MIN_INTERVAL / 2


@pytest.mark.parametrize("installed", ["1.42.0", "1.42.7", "1.42"])
def test_the_supported_release_line_passes(installed: str) -> None:
    assert require_supported_flwr(installed) == installed
    assert require_supported_flwr() == metadata.version("flwr")


@pytest.mark.parametrize("installed", ["1.43.0", "1.41.2", "2.0.0", "1.420.0"])
def test_another_flwr_fails_with_one_line_naming_both_versions(installed: str) -> None:
    with pytest.raises(FlowerVersionError) as caught:
        require_supported_flwr(installed)
    message = str(caught.value)
    assert "\n" not in message
    assert f"flwr {installed} is installed" in message and "flwr==1.42.*" in message


def test_the_cli_turns_an_unsupported_flwr_into_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import typer

    from medfed.cli_common import guard

    monkeypatch.setattr(version, "flwr_version", lambda: "1.43.1")
    with pytest.raises(typer.Exit) as exited:
        guard(require_supported_flwr)
    assert exited.value.exit_code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("medfed: error: flwr 1.43.1 is installed, but medfed uses flwr 1.42.x")
    monkeypatch.setattr(version, "flwr_version", lambda: None)
    with pytest.raises(FlowerVersionError, match="flwr is not installed"):
        require_supported_flwr()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["0.2"], "usage"),
        (["fast", "2"], "usage"),
        (["0.2", "0.1"], "idle poll interval must be between 0.2"),
        (["0.2", "60"], "idle poll interval must be between 0.2"),
        (["5", "6"], "busy poll interval"),
    ],
)
def test_the_paced_supernode_refuses_bad_intervals_in_one_line(
    monkeypatch: pytest.MonkeyPatch, args: list[str], expected: str
) -> None:
    monkeypatch.setattr(sys, "argv", ["medfed.client.supernode", *args, "--superlink", "x:1"])
    with pytest.raises(SystemExit) as caught:
        supernode_main()
    assert expected in str(caught.value) and "\n" not in str(caught.value)
