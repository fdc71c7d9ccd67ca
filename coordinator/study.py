"""The study: what a run trains, how, and how much privacy it asks each site for.

One strict, frozen model serves both edges: Flower's run config (flat keys with
hyphens; the contract as its canonical JSON under `contract`) and `study.toml` (the
same keys under `[study]`, the data contract under `[contract]`). Its digest, which
covers the contract, identifies the study: an officer's approval at a site is bound to it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from medfed.common import first_problem, read_toml
from medfed.coordinator.errors import StudyConfigError
from medfed.coordinator.strategies import StrategyName
from medfed.model.contract import DEMO_CONTRACT, StudyContract
from medfed.model.presets import PresetName

RUN_PLUMBING = frozenset(
    {
        "results_path",
        "sites_root",
        "site_keys_dir",
        "run_dir",
        "resume",
        "app_signature",
        "coordinator_key",
    }
)
"""Fields that say where a run writes, not what the study is: left out of its digest."""

_FLOAT_KEYS = (
    "learning-rate",
    "target-epsilon",
    "max-grad-norm",
    "delta",
    "sample-rate",
    "round-timeout-s",
    "deadline-s",
    "proximal-mu",
    "server-learning-rate",
    "server-beta1",
    "server-beta2",
    "server-tau",
    "update-norm-bound",
    "secagg-clip",
)


class StudySettings(BaseModel):
    """What a run trains, how, and for how long. Keys are the run config's, with hyphens."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    name: str = Field(alias="study-name", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    num_rounds: int = Field(alias="num-server-rounds", ge=1, le=10_000)
    local_steps: int = Field(alias="local-steps", ge=1, le=1_000_000)
    learning_rate: float = Field(alias="learning-rate", gt=0, le=100)
    target_epsilon: float = Field(alias="target-epsilon", gt=0, le=100)
    max_grad_norm: float = Field(alias="max-grad-norm", gt=0, le=1_000)
    delta: float = Field(alias="delta", gt=0, lt=1)
    sample_rate: float = Field(alias="sample-rate", gt=0, le=1)
    min_sites: int = Field(alias="min-sites", ge=1)
    round_timeout_s: float = Field(alias="round-timeout-s", gt=0)
    seed: int = Field(alias="seed", ge=0)
    results_path: str = Field(alias="results-path", default="")
    sites_root: str = Field(alias="sites-root", default="")
    site_keys_dir: str = Field(alias="site-keys-dir", default="")
    preset: PresetName = "tiny"
    strategy: StrategyName = "fedavg"
    proximal_mu: float = Field(alias="proximal-mu", default=0.0, ge=0, le=100)
    server_learning_rate: float = Field(alias="server-learning-rate", default=0.01, gt=0, le=10)
    server_beta1: float = Field(alias="server-beta1", default=0.9, ge=0, lt=1)
    server_beta2: float = Field(alias="server-beta2", default=0.99, ge=0, lt=1)
    server_tau: float = Field(alias="server-tau", default=1e-3, gt=0, le=1)
    update_norm_bound: float = Field(alias="update-norm-bound", default=0.0, ge=0)
    """L2 bound on each site's update before averaging; 0: no bound."""
    deadline_s: float = Field(alias="deadline-s", default=0.0, ge=0)
    """Round deadline: steps are sized to finish inside it, later replies are dropped;
    0: `round-timeout-s`."""
    run_dir: str = Field(alias="run-dir", default="")
    """Where the coordinator keeps checkpoints and its audit chain; empty: none."""
    resume: bool = False
    """Continue the run whose last checkpoint is in `run-dir`."""
    app_signature: str = Field(alias="app-signature", default="")
    """The signature of the app bundle the run was submitted with (run plumbing: sites
    check it, the study's digest leaves it out)."""
    secure_aggregation: bool = Field(alias="secure-aggregation", default=True)
    """The coordinator learns only the sum of the sites' updates (SecAgg+); off: it sees
    each site's (DP-noised) update, which is logged loudly at every run."""
    secagg_clip: float = Field(alias="secagg-clip", default=1.0, gt=0, le=1e6)
    """Per coordinate, the range a site's weighted update is clipped to before encoding."""
    secagg_threshold: int = Field(alias="secagg-threshold", default=0, ge=0)
    """Sites whose masked update must arrive for the sum to be unmasked; 0: more than half
    of the planned sites (and at least min-sites)."""
    coordinator_key: str = Field(alias="coordinator-key", default="")
    """The coordinator's Ed25519 signing key (path), for its round announcements (run
    plumbing); empty: a key made for the run, which sites cannot pin."""
    contract: StudyContract = DEMO_CONTRACT
    """The data contract: modalities, features and tasks; the network is sized from it."""

    @field_validator("contract", mode="before")
    @classmethod
    def _contract_from_json(cls, value: object) -> object:
        """The run config carries the contract as its canonical JSON text."""
        return StudyContract.model_validate_json(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _strategy_parameters(self) -> StudySettings:
        if self.proximal_mu > 0 and self.strategy != "fedprox":
            raise ValueError(f"proximal-mu is set but strategy is {self.strategy!r}, not fedprox")
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise ValueError("strategy fedprox needs proximal-mu > 0")
        if self.secagg_threshold == 1:
            raise ValueError("secagg-threshold must be 0 (more than half the sites) or at least 2")
        return self

    @property
    def round_deadline_s(self) -> float:
        """Seconds a round may take: `deadline-s`, or `round-timeout-s` when that is 0."""
        return self.deadline_s or self.round_timeout_s

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> StudySettings:
        """Parse Flower's run config; a bad key raises `StudyConfigError` naming it."""
        return cls._parse(run_config, where="run config")

    @classmethod
    def _parse(cls, values: Mapping[str, Any], *, where: str) -> StudySettings:
        values = dict(values)
        if "contract" in values:
            values["contract"] = parse_contract(values["contract"], where=f"{where} contract")
        for key in _FLOAT_KEYS:
            # TOML writes 1.0 as a float but 1 as an int; both mean the same number here.
            if isinstance(values.get(key), int) and not isinstance(values.get(key), bool):
                values[key] = float(values[key])
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(part) for part in first["loc"])
            if not key:  # a rule across keys, whose message names them
                raise StudyConfigError(f"{where}: {first['msg']}") from exc
            raise StudyConfigError(f"{where} key {key}: {first['msg']}") from exc

    def sha256(self) -> str:
        """The study's identity: a digest of every field but where the run writes."""
        fields = self.model_dump(by_alias=True, exclude=set(RUN_PLUMBING))
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_run_config(self) -> dict[str, Any]:
        """The run config that carries this study to the ServerApp."""
        config = self.model_dump(by_alias=True)
        config["contract"] = contract_json(self.contract)
        return config


def contract_json(contract: StudyContract) -> str:
    """The contract's canonical JSON: what the run config and the sites' instructions carry;
    its SHA-256 is `StudyContract.sha256()`."""
    return contract.canonical_json()


def parse_contract(value: object, *, where: str) -> StudyContract:
    """A contract from a TOML table, its JSON text (the run config), or the model itself;
    `StudyConfigError` naming `where` and the first bad key otherwise."""
    if isinstance(value, StudyContract):
        return value
    try:
        if isinstance(value, str):
            return StudyContract.model_validate_json(value)
        if isinstance(value, dict):
            return StudyContract.from_toml_table(value)
    except ValidationError as exc:
        raise StudyConfigError(f"{where} {first_problem(exc)}") from exc
    raise StudyConfigError(f"{where}: expected a table, got {type(value).__name__}")


def load_study_file(path: Path) -> StudySettings:
    """Read `study.toml` (the run config's keys under `[study]`); errors name file and key."""
    document = read_toml(path, StudyConfigError)
    unknown = sorted(set(document) - {"study", "contract"})
    if unknown or not isinstance(document.get("study"), dict):
        raise StudyConfigError(f"{path}: expected one [study] table, found {sorted(document)}")
    values = dict(document["study"])
    if "contract" in values:
        raise StudyConfigError(f"{path}: [study] key contract: the contract is its own [contract]")
    if "contract" in document:
        values["contract"] = load_study_contract(path, document)
    return StudySettings._parse(values, where=f"{path}: [study]")


def load_study_contract(
    path: Path | None, document: Mapping[str, Any] | None = None
) -> StudyContract:
    """The contract in study.toml's `[contract]` table; the demo contract without one (or
    without a path). Errors name the file and the key. The one parser of `[contract]`:
    `medfed site check --study` and the coordinator read it alike."""
    if path is None:
        return DEMO_CONTRACT
    if document is None:
        document = read_toml(path, StudyConfigError)
    table = document.get("contract")
    if table is None:
        return DEMO_CONTRACT
    if not isinstance(table, dict):
        raise StudyConfigError(f"{path}: contract must be a table ([contract])")
    return parse_contract(table, where=f"{path}: [contract]")
