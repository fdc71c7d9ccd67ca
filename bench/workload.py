"""A synthetic multimodal workload for benchmarks: one contract with every modality.

The values are drawn from a seeded generator inside each modality's plausible range;
the molecules are real drugs' SMILES. Benchmarks time steps on these tensors, so only
their shapes and the network's work matter, never what the model learns.
"""

from __future__ import annotations

import numpy as np
import torch

from medfed.model.contract import (
    DEMO_CONTRACT,
    CategoricalFeature,
    MoleculeSpec,
    OmicsPanel,
    ProteinSpec,
    StudyContract,
    TaskSpec,
)
from medfed.model.sample import PatientSample
from medfed.model.tokenizers import encode

DRUGS = (
    "CC(=O)OC1=CC=CC=C1C(=O)O",  # aspirin
    "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",  # caffeine
    "CC(C)CC1=CC=C(C=C1)C(C)C(=O)O",  # ibuprofen
    "CC(=O)NC1=CC=C(C=C1)O",  # paracetamol
    "CN(C)C(=N)N=C(N)N",  # metformin
    "C1=CC(=C(C=C1C[C@@H](C(=O)O)N)O)O",  # levodopa
    "CC12CCC3C(C1CCC2O)CCC4=C3C=CC(=C4)O",  # estradiol
    "COC1=CC=C(C=C1)CCN(C)C",  # a methoxyphenethylamine
)

RESIDUES = "ACDEFGHIKLMNPQRSTVWY"

BENCH_CONTRACT = StudyContract(
    name="bench",
    numeric=DEMO_CONTRACT.numeric,
    categorical=(
        CategoricalFeature(
            name="diagnoses",
            system="icd10",
            vocabulary=("I10", "E11.9", "N18.3", "I50.9", "J44.9", "C34.9", "E78.5", "I25.10"),
        ),
    ),
    omics=OmicsPanel(genes=tuple(f"GENE{i}" for i in range(32))),
    molecule=MoleculeSpec(max_length=48),
    protein=ProteinSpec(max_length=64),
    tasks=(TaskSpec(name="outcome", kind="binary", target="outcome"),),
)
"""Clinical (8 numeric, 8 ICD-10 codes), 32 genes, molecules (48 tokens), proteins (64)."""


def synthetic_samples(n: int, *, seed: int) -> list[PatientSample]:
    """`n` patients with every modality and a binary label, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    vocabulary = BENCH_CONTRACT.categorical[0].vocabulary
    samples = []
    for i in range(n):
        numeric = {f.name: float(rng.uniform(f.minimum, f.maximum)) for f in BENCH_CONTRACT.numeric}
        codes = {"diagnoses": frozenset(rng.choice(vocabulary, size=2, replace=False).tolist())}
        length = int(rng.integers(20, 65))
        samples.append(
            PatientSample(
                patient_id=f"p{i}",
                numeric=numeric,
                codes=codes,
                omics=rng.lognormal(size=32).astype(np.float32),
                smiles=DRUGS[i % len(DRUGS)],
                protein="".join(rng.choice(list(RESIDUES), size=length)),
                targets={"outcome": float(rng.integers(0, 2))},
            )
        )
    return samples


def synthetic_tensors(n: int, *, seed: int) -> tuple[torch.Tensor, ...]:
    """The encoded tensors of `synthetic_samples(n, seed=seed)`."""
    return encode(synthetic_samples(n, seed=seed), BENCH_CONTRACT).tensors()
