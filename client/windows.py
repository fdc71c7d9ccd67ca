"""Training windows: when a site allows training, as `[[windows]]` tables in `site.toml`.

A window is a set of weekdays, a start and an end wall-clock time, and an IANA time
zone. The site is in a window at an instant when the zone's wall clock, at that
instant, reads a time in `[start, end)` on a listed day; a window whose end is not
after its start runs past midnight into the next day (`start = end` means 24 hours).
Defined on the wall clock, the rule stays right across DST changes: a window at
02:30 does not happen on the night that skips 02:30, and one at 01:30 happens twice
on the night that repeats it. No windows configured means always in a window.

The functions below are pure: `now` is passed in, so tests can walk the calendar.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
HORIZON = dt.timedelta(days=9)
"""How far ahead a window end or start is looked for (a weekly calendar repeats in 7)."""
_STEP = dt.timedelta(seconds=1)
_UTC = dt.UTC


class TrainingWindow(BaseModel):
    """One `[[windows]]` table: `days = ["mon", ...]`, `start = "22:00"`, `end = "06:00"`,
    `timezone = "Europe/Berlin"`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    days: tuple[Weekday, ...] = Field(min_length=1)
    start: dt.time
    end: dt.time
    timezone: str

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA time zone {value!r}") from exc
        return value

    @field_validator("start", "end")
    @classmethod
    def _naive_minutes(cls, value: dt.time) -> dt.time:
        if value.tzinfo is not None or value.second or value.microsecond:
            raise ValueError("give a local time as HH:MM, without seconds or a UTC offset")
        return value

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def contains(self, now: dt.datetime) -> bool:
        """Whether the wall clock of this window's zone at instant `now` is inside it."""
        local = now.astimezone(self.zone)
        day = WEEKDAYS[local.weekday()]
        yesterday = WEEKDAYS[(local.weekday() - 1) % 7]
        clock = local.time().replace(tzinfo=None)
        if self.start < self.end:
            return day in self.days and self.start <= clock < self.end
        return (day in self.days and clock >= self.start) or (
            yesterday in self.days and clock < self.end
        )


def _aware(now: dt.datetime) -> dt.datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("`now` must be timezone-aware")
    return now.astimezone(_UTC)


def in_window(windows: Sequence[TrainingWindow], now: dt.datetime) -> bool:
    """True if training is allowed at instant `now` (always, when no window is configured)."""
    moment = _aware(now)
    return not windows or any(window.contains(moment) for window in windows)


def _offset_changes(zone: ZoneInfo, start: dt.datetime, end: dt.datetime) -> Iterator[dt.datetime]:
    """Instants in [start, end) where `zone`'s UTC offset changes (to the second)."""
    hour = dt.timedelta(hours=1)
    moment = start
    while moment < end:
        later = moment + hour
        if moment.astimezone(zone).utcoffset() != later.astimezone(zone).utcoffset():
            low, high = moment, later  # offset(low) != offset(high): bisect to the second
            while high - low > _STEP:
                middle = low + (high - low) / 2
                middle = middle.replace(microsecond=0)
                if middle.astimezone(zone).utcoffset() == low.astimezone(zone).utcoffset():
                    low = middle
                else:
                    high = middle
            yield high
        moment = later


def _boundaries(windows: Sequence[TrainingWindow], now: dt.datetime) -> list[dt.datetime]:
    """Every instant after `now`, within the horizon, where `in_window` may change: each
    window's start and end on every day (both readings of a repeated hour), and each
    change of a zone's offset (where a skipped hour moves a start)."""
    found: set[dt.datetime] = set()
    end = now + HORIZON
    for window in windows:
        zone = window.zone
        first = (now - dt.timedelta(days=1)).astimezone(zone).date()
        for offset in range(HORIZON.days + 2):
            day = first + dt.timedelta(days=offset)
            for clock in (window.start, window.end):
                for fold in (0, 1):
                    local = dt.datetime.combine(day, clock, tzinfo=zone).replace(fold=fold)
                    found.add(local.astimezone(_UTC))
        found.update(_offset_changes(zone, now, end))
    return sorted(moment for moment in found if now < moment <= end)


def _next_change(
    windows: Sequence[TrainingWindow], now: dt.datetime, *, rising: bool
) -> dt.datetime | None:
    for moment in _boundaries(windows, now):
        if (
            in_window(windows, moment) is rising
            and in_window(windows, moment - _STEP) is not rising
        ):
            return moment
    return None


def window_end(windows: Sequence[TrainingWindow], now: dt.datetime) -> dt.datetime | None:
    """When the window the site is in at `now` closes (overlapping and back-to-back
    windows count as one); None when not in a window, or when no close is in sight
    (no windows, or windows round the clock)."""
    moment = _aware(now)
    if not windows or not in_window(windows, moment):
        return None
    return _next_change(windows, moment, rising=False)


def next_window_start(windows: Sequence[TrainingWindow], now: dt.datetime) -> dt.datetime | None:
    """The first instant after `now` at which a window opens (after the current one
    closed, if in one now); None when no windows are configured or none opens within
    the horizon."""
    moment = _aware(now)
    if not windows:
        return None
    return _next_change(windows, moment, rising=True)
