"""Certificate lifecycle after `medfed provision`: renew the SuperLink's certificate with
the existing CA, and revoke a site.

Renewal never touches the CA, so every site keeps trusting the SuperLink. Revocation is
recorded in the PKI folder (`revoked.json`, written atomically), so `medfed coordinator
start` never registers that site's key again, and, when the SuperLink runs, the site's
SuperNode is unregistered from it at once (`flwr supernode unregister`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from medfed.common import write_atomic
from medfed.coordinator.consortium import ConsortiumConfig
from medfed.privacy.errors import PkiError
from medfed.privacy.pki import (
    issue_server_certificate,
    load_certificate,
    load_ec_private_key,
    pem_certificate,
    pem_private_key,
)
from medfed.provision import SIGNING_PUBLIC_KEY_NAME, PkiLayout, ProvisionError

REVOKED_NAME = "revoked.json"
REGISTERED_NAME = "registered-nodes.json"
"""Under the run directory: the node id the SuperLink gave each site's key at registration."""


@dataclass(frozen=True)
class Renewed:
    """The certificate `renew_superlink` or `renew_identity` issued."""

    cert: Path
    not_valid_after: dt.datetime
    kind: str = "superlink_cert"

    def to_json(self) -> dict[str, object]:
        return {
            self.kind: str(self.cert),
            "not_valid_after": self.not_valid_after.isoformat(),
        }


def renew_superlink(config: ConsortiumConfig, layout: PkiLayout) -> Renewed:
    """A new SuperLink key and certificate from the existing CA (the CA and the sites' kits
    are left as they are); restart the SuperLink to serve it."""
    try:
        ca_key = load_ec_private_key(layout.ca_key)
        ca_cert = load_certificate(layout.ca_cert)
    except PkiError as exc:
        raise ProvisionError(f"cannot renew without the consortium CA: {exc}") from exc
    key, cert = issue_server_certificate(
        ca_key, ca_cert, hosts=config.consortium.hosts, valid_days=config.consortium.cert_valid_days
    )
    # Key first: a SuperLink restarted in between fails its TLS check loudly, never silently.
    write_atomic(layout.server_key, pem_private_key(key), mode=0o600)
    write_atomic(layout.server_cert, pem_certificate(cert))
    return Renewed(layout.server_cert, cert.not_valid_after_utc)


def renew_identity(config: ConsortiumConfig, layout: PkiLayout, site_id: str) -> Renewed:
    """A new identity certificate for a site's existing signing key (its kit's
    `site-signing.pub`), from the existing CA; the site copies it into place."""
    from medfed.privacy.errors import PrivacyError
    from medfed.privacy.identity import IDENTITY_CERT_NAME, issue_identity_certificate
    from medfed.privacy.signing import VerifyKey

    if config.site(site_id) is None:
        raise ProvisionError(f"site {site_id!r} is not listed in {config.source}")
    kit = layout.site_dir(site_id)
    try:
        ca_key = load_ec_private_key(layout.ca_key)
        ca_cert = load_certificate(layout.ca_cert)
        public = VerifyKey.load(kit / SIGNING_PUBLIC_KEY_NAME)
    except (PkiError, PrivacyError) as exc:
        raise ProvisionError(f"cannot renew {site_id}'s identity certificate: {exc}") from exc
    pem = issue_identity_certificate(
        ca_key, ca_cert, site_id, public, valid_days=config.consortium.cert_valid_days
    )
    write_atomic(kit / IDENTITY_CERT_NAME, pem)
    cert = load_certificate(kit / IDENTITY_CERT_NAME)
    return Renewed(kit / IDENTITY_CERT_NAME, cert.not_valid_after_utc, "identity_cert")


def key_fingerprint(public_key: Path) -> str:
    """SHA-256 of a SuperNode public key file's key line (what revocation pins)."""
    return hashlib.sha256(public_key.read_bytes().strip()).hexdigest()


def revoked_sites(layout: PkiLayout) -> dict[str, dict[str, str]]:
    """Every revoked site: its key's fingerprint and when it was revoked."""
    path = layout.root / REVOKED_NAME
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        revoked = document["revoked"]
        if not isinstance(revoked, dict):
            raise TypeError("'revoked' is not a table")
    except (ValueError, KeyError, TypeError) as exc:
        raise ProvisionError(f"{path} is not a revocation list ({exc})") from exc
    return {str(site): dict(entry) for site, entry in revoked.items()}


def is_revoked(layout: PkiLayout, site_id: str, public_key: Path) -> bool:
    """Whether this site, or this very key, was revoked."""
    revoked = revoked_sites(layout)
    fingerprint = key_fingerprint(public_key)
    return site_id in revoked or any(e.get("key_sha256") == fingerprint for e in revoked.values())


def record_revocation(
    layout: PkiLayout, site_id: str, *, now: dt.datetime | None = None
) -> dict[str, str]:
    """Add `site_id` (and its SuperNode key's fingerprint) to the revocation list."""
    public = layout.supernode_public_keys().get(site_id)
    if public is None:
        raise ProvisionError(f"no provisioned kit for {site_id!r} in {layout.sites_dir}")
    revoked = revoked_sites(layout)
    entry = {
        "key_sha256": key_fingerprint(public),
        "revoked_at": (now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds"),
    }
    revoked[site_id] = revoked.get(site_id, entry)
    document = json.dumps({"revoked": revoked}, indent=2, sort_keys=True) + "\n"
    write_atomic(layout.root / REVOKED_NAME, document.encode("utf-8"))
    return revoked[site_id]


def registered_nodes(run_dir: Path) -> dict[str, str]:
    """The node id each site's key was given when `coordinator start` registered it."""
    path = run_dir / REGISTERED_NAME
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ProvisionError(f"{path} is not valid JSON ({exc})") from exc
    return {str(site): str(node) for site, node in dict(loaded).items()}


def remember_node(run_dir: Path, site_id: str, node_id: str) -> None:
    """Record the node id the SuperLink gave `site_id`'s key (for a later revocation)."""
    nodes = registered_nodes(run_dir)
    nodes[site_id] = node_id
    write_atomic(run_dir / REGISTERED_NAME, (json.dumps(nodes, sort_keys=True) + "\n").encode())
