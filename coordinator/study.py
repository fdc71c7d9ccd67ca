"""The study's settings as a strict, frozen model parsed from Flower's run config at the edge."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coordinator.errors import StudyConfigError
from model.presets import PresetName


class StudySettings(BaseModel):
    """What a run trains, how, and for how long. Keys are the run config's, with hyphens."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    num_rounds: int = Field(alias="num-server-rounds", ge=1, le=10_000)
    local_steps: int = Field(alias="local-steps", ge=1, le=1_000_000)
    learning_rate: float = Field(alias="learning-rate", gt=0, le=100)
    noise_multiplier: float = Field(alias="noise-multiplier", gt=0, le=1_000)
    max_grad_norm: float = Field(alias="max-grad-norm", gt=0, le=1_000)
    delta: float = Field(alias="delta", gt=0, lt=1)
    sample_rate: float = Field(alias="sample-rate", gt=0, le=1)
    min_sites: int = Field(alias="min-sites", ge=1)
    round_timeout_s: float = Field(alias="round-timeout-s", gt=0)
    seed: int = Field(alias="seed", ge=0)
    results_path: str = Field(alias="results-path", default="")
    sites_root: str = Field(alias="sites-root", default="")
    preset: PresetName = "tiny"

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> StudySettings:
        """Parse Flower's run config; a bad key raises `StudyConfigError` naming it."""
        values = dict(run_config)
        for key in (
            "learning-rate",
            "noise-multiplier",
            "max-grad-norm",
            "delta",
            "sample-rate",
            "round-timeout-s",
        ):
            # TOML writes 1.0 as a float but 1 as an int; both mean the same number here.
            if isinstance(values.get(key), int) and not isinstance(values.get(key), bool):
                values[key] = float(values[key])
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "run config"
            raise StudyConfigError(f"run config key {where}: {first['msg']}") from exc
