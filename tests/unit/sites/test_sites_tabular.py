"""read_site_table: every bad input is named by file, row and column; good tables are
standardised on the contract's reference scaling and split by a hash of the patient id."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from medfed.model.contract import DEMO_CONTRACT as CONTRACT
from medfed.sites.errors import DataError, DataProblem
from medfed.sites.tabular import SiteTable, read_site_table

HEADER = (CONTRACT.patient_id, *CONTRACT.feature_names, CONTRACT.tasks[0].target)
FEATURES = {feature.name: feature for feature in CONTRACT.numeric}


def row_at_means(index: int, **cells: str) -> dict[str, str]:
    """A valid row: every feature at its reference mean; `cells` override by column."""
    row = {CONTRACT.patient_id: f"p{index:05d}", CONTRACT.tasks[0].target: str(index % 2)}
    row.update({feature.name: f"{feature.reference_mean:g}" for feature in CONTRACT.numeric})
    row.update(cells)
    return row


def write_table(
    path: Path, rows: Sequence[Mapping[str, str]], header: Sequence[str] = HEADER
) -> Path:
    lines = [",".join(header), *(",".join(row[column] for column in header) for row in rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def problems_of(path: Path) -> tuple[DataProblem, ...]:
    with pytest.raises(DataError) as caught:
        read_site_table(path, CONTRACT)
    assert caught.value.problems, "a DataError must carry at least one problem"
    return caught.value.problems


def table_of(rows: Sequence[Mapping[str, str]], folder: Path) -> SiteTable:
    folder.mkdir(parents=True, exist_ok=True)
    return read_site_table(write_table(folder / "patients.csv", rows), CONTRACT)


# --- one bad cell in the third data row (file row 4) -----------------------------------

BAD_CELLS = [
    pytest.param("age", "abc", "'abc' is not a number", id="not-a-number"),
    pytest.param("age", "", "'' is not a number", id="empty-value"),
    pytest.param("bmi", "nan", "'nan' is not a number", id="nan-text"),
    pytest.param("bmi", "NaN", "'NaN' is not a number", id="NaN-text"),
    pytest.param("heart_rate", "inf", "'inf' is not a number", id="inf-text"),
    pytest.param("heart_rate", "-Infinity", "'-Infinity' is not a number", id="minus-infinity"),
    pytest.param("glucose", "1e999", "'1e999' is not a number", id="overflows-to-inf"),
    pytest.param(
        "age", "150", "150 a is outside the plausible range [18, 110]", id="above-maximum"
    ),
    pytest.param(
        "glucose", "0.5", "0.5 mmol/L is outside the plausible range [1.5, 40]", id="below-min"
    ),
    pytest.param(
        "creatinine",
        "-3",
        "-3 umol/L is outside the plausible range [20, 1500]",
        id="negative",
    ),
    pytest.param(CONTRACT.patient_id, "", "is empty", id="empty-patient-id"),
    pytest.param(CONTRACT.patient_id, "   ", "is empty", id="blank-patient-id"),
    pytest.param(CONTRACT.patient_id, "p00000", "repeats patient 'p00000'", id="repeated-id"),
    pytest.param(CONTRACT.tasks[0].target, "2", "'2' is not 0 or 1", id="outcome-2"),
    pytest.param(CONTRACT.tasks[0].target, "yes", "'yes' is not 0 or 1", id="outcome-yes"),
    pytest.param(CONTRACT.tasks[0].target, "1.0", "'1.0' is not 0 or 1", id="outcome-1.0"),
    pytest.param(CONTRACT.tasks[0].target, "", "'' is not 0 or 1", id="outcome-empty"),
]


@pytest.mark.parametrize(("column", "cell", "message"), BAD_CELLS)
def test_one_bad_cell_is_named_by_file_row_and_column(
    tmp_path: Path, column: str, cell: str, message: str
) -> None:
    rows = [row_at_means(i) for i in range(6)]
    rows[2] = row_at_means(2, **{column: cell})
    path = write_table(tmp_path / "patients.csv", rows)

    problems = problems_of(path)

    assert len(problems) == 1, problems
    assert (problems[0].file, problems[0].row, problems[0].column) == (str(path), 4, column)
    assert message in problems[0].message


def test_the_error_text_names_file_row_and_column(tmp_path: Path) -> None:
    rows = [row_at_means(i) for i in range(3)]
    rows[1] = row_at_means(1, systolic_bp="300")
    path = write_table(tmp_path / "patients.csv", rows)

    with pytest.raises(DataError) as caught:
        read_site_table(path, CONTRACT)

    assert str(caught.value).startswith(f"{path}, row 3, column systolic_bp: 300 mm[Hg]")


def test_out_of_range_message_names_the_unit_and_the_range(tmp_path: Path) -> None:
    feature = FEATURES["albumin"]
    rows = [row_at_means(0, albumin=f"{feature.maximum + 1:g}")]

    (problem,) = problems_of(write_table(tmp_path / "patients.csv", rows))

    assert feature.unit in problem.message
    assert f"[{feature.minimum:g}, {feature.maximum:g}]" in problem.message


def test_values_on_the_range_bounds_are_accepted(tmp_path: Path) -> None:
    rows = [
        row_at_means(0, **{f.name: f"{f.minimum:g}" for f in CONTRACT.numeric}),
        row_at_means(1, **{f.name: f"{f.maximum:g}" for f in CONTRACT.numeric}),
    ]
    assert table_of(rows, tmp_path).patients == 2


def test_a_row_with_more_fields_than_the_header_is_named(tmp_path: Path) -> None:
    rows = [row_at_means(i) for i in range(4)]
    path = write_table(tmp_path / "patients.csv", rows)
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[3] += ",surplus"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    problems = problems_of(path)

    assert [(p.file, p.row, p.column) for p in problems] == [(str(path), 4, None)]
    assert "more fields than the header" in problems[0].message


@pytest.mark.parametrize("dropped", ["bmi", CONTRACT.patient_id, CONTRACT.tasks[0].target])
def test_a_missing_column_is_named_on_the_header_row(tmp_path: Path, dropped: str) -> None:
    header = [column for column in HEADER if column != dropped]
    path = write_table(tmp_path / "patients.csv", [row_at_means(0)], header)

    problems = problems_of(path)

    assert problems == (DataProblem(str(path), 1, dropped, "column is missing"),)


def test_every_missing_column_is_named(tmp_path: Path) -> None:
    header = [CONTRACT.patient_id, "age", "albumin"]
    path = write_table(tmp_path / "patients.csv", [row_at_means(0)], header)

    problems = problems_of(path)

    missing = [column for column in HEADER if column not in header]
    assert [(p.row, p.column) for p in problems] == [(1, column) for column in missing]


def test_an_empty_file_misses_every_column(tmp_path: Path) -> None:
    path = tmp_path / "patients.csv"
    path.write_bytes(b"")

    problems = problems_of(path)

    assert [(p.file, p.row, p.column) for p in problems] == [(str(path), 1, c) for c in HEADER]


def test_a_table_without_patients_is_refused(tmp_path: Path) -> None:
    path = write_table(tmp_path / "patients.csv", [])

    problems = problems_of(path)

    assert [(p.file, p.row, p.column) for p in problems] == [(str(path), None, None)]
    assert "no patients" in problems[0].message


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "patients.csv"
    text = ",".join(HEADER) + "\n" + ",".join(row_at_means(0, patient_id="Zoë")[c] for c in HEADER)
    path.write_bytes(text.encode("latin-1"))

    problems = problems_of(path)

    assert [(p.file, p.row, p.column) for p in problems] == [(str(path), None, None)]
    assert "UTF-8" in problems[0].message


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "absent" / "patients.csv"

    problems = problems_of(path)

    assert [(p.file, p.row, p.column) for p in problems] == [(str(path), None, None)]
    assert "cannot be read" in problems[0].message


def test_one_bad_row_refuses_the_whole_table(tmp_path: Path) -> None:
    rows = [row_at_means(i) for i in range(200)]
    rows[150] = row_at_means(150, hemoglobin="30")
    path = write_table(tmp_path / "patients.csv", rows)

    problems = problems_of(path)

    assert [(p.row, p.column) for p in problems] == [(152, "hemoglobin")]


def test_every_problem_of_every_row_is_reported(tmp_path: Path) -> None:
    rows = [row_at_means(i) for i in range(10)]
    rows[1] = row_at_means(1, age="x", bmi="200")
    rows[7] = row_at_means(7, readmitted_30d="3")
    rows[8] = row_at_means(8, patient_id="p00007")
    path = write_table(tmp_path / "patients.csv", rows)

    problems = problems_of(path)

    assert [(p.row, p.column) for p in problems] == [
        (3, "age"),
        (3, "bmi"),
        (9, CONTRACT.tasks[0].target),
        (10, CONTRACT.patient_id),
    ]


def test_the_error_text_shows_five_problems_and_counts_the_rest(tmp_path: Path) -> None:
    rows = [row_at_means(i, age="x") for i in range(8)]

    with pytest.raises(DataError) as caught:
        read_site_table(write_table(tmp_path / "patients.csv", rows), CONTRACT)

    assert len(caught.value.problems) == 8
    assert str(caught.value).count("is not a number") == 5
    assert str(caught.value).endswith("(and 3 more)")


def test_a_blank_line_does_not_shift_the_reported_row(tmp_path: Path) -> None:
    path = tmp_path / "patients.csv"
    lines = [",".join(HEADER), ",".join(row_at_means(0)[c] for c in HEADER), ""]
    lines.append(",".join(row_at_means(1, age="abc")[c] for c in HEADER))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    (problem,) = problems_of(path)

    # The bad value sits on the file's fourth line: what an editor or spreadsheet shows.
    assert (problem.row, problem.column) == (4, "age")


def test_a_stray_quote_in_a_large_table_is_a_data_error(tmp_path: Path) -> None:
    rows = [row_at_means(i) for i in range(4000)]
    path = write_table(tmp_path / "patients.csv", rows)
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = '"' + lines[2]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    problems = problems_of(path)

    assert problems[0].row == 3


# --- good tables -------------------------------------------------------------------------


def test_a_row_at_the_reference_means_standardises_to_zeros(tmp_path: Path) -> None:
    table = table_of([row_at_means(i) for i in range(50)], tmp_path)

    both = np.concatenate([table.train_features, table.eval_features])
    assert both.shape == (50, len(CONTRACT.numeric))
    assert both.dtype == np.float32
    np.testing.assert_array_equal(both, np.zeros_like(both))


def test_standardisation_uses_the_contract_reference_scale(tmp_path: Path) -> None:
    plus_one = {f.name: f"{f.reference_mean + f.reference_scale:g}" for f in CONTRACT.numeric}
    minus_two = {f.name: f"{f.reference_mean - 2 * f.reference_scale:g}" for f in CONTRACT.numeric}
    rows = [row_at_means(i, **plus_one) for i in range(30)]
    rows += [row_at_means(i, **minus_two) for i in range(30, 60)]

    table = table_of(rows, tmp_path)

    both = np.concatenate([table.train_features, table.eval_features])
    assert sorted(np.unique(both.round(5))) == [-2.0, 1.0]
    assert (np.abs(both - 1.0) < 1e-6).all(axis=1).sum() == 30


def test_standardised_rows_match_an_independent_parse(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rows = []
    for i in range(120):
        cells = {f.name: f"{rng.uniform(f.minimum, f.maximum):.3f}" for f in CONTRACT.numeric}
        rows.append(row_at_means(i, **cells, readmitted_30d=str(int(rng.integers(0, 2)))))
    table = table_of(rows, tmp_path)

    means = np.array([f.reference_mean for f in CONTRACT.numeric])
    scales = np.array([f.reference_scale for f in CONTRACT.numeric])
    raw = np.array([[float(row[f.name]) for f in CONTRACT.numeric] for row in rows])
    expected = np.column_stack(
        [(raw - means) / scales, [int(r[CONTRACT.tasks[0].target]) for r in rows]]
    )
    actual = np.column_stack(
        [
            np.concatenate([table.train_features, table.eval_features]),
            np.concatenate([table.train_labels, table.eval_labels]),
        ]
    )
    np.testing.assert_allclose(_sorted_rows(actual), _sorted_rows(expected), rtol=1e-6, atol=1e-6)
    assert table.train_labels.dtype == np.int64


def _sorted_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix[np.lexsort(matrix.T[::-1])]


def _ids_encoded(indices: Sequence[int]) -> list[dict[str, str]]:
    """Rows whose age and bmi encode the patient index, so a split row can be traced back."""
    return [
        row_at_means(i, age=str(20 + i // 50), bmi=str(15 + i % 50), patient_id=f"patient-{i}")
        for i in indices
    ]


def _held_out_indices(table: SiteTable) -> set[int]:
    age = table.eval_features[:, 0].astype(np.float64) * 14 + 62
    bmi = table.eval_features[:, 1].astype(np.float64) * 5 + 27
    return {round(a - 20) * 50 + round(b - 15) for a, b in zip(age, bmi, strict=True)}


def test_about_a_fifth_of_patients_are_held_out(tmp_path: Path) -> None:
    table = table_of(_ids_encoded(range(1000)), tmp_path)

    assert table.patients == 1000
    assert 100 <= len(table.eval_labels) <= 300
    assert len(table.train_labels) + len(table.eval_labels) == 1000


def test_the_split_depends_only_on_the_patient_id(tmp_path: Path) -> None:
    everyone = table_of(_ids_encoded(range(1000)), tmp_path / "everyone")
    subset = [i for i in reversed(range(1000)) if i % 3]
    some = table_of(_ids_encoded(subset), tmp_path / "reordered-subset")
    again = table_of(_ids_encoded(range(1000)), tmp_path / "again")

    held_out = _held_out_indices(everyone)
    assert len(held_out) == len(everyone.eval_labels)
    assert _held_out_indices(some) == held_out & set(subset)
    assert _held_out_indices(again) == held_out
    np.testing.assert_array_equal(again.eval_features, everyone.eval_features)


def test_the_fingerprint_is_stable_and_changes_with_one_value(tmp_path: Path) -> None:
    rows = [row_at_means(i) for i in range(20)]
    first = table_of(rows, tmp_path).fingerprint
    assert table_of(rows, tmp_path).fingerprint == first

    rows[13] = row_at_means(13, creatinine="91")
    assert table_of(rows, tmp_path).fingerprint != first

    rows[13] = row_at_means(13)
    rows[4] = row_at_means(
        4, readmitted_30d="1" if rows[4][CONTRACT.tasks[0].target] == "0" else "0"
    )
    assert table_of(rows, tmp_path).fingerprint != first


def test_the_fingerprint_does_not_depend_on_where_or_how_the_file_is_written(
    tmp_path: Path,
) -> None:
    rows = [row_at_means(i, age=str(30 + i)) for i in range(20)]
    plain = write_table(tmp_path / "patients.csv", rows)
    other = tmp_path / "elsewhere" / "copy.csv"
    other.parent.mkdir()
    text = plain.read_text(encoding="utf-8")
    other.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))

    assert (
        read_site_table(other, CONTRACT).fingerprint == read_site_table(plain, CONTRACT).fingerprint
    )
