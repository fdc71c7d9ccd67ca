"""Molecules (SMILES), proteins (FASTA) and omics matrices, each on a contract that has them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.model.contract import MoleculeSpec, OmicsPanel, ProteinSpec, StudyContract, TaskSpec
from medfed.model.errors import TokenizeError
from medfed.model.tokenizers import ProteinTokenizer, SmilesTokenizer
from medfed.sites.config import DatasetConfig
from medfed.sites.connectors import read_dataset
from medfed.sites.connectors.molecules import check_protein, check_smiles, smiles_tokens

CONTRACT = StudyContract(
    name="multiscale",
    omics=OmicsPanel(genes=("TP53", "BRCA1", "EGFR"), transform="none"),
    molecule=MoleculeSpec(max_length=40),
    protein=ProteinSpec(max_length=30),
    tasks=(
        TaskSpec(name="activity", kind="regression", target="activity"),
        TaskSpec(name="amp", kind="binary", target="is_amp"),
    ),
)


def _dataset(fmt: str, paths: list[str], **more: object) -> DatasetConfig:
    return DatasetConfig.model_validate({"name": fmt, "format": fmt, "paths": paths, **more})


def test_smiles_tokens_cover_the_string() -> None:
    assert smiles_tokens("CC(=O)Oc1ccccc1C(=O)O") == [
        *("C", "C", "(", "=", "O", ")", "O", "c", "1", "c", "c", "c", "c", "c", "1"),
        *("C", "(", "=", "O", ")", "O"),
    ]
    assert smiles_tokens("C[C@@H](Cl)Br") == ["C", "[C@@H]", "(", "Cl", ")", "Br"]
    assert smiles_tokens("CC!") == 2


@pytest.mark.parametrize(
    ("smiles", "says"),
    [
        ("CCO", None),
        ("c1ccccc1", None),
        ("CC!O", "invalid character '!' at 3"),
        ("C[Xe]C", "token '[Xe]', which the contract's vocabulary lacks"),
        ("CC(O", "leaves a branch open"),
        ("CC)O", "closes a branch it never opened"),
        ("c1cccc", "leaves ring 1 unclosed"),
        ("C" * 41, "more than the contract's 40"),
        ("", "empty"),
    ],
)
def test_smiles_checks(smiles: str, says: str | None) -> None:
    assert CONTRACT.molecule is not None
    problem = check_smiles(smiles, CONTRACT.molecule)
    if says is None:
        assert problem is None
    else:
        assert problem is not None and says in problem


def test_smi_file_maps_patients_and_names_bad_lines(tmp_path: Path) -> None:
    (tmp_path / "mols.smi").write_text("CCO p1\n# a comment\nc1ccccc1 p2\nCC!O p3\nCCN\n")
    read = read_dataset(_dataset("smiles", ["mols.smi"]), CONTRACT, tmp_path)
    assert {pid: r.smiles for pid, r in read.records.items()} == {"p1": "CCO", "p2": "c1ccccc1"}
    assert [(p.row, p.column) for p in read.problems] == [(4, "smiles"), (5, None)]


def test_smiles_in_a_csv_with_a_regression_target(tmp_path: Path) -> None:
    (tmp_path / "mols.csv").write_text("id,smiles,dg\nm1,CCO,-5.0\nm2,CC(=O)O,-6.7\nm3,C$$,1\n")
    dataset = _dataset(
        "smiles", ["mols.csv"], patient_id="id", targets={"activity": {"column": "dg"}}
    )
    read = read_dataset(dataset, CONTRACT, tmp_path)
    assert read.records["m2"].smiles == "CC(=O)O"
    assert read.records["m2"].targets["activity"][0] == -6.7
    assert [(p.row, p.column) for p in read.problems] == [(4, "smiles")]


def test_fasta_reads_sequences_and_labels_and_locates_bad_residues(tmp_path: Path) -> None:
    (tmp_path / "pep.fasta").write_text(
        ">pep1 is_amp=1\nGLFDIVKK\nVVGALG\n>pep2 is_amp=0\nMKTAYIAK\n>pep3 is_amp=1\nACDB1\n"
    )
    dataset = _dataset("fasta", ["pep.fasta"], targets={"is_amp": {}})
    read = read_dataset(dataset, CONTRACT, tmp_path)
    assert read.records["pep1"].protein == "GLFDIVKKVVGALG"
    assert read.records["pep1"].targets["is_amp"][0] == 1.0
    assert read.records["pep2"].targets["is_amp"][0] == 0.0
    assert "pep3" not in read.records
    (problem,) = read.problems
    assert (problem.row, problem.column) == (7, "residue 4")
    assert "'B' is not in the alphabet" in problem.message


MATRIX = {"p1": (5.0, 0.5, 12.0), "p2": (3.0, None, 1.0)}


def _write_matrix(path: Path, orientation: str, genes: tuple[str, ...]) -> None:
    if orientation == "samples_x_genes":
        lines = ["sample," + ",".join(genes)]
        for pid, values in MATRIX.items():
            lines.append(pid + "," + ",".join("NA" if v is None else str(v) for v in values))
    else:
        lines = ["gene," + ",".join(MATRIX)]
        for i, gene in enumerate(genes):
            cells = ["" if v[i] is None else str(v[i]) for v in MATRIX.values()]
            lines.append(gene + "," + ",".join(cells))
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("orientation", ["samples_x_genes", "genes_x_samples"])
def test_omics_both_orientations_give_panel_order(tmp_path: Path, orientation: str) -> None:
    # The file lists the genes in another order than the panel.
    _write_matrix(tmp_path / "m.csv", orientation, ("EGFR", "TP53", "BRCA1"))
    dataset = _dataset("omics", ["m.csv"], orientation=orientation, patient_id="sample")
    read = read_dataset(dataset, CONTRACT, tmp_path)
    assert read.problems == ()
    p1, p2 = read.records["p1"].omics, read.records["p2"].omics
    assert p1 is not None and p2 is not None
    # panel order TP53, BRCA1, EGFR from file order EGFR, TP53, BRCA1
    np.testing.assert_array_equal(p1, np.array([0.5, 12.0, 5.0], dtype=np.float32))
    # p2: EGFR 3, TP53 not measured, BRCA1 1
    assert math.isnan(float(p2[0])) and p2[1] == 1.0 and p2[2] == 3.0


def test_omics_gene_panel_mismatch_is_named(tmp_path: Path) -> None:
    _write_matrix(tmp_path / "m.csv", "samples_x_genes", ("EGFR", "TP53", "KRAS"))
    read = read_dataset(_dataset("omics", ["m.csv"]), CONTRACT, tmp_path)
    assert read.records == {}
    (problem,) = read.problems
    assert "gene panel mismatch: 1 of the panel's 3 genes are not in the matrix (BRCA1)" in (
        problem.message
    )


def test_omics_text_in_a_value_is_named(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("id,TP53,BRCA1,EGFR\np1,1,high,3\n")
    read = read_dataset(_dataset("omics", ["m.csv"], patient_id="id"), CONTRACT, tmp_path)
    assert [(p.row, p.column, p.message) for p in read.problems] == [
        (2, "BRCA1", "'high' is not a number")
    ]


_smiles_text = st.text(alphabet="CNOSPFIBrlcnos()[]=#-+@H123%0.\\/", max_size=24)


@settings(max_examples=300, deadline=None)
@given(smiles=st.one_of(_smiles_text, st.sampled_from(["CCO", "c1ccccc1", "C[C@@H](N)C(=O)O"])))
def test_what_sites_accept_the_model_tokenizes(smiles: str) -> None:
    """The site's check is at least as strict as the model's tokenizer: a molecule that
    passes `medfed site check` never fails later in training."""
    assert CONTRACT.molecule is not None
    if check_smiles(smiles, CONTRACT.molecule) is None:
        tokens = SmilesTokenizer(CONTRACT.molecule).tokenize(smiles, patient_id="p")
        assert tokens == smiles_tokens(smiles)


@settings(max_examples=200, deadline=None)
@given(sequence=st.text(alphabet="ACDEFGHIKLMNPQRSTVWYXBZ*a", max_size=40))
def test_what_sites_accept_the_protein_tokenizer_encodes(sequence: str) -> None:
    assert CONTRACT.protein is not None
    tokenizer = ProteinTokenizer(CONTRACT.protein)
    if check_protein(sequence, CONTRACT.protein) is None:
        assert len(tokenizer.encode(sequence, patient_id="p")) == len(sequence)
    else:
        with pytest.raises(TokenizeError):
            tokenizer.encode(sequence, patient_id="p")


@pytest.mark.parametrize(
    ("fmt", "name"),
    [("smiles", "m.smi"), ("smiles", "m.csv"), ("fasta", "p.fasta"), ("omics", "o.csv")],
)
def test_a_missing_file_is_a_problem_naming_it(tmp_path: Path, fmt: str, name: str) -> None:
    read = read_dataset(_dataset(fmt, [name]), CONTRACT, tmp_path)
    assert read.records == {}
    assert [(p.file, p.message) for p in read.problems] == [
        (str(tmp_path / name), "cannot be read (No such file or directory)")
    ]
