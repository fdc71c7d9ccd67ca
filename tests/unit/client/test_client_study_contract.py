"""The study's contract as a site decodes it off the wire: strict, size-limited, and bound
to its digest. Fuzzed: no text makes the decoder raise anything but a `SiteRefusal`."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.client.errors import SiteRefusal
from medfed.client.study_contract import decode_contract
from medfed.model import wire
from medfed.model.contract import DEMO_CONTRACT, StudyContract
from tests.modelkit import all_modalities_contract

CONTRACTS = [DEMO_CONTRACT, all_modalities_contract()]


@pytest.mark.parametrize("contract", CONTRACTS, ids=["demo", "all-modalities"])
def test_a_contract_round_trips_through_its_canonical_json(contract: StudyContract) -> None:
    text = contract.canonical_json()
    decoded = decode_contract(text, hashlib.sha256(text.encode()).hexdigest())
    assert decoded == contract
    assert decoded.sha256() == contract.sha256()


def test_a_contract_with_another_digest_is_refused() -> None:
    other = DEMO_CONTRACT.model_copy(update={"name": "other"})
    with pytest.raises(SiteRefusal, match="does not match its announced digest"):
        decode_contract(other.canonical_json(), DEMO_CONTRACT.sha256())


def test_an_unknown_key_is_refused_naming_it() -> None:
    document = json.loads(DEMO_CONTRACT.canonical_json())
    document["smuggled"] = 1
    with pytest.raises(SiteRefusal, match="key smuggled"):
        decode_contract(json.dumps(document), DEMO_CONTRACT.sha256())


def test_an_oversized_contract_is_refused_before_it_is_parsed() -> None:
    text = " " * (wire.MAX_CONTRACT_BYTES + 1)
    with pytest.raises(SiteRefusal, match="over the limit"):
        decode_contract(text, DEMO_CONTRACT.sha256())


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=2000), st.text(max_size=64))
def test_no_text_makes_the_decoder_raise_anything_but_a_refusal(text: str, digest: str) -> None:
    try:
        decode_contract(text, digest)
    except SiteRefusal as refusal:
        assert "\n" not in str(refusal)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(JSON)
def test_no_json_document_makes_the_decoder_raise_anything_but_a_refusal(value: object) -> None:
    text = json.dumps(value)
    try:
        decoded = decode_contract(text, DEMO_CONTRACT.sha256())
    except SiteRefusal:
        return
    assert decoded == DEMO_CONTRACT  # only the contract with that digest gets through


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_a_mutated_demo_contract_is_refused_or_is_the_demo_contract(data: st.DataObject) -> None:
    document = json.loads(DEMO_CONTRACT.canonical_json())
    key = data.draw(st.sampled_from(sorted(document)))
    document[key] = data.draw(JSON)
    try:
        decoded = decode_contract(json.dumps(document), DEMO_CONTRACT.sha256())
    except SiteRefusal:
        return
    assert decoded == DEMO_CONTRACT
