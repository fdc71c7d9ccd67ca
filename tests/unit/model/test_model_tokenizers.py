"""Tokenizers and the batch layout: known examples, error messages, Hypothesis properties."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from medfed.model.contract import MoleculeSpec, ProteinSpec
from medfed.model.errors import InputError, TokenizeError
from medfed.model.sample import PatientSample
from medfed.model.tokenizers import (
    RING_CLOSURES,
    ProteinTokenizer,
    SmilesTokenizer,
    encode,
    input_layout,
    split_tensors,
    target_layout,
)
from tests.modelkit import all_modalities_contract

CONTRACT = all_modalities_contract()
SMILES = SmilesTokenizer(MoleculeSpec(max_length=200))
PROTEIN = ProteinTokenizer(ProteinSpec(max_length=200))
KNOWN_TOKENS = sorted(set(SMILES.tokens))


@pytest.mark.parametrize(
    ("smiles", "tokens"),
    [
        ("CC(=O)Oc1ccccc1C(=O)O", "C C ( = O ) O c 1 c c c c c 1 C ( = O ) O"),
        ("C[C@@H](N)C(=O)O", "C [C@@H] ( N ) C ( = O ) O"),
        ("Clc1ccc(Br)cc1", "Cl c 1 c c c ( Br ) c c 1"),
        ("c1cc[nH]c1", "c 1 c c [nH] c 1"),
        ("C%12CC%12", "C %12 C C %12"),
        ("[Na+].[Cl-]", "[Na+] . [Cl-]"),
        ("F/C=C/F", "F / C = C / F"),
    ],
)
def test_smiles_atom_level_tokens(smiles: str, tokens: str) -> None:
    assert SMILES.tokenize(smiles, patient_id="p1") == tokens.split()


@pytest.mark.parametrize(
    ("smiles", "message"),
    [
        ("C[Xe]", r"patient p7: SMILES token '\[Xe\]' at position 1 is not in the contract"),
        ("CC*", r"patient p7: SMILES token '\*' at position 2 is not in the contract"),
        ("Cw", r"patient p7: SMILES character 'w' at position 1 is not valid SMILES"),
        ("C]C", r"patient p7: SMILES character '\]' at position 1 is not valid SMILES"),
        ("C C", r"patient p7: SMILES character ' ' at position 1 is not valid SMILES"),
        ("", "patient p7: the SMILES string is empty"),
    ],
)
def test_bad_smiles_name_patient_token_and_position(smiles: str, message: str) -> None:
    with pytest.raises(TokenizeError, match=message) as error:
        SMILES.tokenize(smiles, patient_id="p7")
    assert error.value.patient_id == "p7"


def test_smiles_longer_than_the_contract_allows_is_refused() -> None:
    short = SmilesTokenizer(MoleculeSpec(max_length=3))
    assert short.encode("CCO", patient_id="p") == short.encode("CCO", patient_id="q")
    with pytest.raises(TokenizeError, match="4 tokens, more than the contract's maximum 3"):
        short.encode("CCCO", patient_id="p")


def test_a_custom_vocabulary_is_the_only_one_known() -> None:
    carbon_only = SmilesTokenizer(MoleculeSpec(max_length=9, vocabulary=("C",)))
    assert carbon_only.tokenize("C1CC1", patient_id="p") == ["C", "1", "C", "C", "1"]
    with pytest.raises(TokenizeError, match="'O' at position 1"):
        carbon_only.tokenize("CO", patient_id="p")


token_lists = st.lists(st.sampled_from(KNOWN_TOKENS), min_size=1, max_size=60)


@given(token_lists)
def test_smiles_round_trip_over_known_tokens(tokens: list[str]) -> None:
    text = "".join(tokens)
    assert SMILES.tokenize(text, patient_id="p") == tokens
    ids = SMILES.encode(text, patient_id="p")
    assert len(ids) == len(tokens) and min(ids) >= 1
    assert SMILES.decode(ids) == text


@given(token_lists, st.data(), st.sampled_from(["w", "!", " ", "]", "*", "[Xe]", "Z"]))
def test_smiles_errors_point_at_the_inserted_token(
    tokens: list[str], data: st.DataObject, bad: str
) -> None:
    at = data.draw(st.integers(0, len(tokens)))
    text = "".join(tokens[:at]) + bad + "".join(tokens[at:])
    position = len("".join(tokens[:at]))
    with pytest.raises(TokenizeError, match=f"at position {position} "):
        SMILES.tokenize(text, patient_id="p")


@settings(max_examples=300)
@given(st.text(max_size=40))
def test_any_text_tokenizes_or_raises_only_tokenize_error(text: str) -> None:
    try:
        tokens = SMILES.tokenize(text, patient_id="p")
    except TokenizeError:
        return
    assert "".join(tokens) == text


def test_ring_closures_are_always_known() -> None:
    assert set(RING_CLOSURES) <= set(SMILES.tokens)
    assert len(SMILES.tokens) == len(set(SMILES.tokens))


@given(st.text(alphabet="ACDEFGHIKLMNPQRSTVWY", min_size=1, max_size=200))
def test_protein_round_trip(sequence: str) -> None:
    ids = PROTEIN.encode(sequence, patient_id="p")
    assert len(ids) == len(sequence) and min(ids) >= 1
    assert PROTEIN.decode(ids) == sequence


@given(
    st.text(alphabet="ACDEFGHIKLMNPQRSTVWY", max_size=50),
    st.text(alphabet="ACDEFGHIKLMNPQRSTVWY", max_size=50),
    st.sampled_from(["X", "B", "a", "*", " ", "é"]),
)
def test_unknown_residue_is_named_with_its_position(head: str, tail: str, bad: str) -> None:
    with pytest.raises(TokenizeError, match=re.escape(f"residue {bad!r} at position {len(head)} ")):
        PROTEIN.encode(head + bad + tail, patient_id="p9")


@given(st.text(max_size=60))
def test_any_protein_text_encodes_or_raises_only_tokenize_error(text: str) -> None:
    try:
        ids = PROTEIN.encode(text, patient_id="p")
    except TokenizeError:
        return
    assert PROTEIN.decode(ids) == text


# --- Clinical, omics and targets through encode ------------------------------------


def full_sample(patient_id: str = "p1", **overrides: object) -> PatientSample:
    values: dict[str, object] = {
        "patient_id": patient_id,
        "numeric": {"age": 75.0},
        "codes": {"diagnoses": frozenset({"N18.3", "I10"}), "drugs": frozenset({"A10BA02"})},
        "omics": np.array([0.0, np.nan, 3.0, 10.0, np.nan]),
        "smiles": "CCO",
        "protein": "MKV",
        "targets": {"readmitted": 1, "stage": 2, "egfr_slope": -1.5, "time_d": 300, "died": 0},
    }
    values.update(overrides)
    return PatientSample(**values)  # type: ignore[arg-type]


def named_inputs(samples: list[PatientSample]) -> dict[str, torch.Tensor]:
    batch = encode(samples, CONTRACT)
    return dict(zip(input_layout(CONTRACT), batch.inputs, strict=True))


def test_numeric_features_are_standardised_by_the_contract_reference() -> None:
    named = named_inputs([full_sample()])
    # age: (75 - 60) / 15 = 1; creatinine unknown: 0 with known False.
    assert named["clinical.values"].tolist() == [[1.0, 0.0]]
    assert named["clinical.known"].tolist() == [[True, False]]


def test_codes_are_ids_over_both_vocabularies() -> None:
    named = named_inputs([full_sample(), full_sample("p2", codes={})])
    # diagnoses I10=1, E11.9=2, N18.3=3; drugs C09AA05=4, A10BA02=5.
    assert named["clinical.codes"].tolist() == [[1, 3, 5], [0, 0, 0]]


def test_omics_are_log1p_then_standardised_and_unmeasured_genes_are_unknown() -> None:
    named = named_inputs([full_sample()])
    expected = [math.log1p(0.0), 0.0, math.log1p(3.0), math.log1p(10.0), 0.0]
    assert named["omics.values"][0].tolist() == pytest.approx(expected)
    assert named["omics.known"][0].tolist() == [True, False, True, True, False]


def test_sequences_are_padded_to_the_contract_length() -> None:
    named = named_inputs([full_sample()])
    assert named["molecule.ids"].shape == (1, 24)
    assert named["protein.ids"].shape == (1, 16)
    assert (named["molecule.ids"][0, 3:] == 0).all() and (named["molecule.ids"][0, :3] > 0).all()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"numeric": {"age": 130.0}}, r"age = 130.0 a is outside the plausible range \[0, 120\]"),
        ({"numeric": {"age": math.nan}}, "age = nan a is outside"),
        ({"numeric": {"weight": 70.0}}, r"numeric features not in the contract: \['weight'\]"),
        ({"codes": {"diagnoses": frozenset({"I11"})}}, "code 'I11' of diagnoses is not in"),
        ({"codes": {"procedures": frozenset({"X"})}}, "categorical feature 'procedures' is not"),
        ({"omics": np.array([1.0, -2.0, 0, 0, 0])}, "omics value of BRCA1 is -2.0"),
        ({"omics": np.array([1.0, np.inf, 0, 0, 0])}, "omics value of BRCA1 is inf"),
        ({"omics": np.zeros(4)}, "omics has 4 values, the panel has 5 genes"),
        ({"smiles": "C[Xe]"}, r"SMILES token '\[Xe\]' at position 1"),
        ({"protein": "MKX"}, "residue 'X' at position 2"),
        ({"targets": {"readmitted": 2}}, "readmitted = 2.0 is not 0 or 1"),
        ({"targets": {"stage": 3}}, "stage = 3.0 is not a class index below 3"),
        ({"targets": {"stage": 0.5}}, "stage = 0.5 is not a class index"),
        ({"targets": {"egfr_slope": math.inf}}, "egfr_slope = inf is not finite"),
        ({"targets": {"time_d": 10}}, r"task survival is missing \['died'\]"),
        ({"targets": {"time_d": -1, "died": 1}}, "time_d = -1.0 is a negative time"),
        ({"targets": {"time_d": 1, "died": 0.5}}, "died = 0.5 is not 0 or 1"),
        ({"targets": {"los_d": 3}}, r"target fields not in the contract: \['los_d'\]"),
    ],
)
def test_bad_values_are_refused_naming_the_patient(
    overrides: dict[str, object], message: str
) -> None:
    samples = [full_sample("ok"), full_sample("p42", **overrides)]
    with pytest.raises(TokenizeError, match=f"patient p42: {message}"):
        encode(samples, CONTRACT)


@pytest.mark.parametrize(
    ("dropped", "message"),
    [
        ({"molecule": None}, "has a molecule"),
        ({"protein": None}, "has a protein"),
        ({"omics": None}, "has omics"),
        ({"numeric": ()}, "has numeric features"),
        ({"categorical": ()}, "categorical feature 'diagnoses' is not in the contract"),
    ],
)
def test_a_modality_the_contract_lacks_is_refused(dropped: dict[str, object], message: str) -> None:
    narrower = CONTRACT.model_validate(CONTRACT.model_dump() | dropped)
    with pytest.raises(TokenizeError, match=f"patient p1: {message}"):
        encode([full_sample()], narrower)


def test_targets_and_labelled_masks() -> None:
    batch = encode([full_sample(), full_sample("p2", targets={})], CONTRACT)
    assert batch.targets["readmission"][0].tolist() == [1.0, 0.0]
    assert batch.targets["stage"][0].dtype == torch.long
    assert batch.targets["stage"][0].tolist() == [2, 0]
    assert batch.targets["egfr"][0].tolist() == [-1.5, 0.0]
    assert batch.targets["survival"][0].tolist() == [[300.0, 0.0], [0.0, 0.0]]
    for target, labelled in batch.targets.values():
        assert labelled.tolist() == [True, False]
        assert target.shape[0] == 2


def test_split_tensors_inverts_tensors_and_a_dataset_carries_them() -> None:
    batch = encode([full_sample(), full_sample("p2", smiles=None)], CONTRACT)
    flat = batch.tensors()
    assert len(flat) == len(input_layout(CONTRACT)) + len(target_layout(CONTRACT))
    inputs, targets = split_tensors(CONTRACT, flat)
    assert all(a is b for a, b in zip(inputs, batch.inputs, strict=True))
    assert targets.keys() == batch.targets.keys()
    loaded = next(iter(DataLoader(TensorDataset(*flat), batch_size=2)))
    again, _ = split_tensors(CONTRACT, loaded)
    assert all(torch.equal(a, b) for a, b in zip(again, batch.inputs, strict=True))
    with pytest.raises(InputError, match=f"expected {len(flat)} tensors"):
        split_tensors(CONTRACT, flat[:-1])


def test_an_empty_batch_has_every_tensor_with_no_rows() -> None:
    batch = encode([], CONTRACT)
    assert len(batch) == 0
    assert all(t.shape[0] == 0 for t in batch.tensors())
    assert len(batch.tensors()) == len(input_layout(CONTRACT)) + len(target_layout(CONTRACT))


modality_subsets = st.fixed_dictionaries(
    {
        "numeric": st.booleans(),
        "codes": st.booleans(),
        "omics": st.booleans(),
        "smiles": st.booleans(),
        "protein": st.booleans(),
    }
)


@given(st.lists(modality_subsets, max_size=6))
def test_documents_are_present_exactly_when_given(subsets: list[dict[str, bool]]) -> None:
    samples = [
        PatientSample(
            f"p{i}",
            {"age": 50.0} if has["numeric"] else {},
            {"drugs": frozenset({"C09AA05"})} if has["codes"] else {},
            omics=np.ones(5) if has["omics"] else None,
            smiles="c1ccccc1" if has["smiles"] else None,
            protein="MKVL" if has["protein"] else None,
        )
        for i, has in enumerate(subsets)
    ]
    present = encode(samples, CONTRACT).present()
    assert present["clinical"].tolist() == [h["numeric"] or h["codes"] for h in subsets]
    assert present["omics"].tolist() == [h["omics"] for h in subsets]
    assert present["molecule"].tolist() == [h["smiles"] for h in subsets]
    assert present["protein"].tolist() == [h["protein"] for h in subsets]
