"""The consortium PKI: chain, names, key formats, file modes and a real TLS handshake."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from medfed.privacy.errors import PkiError
from medfed.privacy.pki import (
    Provisioned,
    create_ca,
    create_supernode_keys,
    issue_server_certificate,
    provision_loopback,
)

SITES = ("site-a", "site-b")


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> Provisioned:
    return provision_loopback(tmp_path_factory.mktemp("pki"), SITES)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_is_issued_by_the_ca(provisioned: Provisioned) -> None:
    ca = load_cert(provisioned.ca_cert)
    server = load_cert(provisioned.server_cert)
    server.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage


def test_server_certificate_is_not_issued_by_another_ca(provisioned: Provisioned) -> None:
    _, other_ca = create_ca("another CA", valid_days=1)
    with pytest.raises((ValueError, TypeError)):
        load_cert(provisioned.server_cert).verify_directly_issued_by(other_ca)


def test_server_certificate_names_loopback(provisioned: Provisioned) -> None:
    server = load_cert(provisioned.server_cert)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]


def test_server_key_matches_certificate(provisioned: Provisioned) -> None:
    key = serialization.load_pem_private_key(provisioned.server_key.read_bytes(), password=None)
    cert_key = load_cert(provisioned.server_cert).public_key()
    assert key.public_key().public_numbers() == cert_key.public_numbers()  # type: ignore[union-attr]


def test_issuing_for_no_hosts_is_refused() -> None:
    ca_key, ca_cert = create_ca("ca", valid_days=1)
    with pytest.raises(PkiError, match="at least one host"):
        issue_server_certificate(ca_key, ca_cert, hosts=(), valid_days=1)


def test_supernode_keys_are_openssh_ec_p384(provisioned: Provisioned) -> None:
    assert [site.site_id for site in provisioned.sites] == list(SITES)
    for site in provisioned.sites:
        public = serialization.load_ssh_public_key(site.public_key.read_bytes())
        private = serialization.load_ssh_private_key(site.private_key.read_bytes(), password=None)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(public.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert site.public_key.read_bytes().startswith(b"ecdsa-sha2-nistp384 ")
        assert site.public_key.read_bytes().endswith(b"\n")


def test_sites_get_distinct_keys(provisioned: Provisioned) -> None:
    publics = {site.public_key.read_bytes() for site in provisioned.sites}
    assert len(publics) == len(SITES)


def test_create_supernode_keys_pair_up() -> None:
    private_pem, public_line = create_supernode_keys()
    private = serialization.load_ssh_private_key(private_pem, password=None)
    public = serialization.load_ssh_public_key(public_line.strip())
    assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]


def test_private_keys_are_owner_only(provisioned: Provisioned) -> None:
    assert mode_of(provisioned.server_key) == 0o600
    for site in provisioned.sites:
        assert mode_of(site.private_key) == 0o600
        assert mode_of(site.public_key) == 0o644
    assert mode_of(provisioned.ca_cert) == 0o644


def test_provisioning_leaves_no_temporary_files(provisioned: Provisioned) -> None:
    root = provisioned.ca_cert.parent
    leftovers = [path for path in root.rglob(".*") if path.is_file()]
    assert leftovers == []


def test_duplicate_site_ids_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="unique"):
        provision_loopback(tmp_path, ("site-a", "site-b", "site-a"))
    assert list(tmp_path.iterdir()) == []


# --- A real TLS handshake on loopback -------------------------------------------------


def handshake(
    provisioned: Provisioned, *, trusted_ca: Path, server_hostname: str, strict: bool = False
) -> str:
    """Serve one TLS connection with the SuperLink certificate; return the client's version."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(provisioned.server_cert, provisioned.server_key)
    client_context = ssl.create_default_context(cafile=str(trusted_ca))
    if strict:
        client_context.verify_flags |= ssl.VERIFY_X509_STRICT
    server_errors: list[BaseException] = []

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                connection, _ = listener.accept()
                with server_context.wrap_socket(connection, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (OSError, ssl.SSLError) as exc:
                server_errors.append(exc)

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                client_context.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                assert tls.recv(2) == b"ok"
                version = tls.version()
                assert version is not None
                return version
        finally:
            server.join(timeout=10)
            assert not server.is_alive()


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
def test_tls_handshake_with_the_consortium_ca(
    provisioned: Provisioned, server_hostname: str
) -> None:
    version = handshake(
        provisioned, trusted_ca=provisioned.ca_cert, server_hostname=server_hostname
    )
    assert version.startswith("TLSv1.")


def test_tls_handshake_fails_against_another_ca(provisioned: Provisioned, tmp_path: Path) -> None:
    other = provision_loopback(tmp_path, ("site-x",))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(provisioned, trusted_ca=other.ca_cert, server_hostname="localhost")


def test_tls_handshake_fails_for_a_name_not_in_the_certificate(provisioned: Provisioned) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(provisioned, trusted_ca=provisioned.ca_cert, server_hostname="example.org")


def test_tls_handshake_under_strict_x509_verification(provisioned: Provisioned) -> None:
    version = handshake(
        provisioned, trusted_ca=provisioned.ca_cert, server_hostname="localhost", strict=True
    )
    assert version.startswith("TLSv1.")


@pytest.mark.parametrize("bad_id", ["../escape", "a/b", ".hidden", "", "x" * 65, "site id"])
def test_provision_refuses_site_ids_that_are_not_plain_names(tmp_path: Path, bad_id: str) -> None:
    with pytest.raises(PkiError, match="site id"):
        provision_loopback(tmp_path, ("hospital-1", bad_id))
    assert not (tmp_path / "escape").exists()
