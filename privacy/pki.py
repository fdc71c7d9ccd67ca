"""The consortium's public-key infrastructure, built on `cryptography`.

A self-signed consortium CA signs the SuperLink's TLS certificate; each site gets
an EC key pair in the OpenSSH formats that Flower's SuperNode authentication reads.
Private keys are written atomically with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medfed.common import write_atomic
from medfed.privacy.errors import PkiError

CA_CERT_NAME = "ca.pem"
SERVER_CERT_NAME = "superlink.pem"
SERVER_KEY_NAME = "superlink.key"
EXPIRY_WARNING_DAYS = 30
"""A certificate that expires within this many days is worth a warning."""
SITE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
"""Site ids name folders and files, so they may hold no path separators or dots."""


@dataclass(frozen=True)
class SiteKeys:
    """Where one site's SuperNode authentication keys lie."""

    site_id: str
    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class Provisioned:
    """The files a provisioning run wrote."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    sites: tuple[SiteKeys, ...]


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medfed consortium"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """`key` as an unencrypted PEM PKCS8 private key (write it with mode 0600)."""
    return _pem_key(key)


def pem_certificate(cert: x509.Certificate) -> bytes:
    """`cert` as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def _validity(
    valid_days: int | None, not_valid_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    """(not before, not after) for a new certificate: `valid_days` from now, or an explicit
    end (which may lie in the past, to test expiry)."""
    now = dt.datetime.now(dt.UTC)
    if valid_days is not None and not_valid_after is not None:
        raise PkiError("give a certificate valid_days or not_valid_after, not both")
    if not_valid_after is None:
        if valid_days is None:
            raise PkiError("give a certificate valid_days or not_valid_after")
        if valid_days < 1:
            raise PkiError(f"a certificate must be valid for at least 1 day, not {valid_days}")
        not_valid_after = now + dt.timedelta(days=valid_days)
    not_before = min(now - dt.timedelta(minutes=5), not_valid_after - dt.timedelta(days=1))
    return not_before, not_valid_after


def create_ca(
    common_name: str,
    *,
    valid_days: int | None = None,
    not_valid_after: dt.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create the consortium's self-signed CA key and certificate, valid for `valid_days`
    from now or until `not_valid_after`."""
    not_before, not_after = _validity(valid_days, not_valid_after)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA384())
    )
    return key, cert


def issue_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    hosts: tuple[str, ...],
    valid_days: int | None = None,
    not_valid_after: dt.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Issue a TLS server certificate for `hosts` (IP addresses or DNS names), signed by the
    CA, valid for `valid_days` from now or until `not_valid_after`."""
    not_before, not_after = _validity(valid_days, not_valid_after)
    if not hosts:
        raise PkiError("a server certificate needs at least one host name or address")
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def create_supernode_keys() -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair: (OpenSSH private PEM, OpenSSH public line)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


def provision_loopback(
    out_dir: Path,
    site_ids: tuple[str, ...],
    *,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    valid_days: int = 30,
) -> Provisioned:
    """Provision a CA, a SuperLink certificate for `hosts` and one key pair per site."""
    if len(set(site_ids)) != len(site_ids):
        raise PkiError(f"site ids must be unique, got {list(site_ids)}")
    for site_id in site_ids:
        if not SITE_ID_PATTERN.fullmatch(site_id):
            raise PkiError(
                f"site id {site_id!r} must be 1-64 letters, digits, '-' or '_', starting with a"
                " letter or digit"
            )
    ca_key, ca_cert = create_ca("medfed consortium CA", valid_days=valid_days)
    server_key, server_cert = issue_server_certificate(
        ca_key, ca_cert, hosts=hosts, valid_days=valid_days
    )
    ca_path = out_dir / CA_CERT_NAME
    server_cert_path = out_dir / SERVER_CERT_NAME
    server_key_path = out_dir / SERVER_KEY_NAME
    write_atomic(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM))
    write_atomic(server_cert_path, server_cert.public_bytes(serialization.Encoding.PEM))
    write_atomic(server_key_path, _pem_key(server_key), mode=0o600)
    sites: list[SiteKeys] = []
    for site_id in site_ids:
        private, public = create_supernode_keys()
        private_path = out_dir / "sites" / site_id / "supernode.key"
        public_path = out_dir / "sites" / site_id / "supernode.key.pub"
        write_atomic(private_path, private, mode=0o600)
        write_atomic(public_path, public)
        sites.append(SiteKeys(site_id, private_path, public_path))
    return Provisioned(ca_path, server_cert_path, server_key_path, tuple(sites))


def load_certificate(path: Path) -> x509.Certificate:
    """Read a PEM certificate, or raise `PkiError` naming the file."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError as exc:
        raise PkiError(f"{path}: no such certificate file") from exc
    except OSError as exc:
        raise PkiError(f"{path}: cannot be read ({exc.strerror})") from exc
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM certificate") from exc


def load_ec_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read an unencrypted PEM EC private key (the CA's), or raise `PkiError`."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PkiError(f"{path}: no such key file") from exc
    except OSError as exc:
        raise PkiError(f"{path}: cannot be read ({exc.strerror})") from exc
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path}: not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: not an EC private key")
    return key


def issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True if `ca_cert` signed `cert` (signature and issuer name both match)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass(frozen=True)
class CertificateExpiry:
    """When one certificate expires, seen at `checked_at`."""

    name: str
    path: Path
    not_valid_after: dt.datetime
    checked_at: dt.datetime

    @property
    def days_left(self) -> int:
        """Whole days until expiry: 0 on its last day, negative once expired."""
        return (self.not_valid_after - self.checked_at).days

    @property
    def expired(self) -> bool:
        """Expired, or expiring within 0 (whole) days: too late to start a service on it."""
        return self.days_left <= 0

    @property
    def warning(self) -> str | None:
        """One line if the certificate has expired or expires within `EXPIRY_WARNING_DAYS`."""
        when = self.not_valid_after.strftime("%Y-%m-%d %H:%M UTC")
        if self.not_valid_after <= self.checked_at:
            return f"the {self.name} certificate {self.path} expired on {when}"
        if self.days_left < EXPIRY_WARNING_DAYS:
            return (
                f"the {self.name} certificate {self.path} expires on {when}"
                f" ({self.days_left} days left)"
            )
        return None


def certificate_expiry(
    name: str, path: Path, *, now: dt.datetime | None = None
) -> CertificateExpiry:
    """Read the certificate at `path` and say when it expires."""
    cert = load_certificate(path)
    return CertificateExpiry(
        name, path, cert.not_valid_after_utc, now if now is not None else dt.datetime.now(dt.UTC)
    )
