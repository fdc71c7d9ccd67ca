"""`site.toml`: a hospital's configuration, parsed strictly at the edge.

Unknown keys and wrong types are refused with the key's path. Relative paths are
taken relative to the folder that holds `site.toml`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from medfed.client.errors import ClientError
from medfed.client.windows import TrainingWindow
from medfed.common import first_problem, read_toml
from medfed.common.config_keys import unknown_key_problem
from medfed.model.precision import Precision
from medfed.privacy.modes import DEFAULT_GRAD_SAMPLE_MODE, GradSampleMode
from medfed.privacy.policy import PrivacyPolicy
from medfed.sites.config import Accelerator, Datasets

SITE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
SITE_TOML = "site.toml"


class SiteConfigError(ClientError):
    """`site.toml` is missing, not TOML, or does not match the schema; names file and key."""


class SiteSection(BaseModel):
    """Who the site is and where its files are."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=SITE_ID_PATTERN)
    name: str = ""
    data_dir: Path = Path("data")
    state_dir: Path = Path("state")
    signing_key: Path = Path("keys/site-signing.key")
    officer_public_key: Path = Path("keys/officer.pub")
    identity_certificate: Path | None = None
    """The consortium CA's certificate of this site's signing key (secure aggregation)."""
    consortium_ca: Path | None = None
    """The consortium CA certificate, to check the other sites' identity certificates."""
    coordinator_public_key: Path | None = None
    """The coordinator's Ed25519 key, to check its signed round announcements."""


class CoordinatorSection(BaseModel):
    """`[coordinator]`: where `medfed site start` connects (outbound only) and with what."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    superlink: str = Field(pattern=r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$")
    root_certificates: Path = Path("kit/ca.pem")
    auth_private_key: Path = Path("kit/supernode.key")
    poll_interval_s: float = Field(default=1.0, ge=0.05, le=3.0)
    """How often the SuperNode asks the coordinator for work while busy: for a minute after
    its last message (Flower's own: 3 s, always)."""
    idle_poll_interval_s: float = Field(default=2.0, ge=0.05, le=30.0)
    """How often it asks when idle: the longest a new run's first message waits for this
    site, and what keeps a daemon that idles all year cheap (docs/site.md)."""
    trusted_entities: Path | None = None
    """The keys whose signed app bundles this site runs (the kit's `trusted-entities.yaml`);
    without it `medfed site start` refuses to start, unless `allow_unsigned_bundles`."""
    allow_unsigned_bundles: bool = False
    """Run any bundle the coordinator sends, signed or not: weaker, warned loudly at every
    start and task; for development only."""
    approved_apps: tuple[Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")], ...] = ()
    """SHA-256 digests of app bundles whose ClientApp is not medfed's own that this site
    runs. Such code runs beside the site's data and keys (the egress guard is its only
    limit), so none is run unless the officer approved its exact bundle here; warned loudly
    at every start. medfed's own ClientApp runs only as the installed code, byte for byte."""

    @model_validator(mode="after")
    def _idle_polls_are_not_faster(self) -> CoordinatorSection:
        if self.idle_poll_interval_s < self.poll_interval_s:
            raise ValueError(
                f"idle_poll_interval_s ({self.idle_poll_interval_s:g}) must not be shorter"
                f" than poll_interval_s ({self.poll_interval_s:g})"
            )
        return self


class TrainingSection(BaseModel):
    """`[training]`: how the site's hardware trains. No setting here changes the privacy
    guarantee: every mode clips each patient's gradient and adds the same noise."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    grad_sample_mode: GradSampleMode = DEFAULT_GRAD_SAMPLE_MODE
    precision: Precision = "fp32"
    """bf16: autocast's bf16 matmuls on the accelerator; norms, sums and noise in fp32."""
    physical_batch_size: int | None = Field(default=None, ge=1, le=1_000_000)
    """At most this many patients per forward/backward pass; a larger Poisson batch is
    run in parts and takes one step (bounded memory). Book-keeping only."""

    @model_validator(mode="after")
    def _physical_batches_need_bookkeeping(self) -> TrainingSection:
        if self.physical_batch_size is not None and self.grad_sample_mode != "bk":
            raise ValueError('physical_batch_size needs grad_sample_mode = "bk"')
        return self


class SiteConfig(BaseModel):
    """The whole of `site.toml`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    site: SiteSection
    privacy: PrivacyPolicy
    datasets: Datasets = ()  # none: the demo's data_dir/patients.csv (sites.manifest)
    accelerator: Accelerator = "cpu"
    training: TrainingSection = TrainingSection()
    windows: tuple[TrainingWindow, ...] = ()
    coordinator: CoordinatorSection | None = None
    source: Path = Field(default=Path("site.toml"), exclude=True)

    def resolve(self, path: Path) -> Path:
        """`path` from this file, taken relative to the folder of `site.toml`."""
        return path if path.is_absolute() else self.source.parent / path

    @property
    def data_dir(self) -> Path:
        return self.resolve(self.site.data_dir)

    @property
    def state_dir(self) -> Path:
        return self.resolve(self.site.state_dir)

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "privacy-ledger.sqlite"

    @property
    def audit_path(self) -> Path:
        return self.state_dir / "audit.jsonl"

    @property
    def signing_key_path(self) -> Path:
        return self.resolve(self.site.signing_key)

    @property
    def officer_public_key_path(self) -> Path:
        return self.resolve(self.site.officer_public_key)

    @property
    def trusted_entities_path(self) -> Path | None:
        """The trusted-entities file `[coordinator]` names, resolved; None if it names none."""
        coordinator = self.coordinator
        if coordinator is None or coordinator.trusted_entities is None:
            return None
        return self.resolve(coordinator.trusted_entities)

    @property
    def allows_unsigned_bundles(self) -> bool:
        """Whether `[coordinator] allow_unsigned_bundles = true` (weaker: warned loudly)."""
        return self.coordinator is not None and self.coordinator.allow_unsigned_bundles

    def optional_path(self, path: Path | None) -> Path | None:
        """`path` resolved like `resolve`, or None when the key is not set."""
        return None if path is None else self.resolve(path)


def load_site_config(path: Path) -> SiteConfig:
    """Read and validate `site.toml`; raise `SiteConfigError` naming the file and the key."""
    document = read_toml(path, SiteConfigError)
    try:
        return SiteConfig.model_validate({**document, "source": path})
    except ValidationError as exc:
        unknown = unknown_key_problem(SiteConfig, exc)
        if unknown is not None:
            raise SiteConfigError(f"{path}: {unknown}") from exc
        raise SiteConfigError(f"{path}: {first_problem(exc)}") from exc


def render_site_toml(config: SiteConfig) -> str:
    """`site.toml` text for `config` (what provisioning and the demo write)."""
    site = config.site
    privacy = config.privacy
    lines = [
        "[site]",
        f'id = "{site.id}"',
        f"name = {_toml_string(site.name)}",
        f"data_dir = {_toml_string(str(site.data_dir))}",
        f"state_dir = {_toml_string(str(site.state_dir))}",
        f"signing_key = {_toml_string(str(site.signing_key))}",
        f"officer_public_key = {_toml_string(str(site.officer_public_key))}",
        *identity_lines(site),
        "",
        "[privacy]",
        f"epsilon_cap = {privacy.epsilon_cap!r}",
        f'cap_window = "{privacy.cap_window}"',
        f"max_delta = {privacy.max_delta!r}",
        f"min_noise_multiplier = {privacy.min_noise_multiplier!r}",
        f"max_grad_norm = {privacy.max_grad_norm!r}",
        f"min_cohort_k = {privacy.min_cohort_k}",
        f"require_approval = {'true' if privacy.require_approval else 'false'}",
        f'accountant = "{privacy.accountant}"',
        f"delta_patients_factor = {privacy.delta_patients_factor!r}",
        f"metrics_noise_multiplier = {privacy.metrics_noise_multiplier!r}",
        f"count_noise_std = {privacy.count_noise_std!r}",
        f"max_evaluations_per_run = {privacy.max_evaluations_per_run}",
        f"allow_unbounded_mechanisms = {'true' if privacy.allow_unbounded_mechanisms else 'false'}",
        *([f"privacy_unit = {_toml_string(privacy.privacy_unit)}"] if privacy.privacy_unit else []),
        *(
            [f"lifetime_epsilon_cap = {privacy.lifetime_epsilon_cap!r}"]
            if privacy.lifetime_epsilon_cap is not None
            else []
        ),
    ]
    if config.training != TrainingSection():
        lines += ["", *_training_lines(config.training)]
    if config.coordinator is not None:
        lines += ["", *_coordinator_lines(config.coordinator)]
    return "\n".join(lines) + "\n"


def _training_lines(training: TrainingSection) -> list[str]:
    lines = [
        "[training]",
        f'grad_sample_mode = "{training.grad_sample_mode}"',
        f'precision = "{training.precision}"',
    ]
    if training.physical_batch_size is not None:
        lines.append(f"physical_batch_size = {training.physical_batch_size}")
    return lines


def _coordinator_lines(coordinator: CoordinatorSection) -> list[str]:
    lines = [
        "[coordinator]",
        f"superlink = {_toml_string(coordinator.superlink)}",
        f"root_certificates = {_toml_string(str(coordinator.root_certificates))}",
        f"auth_private_key = {_toml_string(str(coordinator.auth_private_key))}",
        f"poll_interval_s = {coordinator.poll_interval_s!r}",
        f"idle_poll_interval_s = {coordinator.idle_poll_interval_s!r}",
    ]
    if coordinator.trusted_entities is not None:
        lines.append(f"trusted_entities = {_toml_string(str(coordinator.trusted_entities))}")
    if coordinator.allow_unsigned_bundles:
        lines.append("allow_unsigned_bundles = true")
    if coordinator.approved_apps:
        digests = ", ".join(_toml_string(digest) for digest in coordinator.approved_apps)
        lines.append(f"approved_apps = [{digests}]")
    return lines


def identity_lines(site: SiteSection) -> list[str]:
    """`[site]` lines for the secure-aggregation credentials that are set."""
    entries = {
        "identity_certificate": site.identity_certificate,
        "consortium_ca": site.consortium_ca,
        "coordinator_public_key": site.coordinator_public_key,
    }
    return [f"{key} = {_toml_string(str(path))}" for key, path in entries.items() if path]


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
