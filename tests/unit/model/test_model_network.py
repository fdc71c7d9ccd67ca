"""The fusion network: every subset of modalities, absent means absent, Opacus-ready layers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from opacus.data_loader import DPDataLoader
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from medfed.model.contract import DEMO_CONTRACT, MODALITY_ORDER
from medfed.model.errors import InputError, UnknownPresetError
from medfed.model.network import MedModel, build_model, model_identity, state_arrays
from medfed.model.presets import Preset
from medfed.model.tokenizers import encode, split_tensors
from tests.modelkit import SUBSETS, all_modalities_contract, sample

CONTRACT = all_modalities_contract()


def total_loss(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum((out.pow(2).sum() for out in outputs.values()), torch.zeros(()))


@pytest.fixture(scope="module")
def model() -> MedModel:
    return build_model("tiny", contract=CONTRACT, seed=3)


@pytest.mark.parametrize("modalities", SUBSETS, ids=lambda s: "+".join(sorted(s)) or "none")
def test_forward_and_backward_for_every_subset_of_modalities(
    model: MedModel, modalities: frozenset[str]
) -> None:
    batch = encode([sample(f"p{i}", modalities, seed=i) for i in range(3)], CONTRACT)
    model.zero_grad()
    outputs = model(*batch.inputs)
    assert {name: tuple(out.shape) for name, out in outputs.items()} == {
        "readmission": (3,),
        "stage": (3, 3),
        "egfr": (3,),
        "survival": (3,),
    }
    assert all(torch.isfinite(out).all() for out in outputs.values())
    total_loss(outputs).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        if name.startswith("encoders."):
            modality = name.split(".")[1]
            touched = bool(parameter.grad.abs().sum() > 0)
            assert touched == (modality in modalities), name


def test_a_patient_is_encoded_alike_alone_or_in_any_batch(model: MedModel) -> None:
    samples = [sample(f"p{i}", subset, seed=i) for i, subset in enumerate(SUBSETS)]
    together = model(*encode(samples, CONTRACT).inputs)
    for i, one in enumerate(samples):
        alone = model(*encode([one], CONTRACT).inputs)
        for task, out in alone.items():
            torch.testing.assert_close(out[0], together[task][i], rtol=1e-5, atol=1e-6)


def test_an_absent_modality_is_absent_not_zero(model: MedModel) -> None:
    samples = [sample("no-omics", frozenset({"clinical", "molecule"}), seed=1)]
    inputs = list(encode(samples, CONTRACT).inputs)
    before = model(*inputs)
    changed = build_model("tiny", contract=CONTRACT, seed=3)
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        for parameter in changed.encoders["omics"].parameters():
            parameter.normal_(0.0, 5.0)
    omics_values = 3  # index in the layout: clinical.values, .known, .codes, omics.values
    inputs[omics_values] = torch.full_like(inputs[omics_values], 7.5)
    after = changed(*inputs)
    for task in before:
        assert torch.equal(before[task], after[task]), task
    # ... while the same change moves a patient who has omics.
    has_omics = list(encode([sample("omics", frozenset({"omics"}), seed=1)], CONTRACT).inputs)
    assert not torch.equal(model(*has_omics)["readmission"], changed(*has_omics)["readmission"])


def test_a_missing_numeric_value_is_a_learned_token(model: MedModel) -> None:
    patient = sample("p", frozenset({"clinical"}))  # age known, creatinine missing
    inputs = encode([patient], CONTRACT).inputs
    changed = build_model("tiny", contract=CONTRACT, seed=3)
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        # A random shift: a constant one would vanish in the LayerNorm that follows.
        missing = changed.encoders["clinical"].missing.weight  # type: ignore[union-attr]
        missing[1].add_(torch.randn(missing.shape[1]))
    assert not torch.equal(model(*inputs)["egfr"], changed(*inputs)["egfr"])


def _lower_layer_tokens(model: MedModel, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    hook = model.fusion.lower[-1].register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        model(*inputs)
    finally:
        hook.remove()
    return captured[0]


def test_lower_layers_attend_within_a_document_only(model: MedModel) -> None:
    with_ethanol = sample("p", frozenset(MODALITY_ORDER), seed=0)
    with_phenol = sample("p", frozenset(MODALITY_ORDER), seed=1)
    first = _lower_layer_tokens(model, encode([with_ethanol], CONTRACT).inputs)
    other_molecule = list(encode([with_ethanol], CONTRACT).inputs)
    other_molecule[5] = encode([with_phenol], CONTRACT).inputs[5]  # molecule.ids only
    second = _lower_layer_tokens(model, tuple(other_molecule))
    # Tokens: fusion (1), clinical numeric (2) and codes (1), omics (5), molecule (24), protein.
    molecule = slice(1 + 2 + 1 + 5, 1 + 2 + 1 + 5 + 24)
    outside = torch.ones(first.shape[1], dtype=torch.bool)
    outside[molecule] = False
    assert torch.equal(first[:, outside], second[:, outside])
    assert not torch.equal(first[:, molecule], second[:, molecule])


def test_upper_layers_fuse_across_documents() -> None:
    only_lower = MedModel(
        CONTRACT,
        Preset("tiny", hidden=16, heads=2, lower_layers=1, upper_layers=0, ffn_multiplier=2),
    )
    only_upper = MedModel(
        CONTRACT,
        Preset("tiny", hidden=16, heads=2, lower_layers=0, upper_layers=1, ffn_multiplier=2),
    )
    samples = [sample(f"p{i}", frozenset(MODALITY_ORDER), seed=i) for i in range(3)]
    inputs = encode(samples, CONTRACT).inputs
    lower_out = only_lower(*inputs)["egfr"]
    upper_out = only_upper(*inputs)["egfr"]
    # Without cross-document layers the fusion token reads nothing but itself.
    assert torch.allclose(lower_out, lower_out[0].expand(3))
    assert not torch.allclose(upper_out, upper_out[0].expand(3))


def test_a_batch_where_no_patient_has_any_data_is_finite(model: MedModel) -> None:
    outputs = model(*encode([sample("a", frozenset()), sample("b", frozenset())], CONTRACT).inputs)
    assert all(torch.isfinite(out).all() for out in outputs.values())
    empty = model(*encode([], CONTRACT).inputs)
    assert empty["stage"].shape == (0, 3) and empty["egfr"].shape == (0,)


def test_the_wrong_number_of_inputs_is_refused(model: MedModel) -> None:
    inputs = encode([sample("p", frozenset())], CONTRACT).inputs
    with pytest.raises(InputError, match="the network takes 7 tensors"):
        model(*inputs[:-1])


@pytest.mark.parametrize("contract", [CONTRACT, DEMO_CONTRACT], ids=["all", "demo"])
def test_opacus_validator_finds_nothing_to_fix(contract: object) -> None:
    net = build_model("tiny", contract=contract, seed=0)  # type: ignore[arg-type]
    assert ModuleValidator.validate(net, strict=True) == []


def test_parameters_are_named_by_group(model: MedModel) -> None:
    prefixes = [f"encoders.{m}." for m in MODALITY_ORDER] + ["fusion."]
    prefixes += [f"heads.{task.name}." for task in CONTRACT.tasks]
    names = list(state_arrays(model))
    assert all(name.startswith(tuple(prefixes)) for name in names)
    for prefix in prefixes:
        assert any(name.startswith(prefix) for name in names), prefix
    demo = state_arrays(build_model("tiny", contract=DEMO_CONTRACT, seed=0))
    assert {name.split(".")[1] for name in demo if name.startswith("encoders.")} == {"clinical"}
    assert demo["heads.readmission.weight"].shape == (1, 32)


def test_same_seed_same_weights_and_the_global_generator_is_left_alone() -> None:
    torch.manual_seed(1234)
    expected_next = torch.rand(1)
    torch.manual_seed(1234)
    first = state_arrays(build_model("tiny", contract=CONTRACT, seed=5))
    assert torch.equal(torch.rand(1), expected_next)
    second = state_arrays(build_model("tiny", contract=CONTRACT, seed=5))
    third = state_arrays(build_model("tiny", contract=CONTRACT, seed=6))
    assert all(np.array_equal(first[name], second[name]) for name in first)
    assert not np.array_equal(first["fusion.token.weight"], third["fusion.token.weight"])


def test_meta_device_builds_shapes_without_memory() -> None:
    meta = build_model("tiny", contract=CONTRACT, seed=0, device=torch.device("meta"))
    real = build_model("tiny", contract=CONTRACT, seed=0)
    assert all(p.is_meta for p in meta.parameters())
    assert [(n, p.shape) for n, p in meta.named_parameters()] == [
        (n, p.shape) for n, p in real.named_parameters()
    ]


def test_an_unknown_preset_is_refused() -> None:
    with pytest.raises(UnknownPresetError, match="unknown preset 'huge'"):
        build_model("huge", contract=CONTRACT, seed=0)  # type: ignore[arg-type]


def test_model_identity_is_preset_and_contract() -> None:
    identity = model_identity("tiny", CONTRACT)
    assert identity == model_identity("tiny", all_modalities_contract())
    assert CONTRACT.sha256() in identity
    assert identity != model_identity("small", CONTRACT)
    assert identity != model_identity("tiny", DEMO_CONTRACT)


def test_opacus_poisson_loader_carries_the_tensors_empty_batches_included(
    model: MedModel,
) -> None:
    batch = encode([sample(f"p{i}", s, seed=i) for i, s in enumerate(SUBSETS)], CONTRACT)
    loader = DPDataLoader.from_data_loader(
        DataLoader(TensorDataset(*batch.tensors()), batch_size=1),  # rate 1/18
        generator=torch.Generator().manual_seed(0),
    )
    sizes = []
    for tensors in itertools.islice(itertools.cycle(loader), 40):
        inputs, targets = split_tensors(CONTRACT, tensors)
        sizes.append(len(targets["stage"][0]))
        assert [t.dtype for t in inputs] == [t.dtype for t in batch.inputs]
        outputs = model(*inputs)
        assert outputs["stage"].shape == (sizes[-1], 3)
    assert 0 in sizes and max(sizes) > 0
