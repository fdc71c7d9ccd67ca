"""`site.toml`: a hospital's configuration, parsed strictly at the edge.

Unknown keys and wrong types are refused with the key's path. Relative paths are
taken relative to the folder that holds `site.toml`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medfed.client.errors import ClientError
from medfed.client.windows import TrainingWindow
from medfed.common import first_problem, read_toml
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
    """How often the idle SuperNode asks the coordinator for work (Flower's own: 3 s)."""
    trusted_entities: Path | None = None
    """The keys whose signed app bundles this site runs (the kit's `trusted-entities.yaml`);
    without it `medfed site start` refuses to start, unless `allow_unsigned_bundles`."""
    allow_unsigned_bundles: bool = False
    """Run any bundle the coordinator sends, signed or not: weaker, warned loudly at every
    start and task; for development only."""


class SiteConfig(BaseModel):
    """The whole of `site.toml`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    site: SiteSection
    privacy: PrivacyPolicy
    datasets: Datasets = ()  # none: the demo's data_dir/patients.csv (sites.manifest)
    accelerator: Accelerator = "cpu"
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
    ]
    if config.coordinator is not None:
        lines += ["", *_coordinator_lines(config.coordinator)]
    return "\n".join(lines) + "\n"


def _coordinator_lines(coordinator: CoordinatorSection) -> list[str]:
    lines = [
        "[coordinator]",
        f"superlink = {_toml_string(coordinator.superlink)}",
        f"root_certificates = {_toml_string(str(coordinator.root_certificates))}",
        f"auth_private_key = {_toml_string(str(coordinator.auth_private_key))}",
        f"poll_interval_s = {coordinator.poll_interval_s!r}",
    ]
    if coordinator.trusted_entities is not None:
        lines.append(f"trusted_entities = {_toml_string(str(coordinator.trusted_entities))}")
    if coordinator.allow_unsigned_bundles:
        lines.append("allow_unsigned_bundles = true")
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
