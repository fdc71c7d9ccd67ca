"""The network's size presets, from CPU-tiny to accelerator-large, all from one `Preset`.

No torch here: light modules (the CLI, configs) check preset names without importing it.
Sizes for the demo's contract (embeddings add what a contract's vocabularies, panel and
lengths need): tiny 18 k, small 6.3 M, base 92 M, large 1.0 B parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from medfed.model.errors import UnknownPresetError

PresetName = Literal["tiny", "small", "base", "large"]
PRESET_NAMES: frozenset[str] = frozenset(get_args(PresetName))


@dataclass(frozen=True)
class Preset:
    """Sizes of the fusion network for one preset.

    `lower_layers` attend within each modality's document, `upper_layers` across all
    documents; each layer is a pre-norm transformer block of width `hidden` with
    `heads` attention heads and a feed-forward width of `ffn_multiplier * hidden`.
    """

    name: PresetName
    hidden: int
    heads: int
    lower_layers: int
    upper_layers: int
    ffn_multiplier: int

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"preset {self.name}: hidden {self.hidden} not divisible by heads")

    @property
    def fusion_layers(self) -> int:
        """All transformer blocks, lower and upper."""
        return self.lower_layers + self.upper_layers


PRESETS: Mapping[PresetName, Preset] = {
    "tiny": Preset("tiny", hidden=32, heads=4, lower_layers=1, upper_layers=1, ffn_multiplier=2),
    "small": Preset("small", hidden=256, heads=8, lower_layers=2, upper_layers=6, ffn_multiplier=4),
    "base": Preset("base", hidden=768, heads=12, lower_layers=4, upper_layers=9, ffn_multiplier=4),
    "large": Preset(
        "large", hidden=2048, heads=16, lower_layers=5, upper_layers=15, ffn_multiplier=4
    ),
}


def preset_named(name: str) -> Preset:
    """The preset called `name`; `UnknownPresetError` lists the known ones otherwise."""
    if name not in PRESETS:
        raise UnknownPresetError(f"unknown preset {name!r}; known: {sorted(PRESET_NAMES)}")
    return PRESETS[name]  # type: ignore[index]
