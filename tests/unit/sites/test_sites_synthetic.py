"""The synthetic consortium: deterministic per seed, valid on the contract, heterogeneous."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from medfed.model.contract import DEMO_CONTRACT as CONTRACT
from medfed.sites.synthetic import TABLE_NAME, site_ids, write_synthetic_consortium
from tests.reference_table import read_site_table


def _tables(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_site_ids_are_numbered_from_one() -> None:
    assert site_ids(3) == ("hospital-1", "hospital-2", "hospital-3")
    assert site_ids(0) == ()


def test_the_same_seed_writes_identical_bytes(tmp_path: Path) -> None:
    write_synthetic_consortium(tmp_path / "a", CONTRACT, n_sites=3, seed=11)
    write_synthetic_consortium(tmp_path / "b", CONTRACT, n_sites=3, seed=11)

    first, second = _tables(tmp_path / "a"), _tables(tmp_path / "b")
    assert list(first) == [f"hospital-{i}/{TABLE_NAME}" for i in (1, 2, 3)]
    assert first == second


def test_another_seed_writes_other_tables(tmp_path: Path) -> None:
    write_synthetic_consortium(tmp_path / "a", CONTRACT, n_sites=2, seed=11)
    write_synthetic_consortium(tmp_path / "b", CONTRACT, n_sites=2, seed=12)

    first, second = _tables(tmp_path / "a"), _tables(tmp_path / "b")
    assert first.keys() == second.keys()
    assert all(first[name] != second[name] for name in first)


def test_every_table_passes_the_contract(tmp_path: Path) -> None:
    sites = write_synthetic_consortium(tmp_path, CONTRACT, n_sites=4, seed=5)

    assert [site.site_id for site in sites] == list(site_ids(4))
    for site in sites:
        assert site.table == tmp_path / site.site_id / TABLE_NAME
        with site.table.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle))
        assert rows[0] == [CONTRACT.patient_id, *CONTRACT.feature_names, CONTRACT.tasks[0].target]
        assert len(rows) - 1 == site.patients
        table = read_site_table(site.table, CONTRACT)
        assert table.patients == site.patients
        assert len(table.train_labels) > 0
        assert len(table.eval_labels) > 0


def test_sites_differ_in_size_and_outcome_rate(tmp_path: Path) -> None:
    sites = write_synthetic_consortium(tmp_path, CONTRACT, n_sites=4, seed=5)

    tables = [read_site_table(site.table, CONTRACT) for site in sites]
    sizes = [table.patients for table in tables]
    prevalence = [
        float(np.concatenate([table.train_labels, table.eval_labels]).mean()) for table in tables
    ]
    means = [
        np.concatenate([table.train_features, table.eval_features]).mean(axis=0) for table in tables
    ]

    assert len(set(sizes)) == len(sizes)
    assert max(prevalence) - min(prevalence) > 0.05
    assert all(0.0 < rate < 1.0 for rate in prevalence)
    # Case mix: the sites' feature means are shifted apart, not just sampling noise apart.
    assert max(float(np.abs(a - b).max()) for a in means for b in means) > 0.2


@pytest.mark.parametrize("n_sites", [0, -1])
def test_a_consortium_needs_a_site(tmp_path: Path, n_sites: int) -> None:
    with pytest.raises(ValueError, match="n_sites"):
        write_synthetic_consortium(tmp_path, CONTRACT, n_sites=n_sites, seed=0)
    assert not any(tmp_path.iterdir())
