"""Unit conversions against published clinical conversion factors, not the code's own table."""

from __future__ import annotations

import pytest

from medfed.sites.units import UnitError, canonical_unit, convert


@pytest.mark.parametrize(
    ("value", "from_unit", "to_unit", "analyte", "expected", "tolerance"),
    [
        # Glucose: 1 mmol/L = 18.0 mg/dL; 100 mg/dL = 5.55 mmol/L, 180 mg/dL = 9.99 mmol/L.
        (100.0, "mg/dL", "mmol/L", "glucose", 5.55, 0.005),
        (180.0, "mg/dl", "mmol/L", "glucose", 9.99, 0.005),
        (5.55, "mmol/L", "mg/dL", "glucose", 100.0, 0.1),
        # Creatinine: 1 mg/dL = 88.4 umol/L.
        (1.0, "mg/dL", "umol/L", "creatinine", 88.4, 0.05),
        (176.8, "µmol/L", "mg/dL", "creatinine", 2.0, 0.002),
        # Hemoglobin 14 g/dL = 140 g/L.
        (140.0, "g/L", "g/dL", None, 14.0, 1e-12),
        # Body temperature 98.6 degF = 37 degC; water freezes at 273.15 K.
        (98.6, "[degF]", "Cel", None, 37.0, 1e-9),
        (0.0, "Cel", "K", None, 273.15, 1e-9),
        # The avoirdupois pound is exactly 0.45359237 kg; the inch exactly 2.54 cm.
        (10.0, "lb", "kg", None, 4.5359237, 1e-12),
        (70.0, "[in_i]", "cm", None, 177.8, 1e-9),
        # 120 mmHg = 16.0 kPa.
        (120.0, "mmHg", "kPa", None, 16.0, 0.01),
        # Age 24 months = 2 years.
        (24.0, "mo", "a", None, 2.0, 1e-12),
    ],
)
def test_conversions_match_published_factors(
    value: float,
    from_unit: str,
    to_unit: str,
    analyte: str | None,
    expected: float,
    tolerance: float,
) -> None:
    assert convert(value, from_unit, to_unit, analyte=analyte) == pytest.approx(
        expected, abs=tolerance
    )


def test_a_round_trip_returns_the_value() -> None:
    for value in (0.5, 7.25, 130.0):
        there = convert(value, "mmol/L", "mg/dL", analyte="glucose")
        assert convert(there, "mg/dL", "mmol/L", analyte="glucose") == pytest.approx(value)


@pytest.mark.parametrize(
    ("from_unit", "to_unit", "analyte", "says"),
    [
        ("mg/dL", "mmol/L", None, "cannot convert"),  # no analyte, no molar mass
        ("mg/dL", "mmol/L", "albumin", "for albumin"),  # analyte without a molar mass
        ("kg", "mmol/L", "glucose", "cannot convert"),  # other dimension
        ("furlongs", "m", None, "'furlongs' is not one medfed knows"),
    ],
)
def test_unconvertible_units_are_errors(
    from_unit: str, to_unit: str, analyte: str | None, says: str
) -> None:
    with pytest.raises(UnitError, match=says):
        convert(1.0, from_unit, to_unit, analyte=analyte)


def test_aliases_map_onto_ucum() -> None:
    assert canonical_unit(" mmHg ") == "mm[Hg]"
    assert canonical_unit("bpm") == "/min"
    assert canonical_unit("mg/dL") == "mg/dL"
