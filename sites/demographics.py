"""Age and sex from what a hospital's patient records hold, the same for every format.

Age is in completed years at the dataset's index date (the clinical convention: a
patient born 1950-03-04 is 73 on 2024-03-03 and 74 on 2024-03-04). A birth date known
only to the year is taken as 1 July of that year, one known to the month as its 15th
(OMOP `year_of_birth` without `month_of_birth`/`day_of_birth`, FHIR partial dates),
so the age is off by at most half a year either way, never systematically.
"""

from __future__ import annotations

import datetime as dt
import re

OMOP_GENDER: dict[str, str] = {"8507": "male", "8532": "female"}
"""OMOP standard gender concepts, named as FHIR's `Patient.gender` values."""
UNKNOWN_GENDER = frozenset({"unknown", "0", "8551", "8570", ""})
"""Values that say the sex is not known: a missing value, not a problem."""

_PARTIAL = re.compile(r"^(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?$")


class BirthDateError(ValueError):
    """A birth date that cannot be read or lies after the index date."""


def birth_date(year: object, month: object = None, day: object = None) -> dt.date:
    """The birth date from its parts (month or day may be missing: see the module)."""
    try:
        y = int(str(year).strip().removesuffix(".0"))
        m = None if _blank(month) else int(str(month).strip().removesuffix(".0"))
        d = None if _blank(day) else int(str(day).strip().removesuffix(".0"))
        if m is None:
            return dt.date(y, 7, 1)
        return dt.date(y, m, 15 if d is None else d)
    except ValueError as exc:
        raise BirthDateError(f"birth date {year}-{month}-{day} is not a date") from exc


def parse_birth_date(value: object) -> dt.date:
    """A FHIR `birthDate` (`YYYY`, `YYYY-MM` or `YYYY-MM-DD`, or a parsed date)."""
    if isinstance(value, dt.date):
        return value
    match = _PARTIAL.match(str(value).strip())
    if match is None:
        raise BirthDateError(f"birth date {value!r} is not YYYY, YYYY-MM or YYYY-MM-DD")
    return birth_date(*match.groups())


def age_at(born: dt.date, index: dt.date) -> int:
    """Completed years from `born` to `index`; `BirthDateError` if born after it."""
    if born > index:
        raise BirthDateError(f"birth date {born} is after the index date {index}")
    return index.year - born.year - ((index.month, index.day) < (born.month, born.day))


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and value != value) or not str(value).strip()
