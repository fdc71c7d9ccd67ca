"""The network's size presets, from CPU-tiny upwards (no torch here: light modules check names)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

PresetName = Literal["tiny"]
PRESET_NAMES: frozenset[str] = frozenset(get_args(PresetName))


@dataclass(frozen=True)
class Preset:
    """Sizes of the network for one preset."""

    name: PresetName
    hidden: int
    fusion_layers: int


PRESETS: Mapping[PresetName, Preset] = {
    "tiny": Preset(name="tiny", hidden=32, fusion_layers=1),
}
