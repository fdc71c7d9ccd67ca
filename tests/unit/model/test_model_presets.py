"""Presets: one `Preset` shape, sizes from CPU-tiny to a billion parameters."""

from __future__ import annotations

import pytest
import torch

from medfed.model.contract import DEMO_CONTRACT, StudyContract
from medfed.model.errors import UnknownPresetError
from medfed.model.network import build_model
from medfed.model.presets import PRESET_NAMES, PRESETS, Preset, PresetName, preset_named
from tests.modelkit import all_modalities_contract

CONTRACTS = {"demo": DEMO_CONTRACT, "all": all_modalities_contract()}


def parameters(preset: PresetName, contract: StudyContract, *, meta: bool) -> int:
    device = torch.device("meta") if meta else None
    model = build_model(preset, contract=contract, seed=0, device=device)
    return sum(p.numel() for p in model.parameters())


def test_presets_are_consistent() -> None:
    assert set(PRESETS) == PRESET_NAMES == {"linear", "mlp", "tiny", "small", "base", "large"}
    for name, preset in PRESETS.items():
        assert preset.name == name
        assert preset.hidden % preset.heads == 0
        if preset.architecture == "fusion":
            assert preset.lower_layers >= 1 and preset.upper_layers >= 1
    assert preset_named("small") is PRESETS["small"]
    with pytest.raises(
        UnknownPresetError,
        match="known: \\['base', 'large', 'linear', 'mlp', 'small', 'tiny'\\]",
    ):
        preset_named("medium")


def test_heads_must_divide_the_width() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        Preset("tiny", hidden=30, heads=4, lower_layers=1, upper_layers=1, ffn_multiplier=2)


@pytest.mark.parametrize("contract", CONTRACTS.values(), ids=CONTRACTS.keys())
@pytest.mark.parametrize(
    ("preset", "low", "high", "meta"),
    [
        ("tiny", 1_000, 500_000, False),
        ("small", 5_000_000, 10_000_000, False),
        ("base", 80_000_000, 130_000_000, True),
        ("large", 800_000_000, 1_300_000_000, True),
    ],
)
def test_parameter_counts(
    preset: PresetName, low: int, high: int, meta: bool, contract: StudyContract
) -> None:
    assert low <= parameters(preset, contract, meta=meta) <= high


def test_meta_and_real_builds_count_alike() -> None:
    for contract in CONTRACTS.values():
        assert parameters("small", contract, meta=True) == parameters("small", contract, meta=False)


def test_the_suggestion_follows_the_cohort_size_and_modalities() -> None:
    from medfed.model.presets import suggest_preset

    assert suggest_preset(patients=180, sequences=False).preset == "linear"
    assert suggest_preset(patients=180, sequences=False).sample_rate == 0.5
    assert suggest_preset(patients=5_000, sequences=False).preset == "mlp"
    assert suggest_preset(patients=100_000, sequences=False).preset == "tiny"
    assert suggest_preset(patients=300, sequences=True).preset == "tiny"
    large = suggest_preset(patients=25_600, sequences=False)
    assert large.sample_rate == pytest.approx(0.01) and large.local_steps == 20
