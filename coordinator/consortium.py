"""`consortium.toml`: the consortium lead's configuration, parsed strictly at the edge.

It names the consortium, where its SuperLink serves, the names its TLS certificate
covers, how long certificates live, where run state goes, and the member sites.
Unknown keys and wrong types are refused with the file and the key's path. A relative
`run_dir` is taken relative to the folder that holds `consortium.toml`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from medfed.common import first_problem, read_toml
from medfed.coordinator.errors import CoordinatorError

SITE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
"""The same rule as `privacy.pki.SITE_ID_PATTERN`: site ids name folders and files."""
DEFAULT_ADDRESS = "127.0.0.1:9092"
MAX_CERT_VALID_DAYS = 3650


class ConsortiumConfigError(CoordinatorError):
    """`consortium.toml` is missing, not TOML, or does not match the schema; names file and key."""


class ConsortiumSection(BaseModel):
    """The `[consortium]` table: who the consortium is and where its SuperLink serves."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: StrictStr = Field(min_length=1, max_length=200)
    address: StrictStr = DEFAULT_ADDRESS
    hosts: tuple[StrictStr, ...] = Field(default=("127.0.0.1", "localhost"), min_length=1)
    cert_valid_days: StrictInt = Field(default=365, ge=1, le=MAX_CERT_VALID_DAYS)
    run_dir: Path = Path("run")

    @field_validator("address")
    @classmethod
    def _host_and_port(cls, address: str) -> str:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"must be HOST:PORT with a port from 1 to 65535, got {address!r}")
        return address

    @field_validator("hosts")
    @classmethod
    def _no_blank_hosts(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        if any(not host.strip() for host in hosts):
            raise ValueError("host names must not be empty")
        return hosts

    @property
    def host(self) -> str:
        """The host part of `address` (brackets of an IPv6 literal removed)."""
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """The port part of `address`."""
        return int(self.address.rpartition(":")[2])


class SiteEntry(BaseModel):
    """One `[[sites]]` entry: a member hospital."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: StrictStr = Field(pattern=SITE_ID_PATTERN)
    name: StrictStr = ""


class ConsortiumConfig(BaseModel):
    """The whole of `consortium.toml`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    consortium: ConsortiumSection
    sites: tuple[SiteEntry, ...] = ()
    source: Path = Field(default=Path("consortium.toml"), exclude=True)

    @model_validator(mode="after")
    def _unique_site_ids(self) -> ConsortiumConfig:
        seen: set[str] = set()
        for site in self.sites:
            if site.id in seen:
                raise ValueError(f"site id {site.id!r} is listed twice")
            seen.add(site.id)
        return self

    @property
    def run_dir(self) -> Path:
        """Where run state lives, relative paths taken from the folder of `consortium.toml`."""
        run_dir = self.consortium.run_dir
        return run_dir if run_dir.is_absolute() else self.source.parent / run_dir

    def site(self, site_id: str) -> SiteEntry | None:
        """The entry of `site_id`, if it is a member."""
        return next((site for site in self.sites if site.id == site_id), None)


def load_consortium(path: Path) -> ConsortiumConfig:
    """Read and validate `consortium.toml`; raise `ConsortiumConfigError` naming file and key."""
    document = read_toml(path, ConsortiumConfigError)
    try:
        return ConsortiumConfig.model_validate({**document, "source": path})
    except ValidationError as exc:
        raise ConsortiumConfigError(f"{path}: {first_problem(exc)}") from exc
