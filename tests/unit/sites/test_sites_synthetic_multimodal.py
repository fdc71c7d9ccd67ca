"""The multimodal synthetic consortium: every site reads back clean through its connectors,
sites differ (size, prevalence, modalities), and the same seed writes the same bytes."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from medfed.model.contract import (
    CategoricalFeature,
    MoleculeSpec,
    NumericFeature,
    OmicsPanel,
    ProteinSpec,
    StudyContract,
    TaskSpec,
)
from medfed.sites.config import DatasetConfig, SiteDataConfig
from medfed.sites.manifest import load_site_data
from medfed.sites.synthetic_multimodal import write_multimodal_consortium

CONTRACT = StudyContract(
    name="multimodal",
    numeric=(
        NumericFeature(
            name="age",
            unit="a",
            minimum=18,
            maximum=110,
            reference_mean=62,
            reference_scale=14,
            loinc="30525-0",
        ),
        NumericFeature(
            name="glucose",
            unit="mmol/L",
            minimum=1.5,
            maximum=40,
            reference_mean=6.2,
            reference_scale=1.8,
        ),
    ),
    categorical=(
        CategoricalFeature(name="diagnoses", system="icd10", vocabulary=("E11", "I10")),
        CategoricalFeature(name="drugs", system="atc", vocabulary=("A10BA02",)),
    ),
    omics=OmicsPanel(genes=("TP53", "EGFR", "MYC")),
    molecule=MoleculeSpec(max_length=32),
    protein=ProteinSpec(max_length=40),
    tasks=(
        TaskSpec(name="readmission", kind="binary", target="readmitted_30d"),
        TaskSpec(name="survival", kind="survival", target="time_days", event="died"),
    ),
)


@dataclass(frozen=True)
class _Config:
    datasets: tuple[DatasetConfig, ...]
    source: Path
    data_dir: Path


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[object, ...]]:
    root = tmp_path_factory.mktemp("consortium")
    return root, write_multimodal_consortium(root, CONTRACT, n_sites=4, seed=3, patients=(40, 120))


def test_every_site_reads_back_without_a_problem(
    consortium: tuple[Path, tuple[object, ...]],
) -> None:
    _, sites = consortium
    formats = []
    for site in sites:
        datasets = SiteDataConfig.model_validate(tomllib.loads(site.datasets_toml)).datasets  # type: ignore[attr-defined]
        data = load_site_data(_Config(datasets, site.folder / "site.toml", site.folder), CONTRACT)  # type: ignore[attr-defined]
        assert data.problems == ()
        assert data.manifest.patients == site.patients  # type: ignore[attr-defined]
        formats.append(site.clinical_format)  # type: ignore[attr-defined]
        labelled = data.manifest.labelled
        assert (
            labelled["readmitted_30d"] == labelled["time_days"] == labelled["died"] == site.patients
        )  # type: ignore[attr-defined]
    assert formats == ["csv", "parquet", "fhir", "omop"]


def test_sites_differ_like_hospitals(consortium: tuple[Path, tuple[object, ...]]) -> None:
    _, sites = consortium
    coverage = []
    prevalence = []
    for site in sites:
        datasets = SiteDataConfig.model_validate(tomllib.loads(site.datasets_toml)).datasets  # type: ignore[attr-defined]
        data = load_site_data(_Config(datasets, site.folder / "site.toml", site.folder), CONTRACT)  # type: ignore[attr-defined]
        coverage.append(dict(data.manifest.coverage))
        prevalence.append(
            sum(s.targets["readmitted_30d"] for s in data.samples) / len(data.samples)
        )
    assert len({site.patients for site in sites}) > 1  # type: ignore[attr-defined]
    assert coverage[2]["omics"] == 0 and coverage[0]["omics"] > 0  # site 3 has no omics
    assert coverage[3]["molecule"] == 0 and coverage[0]["molecule"] > 0  # site 4 no molecules
    assert max(prevalence) - min(prevalence) > 0.05


def test_the_same_seed_writes_the_same_bytes(tmp_path: Path) -> None:
    write_multimodal_consortium(tmp_path / "a", CONTRACT, n_sites=2, seed=5, patients=(20, 30))
    write_multimodal_consortium(tmp_path / "b", CONTRACT, n_sites=2, seed=5, patients=(20, 30))
    write_multimodal_consortium(tmp_path / "c", CONTRACT, n_sites=2, seed=6, patients=(20, 30))
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a") != _files(tmp_path / "c")
