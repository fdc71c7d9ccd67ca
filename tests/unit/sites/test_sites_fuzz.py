"""Fuzzing read_site_table: whatever the file holds, it returns a SiteTable or raises DataError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.model.contract import DEMO_CONTRACT as CONTRACT
from medfed.sites.errors import DataError
from medfed.sites.tabular import SiteTable, read_site_table

HEADER = (CONTRACT.patient_id, *CONTRACT.feature_names, CONTRACT.tasks[0].target)
FUZZ = settings(max_examples=150, deadline=None)


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file, rewritten by every example (a module fixture: Hypothesis reruns the body)."""
    return tmp_path_factory.mktemp("fuzz") / "patients.csv"


def _check_outcome(path: Path) -> None:
    try:
        table = read_site_table(path, CONTRACT)
    except DataError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.file == str(path)
            assert problem.row is None or problem.row >= 1
            assert problem.column is None or problem.column in HEADER
        return
    assert isinstance(table, SiteTable)
    n_features = len(CONTRACT.numeric)
    assert table.train_features.shape == (len(table.train_labels), n_features)
    assert table.eval_features.shape == (len(table.eval_labels), n_features)
    assert table.patients >= 1
    for features in (table.train_features, table.eval_features):
        assert np.isfinite(features).all()
    labels = np.concatenate([table.train_labels, table.eval_labels])
    assert set(labels.tolist()) <= {0, 1}


@FUZZ
@given(text=st.text())
def test_arbitrary_text(fuzz_file: Path, text: str) -> None:
    fuzz_file.write_text(text, encoding="utf-8")
    _check_outcome(fuzz_file)


@FUZZ
@given(data=st.binary())
def test_arbitrary_bytes(fuzz_file: Path, data: bytes) -> None:
    fuzz_file.write_bytes(data)
    _check_outcome(fuzz_file)


# Cells that reach deeper: valid numbers, numbers out of range, NaN/inf, CSV syntax.
_cells = st.one_of(
    st.sampled_from(["62", "27", "6.2", "0", "1", "", " ", "nan", "-inf", "1e999", "p1", "p1"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10, 2000).map(str),
    st.text(alphabet=',"\r\n\t ;\x00\u2028ab01.-', max_size=6),
)
_rows = st.lists(st.lists(_cells, min_size=8, max_size=12).map(",".join), max_size=8)


@FUZZ
@given(header=st.permutations(HEADER), rows=_rows, newline=st.sampled_from(["\n", "\r\n", "\r"]))
def test_tables_with_the_contract_header(
    fuzz_file: Path, header: list[str], rows: list[str], newline: str
) -> None:
    fuzz_file.write_text(newline.join([",".join(header), *rows]), encoding="utf-8", newline="")
    _check_outcome(fuzz_file)


@FUZZ
@given(
    ages=st.lists(st.integers(18, 110), min_size=1, max_size=30),
    outcomes=st.data(),
)
def test_valid_tables_are_read_whole(
    fuzz_file: Path, ages: list[int], outcomes: st.DataObject
) -> None:
    lines = [",".join(HEADER)]
    for i, age in enumerate(ages):
        outcome = outcomes.draw(st.sampled_from("01"))
        lines.append(f"id-{i},{age},27,132,78,6.2,90,13.5,40,{outcome}")
    fuzz_file.write_text("\n".join(lines), encoding="utf-8")

    table = read_site_table(fuzz_file, CONTRACT)

    assert table.patients == len(ages)
    ages_read = np.concatenate([table.train_features, table.eval_features])[:, 0] * 14 + 62
    assert sorted(np.round(ages_read).astype(int).tolist()) == sorted(ages)
