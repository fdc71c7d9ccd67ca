"""The network's presets: tabular `linear` and `mlp`, and the fusion transformer from
CPU-tiny to accelerator-large, all from one `Preset`.

No torch here: light modules (the CLI, configs) check preset names without importing it.
Fusion sizes for the demo's contract (embeddings add what a contract's vocabularies,
panel and lengths need): tiny 18 k, small 6.3 M, base 92 M, large 1.0 B parameters.
`linear` is a linear head on the standardised features (a Cox / logistic / ridge model:
9 parameters for the demo's contract); `mlp` one hidden layer of 32 units between them.
For a cohort of a few hundred patients with a dozen features, `linear` or `mlp` fit;
the fusion transformer needs thousands (`suggest_preset`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from medfed.model.errors import UnknownPresetError

PresetName = Literal["linear", "mlp", "tiny", "small", "base", "large"]
Architecture = Literal["linear", "mlp", "fusion"]
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
    architecture: Architecture = "fusion"

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"preset {self.name}: hidden {self.hidden} not divisible by heads")

    @property
    def fusion_layers(self) -> int:
        """All transformer blocks, lower and upper."""
        return self.lower_layers + self.upper_layers


PRESETS: Mapping[PresetName, Preset] = {
    "linear": Preset(
        "linear",
        hidden=0,
        heads=1,
        lower_layers=0,
        upper_layers=0,
        ffn_multiplier=1,
        architecture="linear",
    ),
    "mlp": Preset(
        "mlp",
        hidden=32,
        heads=1,
        lower_layers=0,
        upper_layers=0,
        ffn_multiplier=1,
        architecture="mlp",
    ),
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


SMALL_COHORT_PATIENTS = 2_000
"""Below this many training patients in the whole consortium, a tabular study suggests
`linear`; below `MLP_COHORT_PATIENTS`, `mlp`; sequences and larger cohorts the fusion."""
MLP_COHORT_PATIENTS = 20_000


@dataclass(frozen=True)
class Suggestion:
    """A preset, local steps and sample rate that suit a cohort, and why, in a sentence."""

    preset: PresetName
    local_steps: int
    sample_rate: float
    reason: str


def suggest_preset(*, patients: int, sequences: bool) -> Suggestion:
    """What suits `patients` training patients (a site's, or the consortium's).

    Tabular data (clinical, omics) of a few hundred patients: `linear` (as many
    parameters as features); thousands: `mlp`; molecules or proteins: the fusion
    transformer `tiny` (its token embeddings read sequences). Under DP-SGD a small cohort
    wants large batches (the noise is divided by the batch) and short rounds: sample rate
    0.5 and 5 local steps; a large one a batch of about 256 and 20 steps.
    """
    if patients < SMALL_COHORT_PATIENTS:
        rate, steps = 0.5, 5
    else:
        rate, steps = max(0.01, min(0.5, 256 / patients)), 20
    if sequences:
        why = "molecules or proteins: the fusion transformer reads sequences"
        return Suggestion("tiny", steps, rate, why)
    if patients < SMALL_COHORT_PATIENTS:
        why = f"{patients} patients: a linear model (as Cox / logistic regression) fits"
        return Suggestion("linear", steps, rate, why)
    if patients < MLP_COHORT_PATIENTS:
        return Suggestion("mlp", steps, rate, f"{patients} patients: a small MLP")
    return Suggestion("tiny", steps, rate, f"{patients} patients: the fusion transformer")
