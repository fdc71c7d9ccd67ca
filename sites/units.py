"""Explicit unit conversions onto the contract's UCUM units.

Only conversions listed here happen; anything else is a `UnitError`, which the
connectors turn into a data problem naming the file, row and column. Units of the
same dimension convert by a factor (temperature also by an offset). Mass and molar
concentrations convert into each other only for an analyte whose molar mass is listed
(glucose mg/dL -> mmol/L divides by 18.016, creatinine mg/dL -> umol/L multiplies by
about 88.4).
"""

from __future__ import annotations

from dataclasses import dataclass

from medfed.sites.errors import SiteError


class UnitError(SiteError):
    """A value's unit is unknown or cannot be converted to the contract's unit."""


@dataclass(frozen=True)
class _Unit:
    dimension: str
    factor: float  # value * factor (+ offset) gives the dimension's base unit
    offset: float = 0.0


_UNITS: dict[str, _Unit] = {
    # mass concentration, base g/L
    "g/L": _Unit("mass/volume", 1.0),
    "g/dL": _Unit("mass/volume", 10.0),
    "mg/dL": _Unit("mass/volume", 0.01),
    "mg/L": _Unit("mass/volume", 0.001),
    "ug/mL": _Unit("mass/volume", 0.001),
    # substance concentration, base mol/L
    "mol/L": _Unit("substance/volume", 1.0),
    "mmol/L": _Unit("substance/volume", 1e-3),
    "umol/L": _Unit("substance/volume", 1e-6),
    # mass, base kg
    "kg": _Unit("mass", 1.0),
    "g": _Unit("mass", 1e-3),
    "[lb_av]": _Unit("mass", 0.45359237),
    # length, base m
    "m": _Unit("length", 1.0),
    "cm": _Unit("length", 0.01),
    "mm": _Unit("length", 0.001),
    "[in_i]": _Unit("length", 0.0254),
    # temperature, base Cel: [degF] -> (F - 32) * 5/9
    "Cel": _Unit("temperature", 1.0),
    "[degF]": _Unit("temperature", 5.0 / 9.0, -32.0 * 5.0 / 9.0),
    "K": _Unit("temperature", 1.0, -273.15),
    # pressure, base kPa
    "kPa": _Unit("pressure", 1.0),
    "mm[Hg]": _Unit("pressure", 0.133322387415),
    # time (ages, durations), base d
    "d": _Unit("time", 1.0),
    "wk": _Unit("time", 7.0),
    "mo": _Unit("time", 365.25 / 12.0),
    "a": _Unit("time", 365.25),
    # rates and ratios that only convert to themselves
    "/min": _Unit("rate", 1.0),
    "kg/m2": _Unit("area density", 1.0),
    "%": _Unit("fraction", 0.01),
    "1": _Unit("fraction", 1.0),
}

_ALIASES: dict[str, str] = {
    "mg/dl": "mg/dL",
    "g/dl": "g/dL",
    "g/l": "g/L",
    "mg/l": "mg/L",
    "mmol/l": "mmol/L",
    "umol/l": "umol/L",
    "µmol/L": "umol/L",
    "μmol/L": "umol/L",
    "mol/l": "mol/L",
    "lb": "[lb_av]",
    "lbs": "[lb_av]",
    "in": "[in_i]",
    "°C": "Cel",
    "degC": "Cel",
    "C": "Cel",
    "°F": "[degF]",
    "degF": "[degF]",
    "F": "[degF]",
    "mmHg": "mm[Hg]",
    "mm Hg": "mm[Hg]",
    "bpm": "/min",
    "beats/min": "/min",
    "{beats}/min": "/min",
    "years": "a",
    "year": "a",
    "yr": "a",
    "days": "d",
    "day": "d",
    "months": "mo",
    "weeks": "wk",
    "kg/m^2": "kg/m2",
    "kg/(m2)": "kg/m2",
}

MOLAR_MASS_G_PER_MOL: dict[str, float] = {
    "glucose": 180.16,
    "creatinine": 113.12,
    "cholesterol": 386.65,
    "urea": 60.06,
    "bilirubin": 584.66,
}
"""Analytes (by contract feature name) whose mass and molar concentrations interconvert."""


def canonical_unit(unit: str) -> str:
    """The UCUM spelling of `unit` (`mg/dl` -> `mg/dL`, `mmHg` -> `mm[Hg]`); unknown as is."""
    text = unit.strip()
    return _ALIASES.get(text, text)


def convert(value: float, from_unit: str, to_unit: str, *, analyte: str | None = None) -> float:
    """`value` in `from_unit`, expressed in `to_unit`; raise `UnitError` if there is no
    listed conversion (unknown unit, other dimension, or no molar mass for `analyte`)."""
    source, target = canonical_unit(from_unit), canonical_unit(to_unit)
    if source == target:
        return value
    if source not in _UNITS:
        raise UnitError(f"unit {from_unit!r} is not one medfed knows")
    if target not in _UNITS:
        raise UnitError(f"unit {to_unit!r} is not one medfed knows")
    a, b = _UNITS[source], _UNITS[target]
    base = value * a.factor + a.offset
    if a.dimension != b.dimension:
        base = _bridge(base, a.dimension, b.dimension, analyte, from_unit, to_unit)
    return (base - b.offset) / b.factor


def _bridge(
    base: float, source: str, target: str, analyte: str | None, from_unit: str, to_unit: str
) -> float:
    """Mass concentration (g/L) <-> substance concentration (mol/L) through a molar mass."""
    molar_mass = MOLAR_MASS_G_PER_MOL.get(analyte or "")
    if molar_mass is not None and (source, target) == ("mass/volume", "substance/volume"):
        return base / molar_mass
    if molar_mass is not None and (source, target) == ("substance/volume", "mass/volume"):
        return base * molar_mass
    what = f" for {analyte}" if analyte else ""
    raise UnitError(f"cannot convert {from_unit!r} to {to_unit!r}{what}")
