"""Training windows against a brute-force reference: walk the clock minute by minute and
read the wall clock in the window's zone, across DST changes (skipped and repeated hours,
and Lord Howe's 30-minute shift)."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from medfed.client.windows import WEEKDAYS, TrainingWindow, in_window, next_window_start, window_end

UTC = dt.UTC
ZONES = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata", "UTC"]
# Instants near DST changes of those zones, so the property tests cross them often.
TRANSITIONS = [
    dt.datetime(2026, 3, 29, 1, 0, tzinfo=UTC),  # Berlin springs forward
    dt.datetime(2026, 10, 25, 1, 0, tzinfo=UTC),  # Berlin falls back
    dt.datetime(2026, 3, 8, 7, 0, tzinfo=UTC),  # New York springs forward
    dt.datetime(2026, 11, 1, 6, 0, tzinfo=UTC),  # New York falls back
    dt.datetime(2026, 4, 4, 15, 0, tzinfo=UTC),  # Lord Howe: -30 min
    dt.datetime(2026, 10, 3, 15, 30, tzinfo=UTC),  # Lord Howe: +30 min
]
MINUTE = dt.timedelta(minutes=1)


def reference_in_window(windows: list[TrainingWindow], now: dt.datetime) -> bool:
    """The definition, written out plainly: the wall clock in the zone is in [start, end)."""
    if not windows:
        return True
    for window in windows:
        local = now.astimezone(ZoneInfo(window.timezone))
        minutes = local.hour * 60 + local.minute
        start = window.start.hour * 60 + window.start.minute
        end = window.end.hour * 60 + window.end.minute
        today = WEEKDAYS[local.weekday()] in window.days
        yesterday = WEEKDAYS[(local.weekday() - 1) % 7] in window.days
        if start < end and today and start <= minutes < end:
            return True
        if start >= end and ((today and minutes >= start) or (yesterday and minutes < end)):
            return True
    return False


def reference_next(windows: list[TrainingWindow], now: dt.datetime, *, rising: bool,
                   limit: dt.timedelta) -> dt.datetime | None:  # fmt: skip
    moment = now.replace(second=0, microsecond=0) + MINUTE
    while moment <= now + limit:
        before = reference_in_window(windows, moment - MINUTE)
        if reference_in_window(windows, moment) is rising and before is not rising:
            return moment
        moment += MINUTE
    return None


times = st.times().map(lambda t: t.replace(second=0, microsecond=0, tzinfo=None))
windows_strategy = st.lists(
    st.builds(
        TrainingWindow,
        days=st.lists(st.sampled_from(WEEKDAYS), min_size=1, max_size=7, unique=True).map(tuple),
        start=times,
        end=times,
        timezone=st.sampled_from(ZONES),
    ),
    min_size=1,
    max_size=2,
)
instants = st.builds(
    lambda base, minutes: base + dt.timedelta(minutes=minutes),
    st.sampled_from(TRANSITIONS),
    st.integers(-36 * 60, 36 * 60),
) | st.datetimes(
    min_value=dt.datetime(2020, 1, 1), max_value=dt.datetime(2035, 1, 1), timezones=st.just(UTC)
)


@settings(max_examples=300, deadline=None)
@given(windows_strategy, instants)
def test_in_window_matches_the_wall_clock(windows: list[TrainingWindow], now: dt.datetime) -> None:
    assert in_window(windows, now) == reference_in_window(windows, now)


LIMIT = dt.timedelta(days=8)


@settings(max_examples=40, deadline=None)
@given(windows_strategy, instants.map(lambda t: t.replace(second=0, microsecond=0)))
def test_next_start_and_window_end_match_a_minute_by_minute_walk(
    windows: list[TrainingWindow], now: dt.datetime
) -> None:
    expected_start = reference_next(windows, now, rising=True, limit=LIMIT)
    found_start = next_window_start(windows, now)
    if expected_start is not None:
        assert found_start == expected_start
    if in_window(windows, now):
        expected_end = reference_next(windows, now, rising=False, limit=LIMIT)
        found_end = window_end(windows, now)
        if expected_end is not None:
            assert found_end == expected_end
    else:
        assert window_end(windows, now) is None


def _window(start: str, end: str, zone: str = "Europe/Berlin", days: tuple[str, ...] = WEEKDAYS
            ) -> TrainingWindow:  # fmt: skip
    return TrainingWindow.model_validate(
        {"days": days, "start": start, "end": end, "timezone": zone}
    )


def test_a_night_window_on_the_night_berlin_skips_an_hour() -> None:
    night = [_window("02:30", "03:30")]  # 02:00-03:00 does not happen on 29 March 2026
    before = dt.datetime(2026, 3, 28, 23, 0, tzinfo=UTC)
    opens = next_window_start(night, before)
    assert opens == dt.datetime(2026, 3, 29, 1, 0, tzinfo=UTC)  # 03:00 CEST, the jump
    assert window_end(night, opens) == dt.datetime(2026, 3, 29, 1, 30, tzinfo=UTC)


def test_a_window_in_the_repeated_hour_happens_twice() -> None:
    window = [_window("02:15", "02:45")]  # 25 October 2026: 02:00-03:00 happens twice
    first = next_window_start(window, dt.datetime(2026, 10, 24, 22, 0, tzinfo=UTC))
    assert first == dt.datetime(2026, 10, 25, 0, 15, tzinfo=UTC)
    second = next_window_start(window, first)
    assert second == dt.datetime(2026, 10, 25, 1, 15, tzinfo=UTC)


def test_no_windows_means_always_and_no_end() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=UTC)
    assert in_window([], now) and window_end([], now) is None and next_window_start([], now) is None


def test_round_the_clock_windows_have_no_end() -> None:
    assert window_end([_window("00:00", "00:00")], dt.datetime(2026, 5, 1, tzinfo=UTC)) is None


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"timezone": "Mars/Olympus"}, "unknown IANA time zone"),
        ({"days": ["funday"]}, "days"),
        ({"start": "25:00"}, "start"),
        ({"start": "10:00:30"}, "HH:MM"),
        ({"days": []}, "days"),
    ],
)
def test_a_bad_window_names_the_key(changes: dict[str, object], match: str) -> None:
    values = {"days": ["mon"], "start": "22:00", "end": "06:00", "timezone": "UTC", **changes}
    with pytest.raises(ValidationError, match=match):
        TrainingWindow.model_validate(values)


def test_naive_instants_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        in_window([_window("01:00", "02:00")], dt.datetime(2026, 1, 1))
