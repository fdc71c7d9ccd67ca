"""`medfed provision`: the consortium's CA, the SuperLink's certificate and one startup kit
per site, written once.

Everything is written into a temporary folder beside its destination and renamed into
place, so a failed run leaves nothing half-issued. Running it again never re-issues:
it refuses, unless asked to add a site's kit, which reuses the existing CA and touches
no other site's files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from medfed.client.config import (
    SITE_TOML,
    CoordinatorSection,
    SiteConfig,
    SiteSection,
    render_site_toml,
)
from medfed.common import write_atomic
from medfed.coordinator.consortium import ConsortiumConfig, SiteEntry
from medfed.errors import MedfedError
from medfed.privacy.bundle_signing import TRUSTED_ENTITIES_NAME, trusted_entities_yaml
from medfed.privacy.errors import PrivacyError
from medfed.privacy.identity import IDENTITY_CERT_NAME, issue_identity_certificate
from medfed.privacy.pki import (
    CA_CERT_NAME,
    SERVER_CERT_NAME,
    SERVER_KEY_NAME,
    create_ca,
    create_supernode_keys,
    issue_server_certificate,
    load_certificate,
    load_ec_private_key,
    pem_certificate,
    pem_private_key,
)
from medfed.privacy.policy import PrivacyPolicy
from medfed.privacy.signing import SigningKey, VerifyKey

CA_KEY_NAME = "ca.key"
SUPERNODE_KEY_NAME = "supernode.key"
SUPERNODE_PUBLIC_KEY_NAME = "supernode.key.pub"
SIGNING_KEY_NAME = "site-signing.key"
SIGNING_PUBLIC_KEY_NAME = "site-signing.pub"
OFFICER_PUBLIC_KEY_NAME = "officer.pub"
README_NAME = "README.txt"
APP_SIGNING_KEY_NAME = "app-signing.key"
COORDINATOR_KEY_NAME = "coordinator-signing.key"
COORDINATOR_PUBLIC_KEY_NAME = "coordinator.pub"
APP_SIGNING_PUBLIC_KEY_NAME = "app-signing.pub"
APP_SIGNING_KEY_ID = "medfed-consortium"
"""The id under which sites trust the consortium's app-signing key (trusted-entities.yaml)."""

TEMPLATE_POLICY = PrivacyPolicy(
    epsilon_cap=1.0,
    cap_window="lifetime",
    max_delta=1e-5,
    min_noise_multiplier=0.8,
    max_grad_norm=5.0,
    min_cohort_k=50,
    require_approval=True,
)
"""The `[privacy]` block a new site starts from: strict on purpose. Its officer reviews it
(the epsilon cap above all) before the site joins a study."""


class ProvisionError(MedfedError):
    """Provisioning was refused (already done, a site not in consortium.toml, ...)."""


@dataclass(frozen=True)
class PkiLayout:
    """Where `medfed provision` puts each file under its output folder."""

    root: Path

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / CA_CERT_NAME

    @property
    def ca_key(self) -> Path:
        return self.ca_dir / CA_KEY_NAME

    @property
    def superlink_dir(self) -> Path:
        return self.root / "superlink"

    @property
    def server_cert(self) -> Path:
        return self.superlink_dir / SERVER_CERT_NAME

    @property
    def server_key(self) -> Path:
        return self.superlink_dir / SERVER_KEY_NAME

    @property
    def sites_dir(self) -> Path:
        return self.root / "sites"

    def site_dir(self, site_id: str) -> Path:
        return self.sites_dir / site_id

    @property
    def app_signing_key(self) -> Path:
        return self.ca_dir / APP_SIGNING_KEY_NAME

    @property
    def coordinator_key(self) -> Path:
        """The coordinator's key for signed round announcements (sites pin its public half)."""
        return self.superlink_dir / COORDINATOR_KEY_NAME

    @property
    def app_signing_public_key(self) -> Path:
        return self.ca_dir / APP_SIGNING_PUBLIC_KEY_NAME

    def supernode_public_keys(self) -> dict[str, Path]:
        """Every site kit's SuperNode public key, by site id."""
        if not self.sites_dir.is_dir():
            return {}
        return {
            path.parent.name: path
            for path in sorted(self.sites_dir.glob(f"*/{SUPERNODE_PUBLIC_KEY_NAME}"))
        }


@dataclass(frozen=True)
class ProvisionReport:
    """What one provisioning run wrote."""

    layout: PkiLayout
    issued_ca: bool
    sites_added: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        ca = load_certificate(self.layout.ca_cert)
        server = load_certificate(self.layout.server_cert)
        return {
            "out": str(self.layout.root),
            "issued_ca": self.issued_ca,
            "ca_cert": str(self.layout.ca_cert),
            "ca_not_valid_after": ca.not_valid_after_utc.isoformat(),
            "superlink_cert": str(self.layout.server_cert),
            "superlink_not_valid_after": server.not_valid_after_utc.isoformat(),
            "sites_added": list(self.sites_added),
            "site_kits": {site: str(self.layout.site_dir(site)) for site in self.sites_added},
        }


def provision(
    config: ConsortiumConfig, out: Path, *, add_sites: tuple[str, ...] = ()
) -> ProvisionReport:
    """Provision `out` for the consortium, or only add the kits of `add_sites` to it."""
    layout = PkiLayout(out)
    if add_sites:
        return _add_sites(config, layout, add_sites)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ProvisionError(
            f"{out} is not empty; nothing was re-issued (a new CA would lock out every site)."
            " To add a site's kit, use --add-site ID"
        )
    with _staging(out) as stage:
        staged = PkiLayout(stage)
        ca_key, ca_cert = create_ca(
            f"{config.consortium.name} CA", valid_days=config.consortium.cert_valid_days
        )
        server_key, server_cert = issue_server_certificate(
            ca_key,
            ca_cert,
            hosts=config.consortium.hosts,
            valid_days=config.consortium.cert_valid_days,
        )
        staged.ca_dir.mkdir(mode=0o700)
        write_atomic(staged.ca_cert, pem_certificate(ca_cert))
        write_atomic(staged.ca_key, pem_private_key(ca_key), mode=0o600)
        staged.superlink_dir.mkdir(mode=0o700)
        write_atomic(staged.server_cert, pem_certificate(server_cert))
        write_atomic(staged.server_key, pem_private_key(server_key), mode=0o600)
        app_key = SigningKey.generate()
        app_key.save(staged.app_signing_key)
        app_key.public.save(staged.app_signing_public_key)
        trusted = trusted_entities_yaml({APP_SIGNING_KEY_ID: app_key.public})
        coordinator = SigningKey.generate()
        coordinator.save(staged.coordinator_key)
        for site in config.sites:
            _write_site_kit(
                staged.site_dir(site.id),
                site,
                config,
                pem_certificate(ca_cert),
                trusted,
                identity=(ca_key, ca_cert, coordinator.public),
            )
        staged.sites_dir.mkdir(exist_ok=True)
    return ProvisionReport(layout, True, tuple(site.id for site in config.sites))


def _add_sites(
    config: ConsortiumConfig, layout: PkiLayout, site_ids: tuple[str, ...]
) -> ProvisionReport:
    """Check every requested site first, then write each kit in place with the existing CA."""
    if len(set(site_ids)) != len(site_ids):
        raise ProvisionError(f"--add-site names a site twice: {list(site_ids)}")
    if not layout.ca_cert.is_file():
        raise ProvisionError(
            f"{layout.root} holds no consortium CA ({layout.ca_cert} is missing);"
            " provision it first without --add-site"
        )
    ca_pem = layout.ca_cert.read_bytes()
    load_certificate(layout.ca_cert)
    trusted = _trusted_entities(layout)
    sites: list[SiteEntry] = []
    for site_id in site_ids:
        site = config.site(site_id)
        if site is None:
            raise ProvisionError(
                f"site {site_id!r} is not listed in {config.source}; add a [[sites]] entry first"
            )
        if layout.site_dir(site_id).exists():
            raise ProvisionError(
                f"{layout.site_dir(site_id)} exists already; nothing was re-issued"
            )
        sites.append(site)
    identity = _identity_issuer(layout)
    for site in sites:
        with _staging(layout.site_dir(site.id)) as stage:
            _write_site_kit(stage, site, config, ca_pem, trusted, identity=identity)
    return ProvisionReport(layout, False, site_ids)


@contextmanager
def _staging(destination: Path) -> Iterator[Path]:
    """A fresh folder beside `destination`, renamed onto it if the block succeeds."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}."))
    try:
        yield stage
        os.chmod(stage, 0o755)
        # An empty destination folder is replaced; a non-empty one makes rename fail.
        os.replace(stage, destination)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _trusted_entities(layout: PkiLayout) -> str:
    """The trusted-entities file of the consortium's existing app-signing key."""
    try:
        public = VerifyKey.load(layout.app_signing_public_key)
    except PrivacyError as exc:
        raise ProvisionError(
            f"{exc}; this PKI predates signed app bundles: re-provision it to add one"
        ) from exc
    return trusted_entities_yaml({APP_SIGNING_KEY_ID: public})


Identity = tuple[ec.EllipticCurvePrivateKey, x509.Certificate, VerifyKey]
"""The CA that issues sites' identity certificates, and the coordinator's public key."""


def _identity_issuer(layout: PkiLayout) -> Identity:
    """The existing CA (to issue a new site's identity certificate) and coordinator key."""
    try:
        coordinator = SigningKey.load(layout.coordinator_key).public
    except PrivacyError as exc:
        raise ProvisionError(
            f"{exc}; this PKI predates secure aggregation: re-provision it to add one"
        ) from exc
    return load_ec_private_key(layout.ca_key), load_certificate(layout.ca_cert), coordinator


def _write_site_kit(
    kit: Path,
    site: SiteEntry,
    config: ConsortiumConfig,
    ca_pem: bytes,
    trusted: str,
    *,
    identity: Identity,
) -> None:
    """One site's startup kit: what its operator needs to join, and nothing of the CA's."""
    kit.mkdir(parents=True, exist_ok=True)
    write_atomic(kit / CA_CERT_NAME, ca_pem)
    write_atomic(kit / TRUSTED_ENTITIES_NAME, trusted.encode("ascii"))
    private, public = create_supernode_keys()
    write_atomic(kit / SUPERNODE_KEY_NAME, private, mode=0o600)
    write_atomic(kit / SUPERNODE_PUBLIC_KEY_NAME, public)
    signing = SigningKey.generate()
    signing.save(kit / SIGNING_KEY_NAME)
    signing.public.save(kit / SIGNING_PUBLIC_KEY_NAME)
    ca_key, ca_cert, coordinator = identity
    write_atomic(
        kit / IDENTITY_CERT_NAME,
        issue_identity_certificate(
            ca_key, ca_cert, site.id, signing.public, valid_days=config.consortium.cert_valid_days
        ),
    )
    coordinator.save(kit / COORDINATOR_PUBLIC_KEY_NAME)
    site_config = SiteConfig(
        site=SiteSection(
            id=site.id,
            name=site.name,
            signing_key=Path(SIGNING_KEY_NAME),
            officer_public_key=Path(OFFICER_PUBLIC_KEY_NAME),
            identity_certificate=Path(IDENTITY_CERT_NAME),
            consortium_ca=Path(CA_CERT_NAME),
            coordinator_public_key=Path(COORDINATOR_PUBLIC_KEY_NAME),
        ),
        privacy=TEMPLATE_POLICY,
        coordinator=CoordinatorSection(
            superlink=config.consortium.address,
            root_certificates=Path(CA_CERT_NAME),
            auth_private_key=Path(SUPERNODE_KEY_NAME),
            trusted_entities=Path(TRUSTED_ENTITIES_NAME),
        ),
    )
    write_atomic(kit / SITE_TOML, _site_toml_template(site_config).encode("utf-8"))
    write_atomic(kit / README_NAME, _readme(site, config).encode("utf-8"))


def _site_toml_template(config: SiteConfig) -> str:
    header = (
        "# Written by `medfed provision` as a starting point. Before this site joins a study,\n"
        "# its privacy officer reviews [privacy] (epsilon_cap above all) and puts the\n"
        f"# officer's public key at {OFFICER_PUBLIC_KEY_NAME}.\n\n"
    )
    review = (
        "[privacy]\n# REVIEW: a deliberately strict template; the officer sets the real limits.\n"
    )
    return header + render_site_toml(config).replace("[privacy]\n", review, 1)


def _readme(site: SiteEntry, config: ConsortiumConfig) -> str:
    label = f"{site.id} ({site.name})" if site.name else site.id
    return f"""medfed startup kit for site {label}
consortium: {config.consortium.name}
SuperLink address: {config.consortium.address}

Files
  {CA_CERT_NAME:<20} the consortium CA's certificate: the SuperNode trusts the SuperLink
  {"":<20} only if its TLS certificate was signed by this CA (--root-certificates).
  {SUPERNODE_KEY_NAME:<20} SECRET. The SuperNode's authentication key (OpenSSH, mode 0600)
  {"":<20} (--auth-supernode-private-key). Never leaves this site.
  {SUPERNODE_PUBLIC_KEY_NAME:<20} its public half; the consortium lead registers it with
  {"":<20} the SuperLink.
  {SIGNING_KEY_NAME:<20} SECRET. The site's Ed25519 key that signs its privacy ledger and
  {"":<20} audit log (mode 0600). Never leaves this site.
  {SIGNING_PUBLIC_KEY_NAME:<20} its public half, for anyone checking the site's signed records.
  {IDENTITY_CERT_NAME:<20} the consortium CA's certificate that the signing key is this
  {"":<20} site's: other sites check it in secure aggregation.
  {COORDINATOR_PUBLIC_KEY_NAME:<20} the coordinator's key: the site checks its signed round
  {"":<20} announcements with it.
  {TRUSTED_ENTITIES_NAME:<20} the consortium's app-signing key: the site runs only app
  {"":<20} bundles it signed (site.toml's [coordinator] trusted_entities).
  {SITE_TOML:<20} a template of the site's configuration; the privacy officer reviews
  {"":<20} its [privacy] block and adds the officer's public key as {OFFICER_PUBLIC_KEY_NAME}.

The kit holds no key of the CA: no one at a site can issue certificates.
Keep this folder readable by the site's operator only. If a secret key leaks, tell the
consortium lead, who provisions a new kit for the site.
"""
