"""Site identity certificates: the consortium CA binds a site id to its Ed25519 signing key.

Secure aggregation needs every site to check the others' signed key advertisements
without trusting the coordinator to say whose key is whose (a coordinator that could
would play every other site itself). `medfed provision` (and the demo) issue each site
an X.509 certificate with the site id as its common name and the site's signing key as
its public key, signed by the consortium CA that every site already holds.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from medfed.privacy.errors import SecAggError
from medfed.privacy.pki import issued_by
from medfed.privacy.secagg_protocol import IdentityCheck
from medfed.privacy.signing import VerifyKey

IDENTITY_CERT_NAME = "site-identity.pem"


def issue_identity_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    site_id: str,
    key: VerifyKey,
    *,
    valid_days: int,
) -> bytes:
    """A PEM certificate naming `site_id` for `key`, signed by the consortium CA."""
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(Ed25519PublicKey.from_public_bytes(key.raw))
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=valid_days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def identity_check(ca_pem: bytes, *, now: dt.datetime | None = None) -> IdentityCheck:
    """Check (site id, certificate PEM) against the CA; return the site's verify key."""
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        raise SecAggError(f"the consortium CA certificate cannot be read: {exc}") from exc
    cache: dict[tuple[str, str], VerifyKey] = {}

    def check(site_id: str, pem: str) -> VerifyKey:
        if (site_id, pem) in cache:
            return cache[(site_id, pem)]
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
        except ValueError as exc:
            raise SecAggError(f"{site_id}: identity certificate cannot be read") from exc
        if not issued_by(cert, ca_cert):
            raise SecAggError(f"{site_id}: identity certificate not issued by the consortium CA")
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if [name.value for name in names] != [site_id]:
            raise SecAggError(f"{site_id}: identity certificate names another site")
        moment = now or dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
            raise SecAggError(f"{site_id}: identity certificate expired or not yet valid")
        public = cert.public_key()
        if not isinstance(public, Ed25519PublicKey):
            raise SecAggError(f"{site_id}: identity certificate holds no Ed25519 key")
        key = VerifyKey.from_raw(public.public_bytes_raw())
        cache[(site_id, pem)] = key
        return key

    return check
