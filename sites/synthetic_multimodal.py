"""A synthetic multimodal consortium on any contract, written in any supported format.

For demos, tests and scale runs: N sites that differ the way hospitals do, in size,
label prevalence, case mix (a per-site shift of every numeric feature), missing values,
and which modalities they hold at all (every third site has no omics, every fourth no
molecules). Each site's clinical data goes out in one of `formats` (round robin), so a
consortium exercises every connector. Labels follow one shared model, so a federation
can learn it. The same seed writes the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfed.model.contract import StudyContract, TaskSpec
from medfed.sites.config import DatasetConfig
from medfed.sites.export import (
    ClinicalFormat,
    ClinicalPatient,
    datasets_toml,
    write_clinical,
    write_omics,
    write_sequences,
)
from medfed.sites.synthetic import site_ids

_MOLECULES = (
    "CCO", "CC(=O)O", "c1ccccc1", "CC(=O)Oc1ccccc1C(=O)O", "CCN(CC)CC", "OC1CCCCC1",
    "c1ccncc1", "CC(C)O", "ClC(Cl)Cl", "CCOC(=O)C", "NC(=O)N", "Cc1ccccc1", "COc1ccccc1",
    "CCCCCCCC", "O=C(O)c1ccccc1", "CC(C)(C)O", "c1ccc2ccccc2c1", "CCS", "CBr", "FC(F)F",
)  # fmt: skip


@dataclass(frozen=True)
class GeneratedSite:
    """One synthetic site: its folder, datasets (paths relative to it) and size."""

    site_id: str
    folder: Path
    datasets: tuple[DatasetConfig, ...]
    patients: int
    clinical_format: ClinicalFormat

    @property
    def datasets_toml(self) -> str:
        """The `[[datasets]]` tables for this site's site.toml."""
        return datasets_toml(self.datasets)


def write_multimodal_consortium(
    root: Path,
    contract: StudyContract,
    *,
    n_sites: int,
    seed: int,
    formats: Sequence[ClinicalFormat] = ("csv", "parquet", "fhir", "omop"),
    patients: tuple[int, int] = (150, 600),
) -> tuple[GeneratedSite, ...]:
    """Write each site under `root/<site id>/`; return what went where."""
    if n_sites < 1:
        raise ValueError(f"n_sites must be at least 1, got {n_sites}")
    if not formats:
        raise ValueError("formats must name at least one clinical format")
    rng = np.random.default_rng(seed)
    weights = rng.normal(0.0, 0.8, max(len(contract.numeric), 1))
    sites = []
    for index, site_id in enumerate(site_ids(n_sites)):
        size = int(rng.integers(patients[0], patients[1] + 1))
        fmt = formats[index % len(formats)]
        sites.append(_write_site(root / site_id, contract, rng, index, size, fmt, weights))
    return tuple(sites)


def _write_site(
    folder: Path,
    contract: StudyContract,
    rng: np.random.Generator,
    index: int,
    size: int,
    fmt: ClinicalFormat,
    weights: np.ndarray,
) -> GeneratedSite:
    ids = [f"{folder.name}-p{i:05d}" for i in range(size)]
    n = len(contract.numeric)
    shift = rng.normal(0.0, 0.4, n)
    z = rng.normal(shift, 1.0, (size, n))
    risk = z @ weights[:n] if n else np.zeros(size)
    risk = risk + rng.normal(-0.5 + 0.4 * (index % 3), 0.2)  # per-site prevalence
    targets = [_labels(task, risk, rng) for task in contract.tasks]
    clinical: list[ClinicalPatient] = []
    for row, pid in enumerate(ids):
        numeric = {}
        for column, feature in enumerate(contract.numeric):
            if rng.random() < 0.05:
                continue  # missing at random
            raw = feature.reference_mean + feature.reference_scale * z[row, column]
            numeric[feature.name] = round(float(np.clip(raw, feature.minimum, feature.maximum)), 4)
        codes = {
            c.name: [code for code in c.vocabulary if rng.random() < 0.2]
            for c in contract.categorical
        }
        labels = {name: float(values[row]) for t in targets for name, values in t.items()}
        clinical.append(ClinicalPatient(pid, numeric, codes, labels))
    data = folder / "data"
    datasets = [
        write_clinical(clinical, contract, data, fmt=fmt, name="clinical", relative_to=folder)
    ]
    if contract.omics is not None and index % 3 != 2:
        genes = contract.omics.genes
        counts = rng.lognormal(2.0, 1.0, (size, len(genes))) * np.exp(0.3 * risk)[:, None]
        if contract.omics.transform == "none":
            counts = np.log1p(counts)
        matrix = {pid: counts[i].astype(np.float32) for i, pid in enumerate(ids)}
        datasets.append(
            write_omics(matrix, genes, data / "omics.csv", name="omics", relative_to=folder)
        )
    if contract.molecule is not None and index % 4 != 3:
        pool = [m for m in _MOLECULES if len(m) <= contract.molecule.max_length]
        molecules = {pid: pool[int(rng.integers(len(pool)))] for pid in ids}
        datasets.append(
            write_sequences(
                "smiles", molecules, data / "molecules.csv", name="molecules", relative_to=folder
            )
        )
    if contract.protein is not None:
        alphabet = contract.protein.alphabet
        longest = min(30, contract.protein.max_length)
        proteins = {
            pid: "".join(
                rng.choice(list(alphabet), int(rng.integers(min(5, longest), longest + 1)))
            )
            for pid in ids
        }
        datasets.append(
            write_sequences(
                "fasta", proteins, data / "proteins.fasta", name="proteins", relative_to=folder
            )
        )
    return GeneratedSite(folder.name, folder, tuple(datasets), size, fmt)


def _labels(task: TaskSpec, risk: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Labels for one task from the shared risk score."""
    size = len(risk)
    if task.kind == "binary":
        return {task.target: (rng.random(size) < 1.0 / (1.0 + np.exp(-risk))).astype(float)}
    if task.kind == "regression":
        return {task.target: np.round(risk + rng.normal(0.0, 0.5, size), 4)}
    if task.kind == "multiclass":
        cuts = np.quantile(risk, np.linspace(0, 1, len(task.classes) + 1)[1:-1])
        return {task.target: np.digitize(risk + rng.normal(0, 0.3, size), cuts).astype(float)}
    assert task.event is not None  # a survival task always has one (the contract checks)
    time = np.round(rng.exponential(365.0 * np.exp(-0.5 * risk)) + 1.0, 1)
    censor = rng.exponential(700.0, size)
    return {task.target: np.minimum(time, censor + 1.0), task.event: (time <= censor).astype(float)}
