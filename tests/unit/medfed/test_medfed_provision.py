"""consortium.toml validation, `medfed provision`'s files, and certificate expiry warnings."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from medfed.cli import app
from medfed.client.config import load_site_config
from medfed.common import write_atomic
from medfed.coordinator.consortium import ConsortiumConfigError, load_consortium
from medfed.coordinator_cli import CoordinatorStartError, check_certificates
from medfed.privacy.bundle_signing import load_trusted_entities
from medfed.privacy.pki import (
    certificate_expiry,
    create_ca,
    issue_server_certificate,
    issued_by,
    load_certificate,
    load_ec_private_key,
    pem_certificate,
)
from medfed.privacy.signing import SigningKey, VerifyKey
from medfed.provision import PkiLayout, ProvisionError, provision

CONSORTIUM = """
[consortium]
name = "North"
address = "127.0.0.1:9092"
hosts = ["127.0.0.1", "localhost", "superlink.example.org"]
cert_valid_days = 90
run_dir = "run"

[[sites]]
id = "hospital-1"
name = "General"

[[sites]]
id = "hospital-2"

[[sites]]
id = "hospital-3"
"""


def _write(tmp_path: Path, text: str = CONSORTIUM) -> Path:
    path = tmp_path / "consortium.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_consortium_toml_is_read_with_defaults(tmp_path: Path) -> None:
    config = load_consortium(_write(tmp_path, '[consortium]\nname = "x"\n'))
    assert config.consortium.address == "127.0.0.1:9092"
    assert config.consortium.hosts == ("127.0.0.1", "localhost")
    assert config.consortium.cert_valid_days == 365
    assert config.run_dir == tmp_path / "run"
    assert config.sites == ()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[consortium]\nname = "x"\nport = 1\n', "consortium.port"),
        ('[consortium]\nname = "x"\ncert_valid_days = "90"\n', "consortium.cert_valid_days"),
        ('[consortium]\nname = "x"\naddress = "nohost"\n', "consortium.address"),
        ('[consortium]\nname = "x"\n[[sites]]\nid = "a/b"\n', "sites.0.id"),
        ('[consortium]\nname = "x"\n[[sites]]\nid = "a"\ncolour = 1\n', "sites.0.colour"),
        ("[consortium]\n", "consortium.name"),
    ],
)
def test_consortium_toml_names_the_bad_key(tmp_path: Path, text: str, key: str) -> None:
    path = _write(tmp_path, text)
    where = f"{re.escape(str(path))}: (unknown )?key {re.escape(key)}"
    with pytest.raises(ConsortiumConfigError, match=where):
        load_consortium(path)


def test_duplicate_site_ids_are_refused(tmp_path: Path) -> None:
    text = '[consortium]\nname = "x"\n[[sites]]\nid = "a"\n[[sites]]\nid = "a"\n'
    with pytest.raises(ConsortiumConfigError, match="listed twice"):
        load_consortium(_write(tmp_path, text))


def test_provision_writes_ca_superlink_and_site_kits(tmp_path: Path) -> None:
    config = load_consortium(_write(tmp_path))
    report = provision(config, tmp_path / "pki")
    layout = PkiLayout(tmp_path / "pki")
    assert report.sites_added == ("hospital-1", "hospital-2", "hospital-3")
    assert _mode(layout.ca_key) == 0o600
    assert _mode(layout.server_key) == 0o600
    ca = load_certificate(layout.ca_cert)
    server = load_certificate(layout.server_cert)
    assert issued_by(server, ca)
    assert isinstance(load_ec_private_key(layout.ca_key).public_key(), ec.EllipticCurvePublicKey)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1")}
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.example.org"}
    lifetime = server.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=89) < lifetime <= dt.timedelta(days=90)

    kit = layout.site_dir("hospital-1")
    assert sorted(p.name for p in kit.iterdir()) == [
        "README.txt", "ca.pem", "coordinator.pub", "site-identity.pem", "site-signing.key",
        "site-signing.pub", "site.toml", "supernode.key", "supernode.key.pub",
        "trusted-entities.yaml",
    ]  # fmt: skip
    # The CA vouches that hospital-1's signing key is hospital-1's (secure aggregation),
    # and the kit pins the coordinator's announcement key.
    from medfed.privacy.identity import identity_check

    check = identity_check(layout.ca_cert.read_bytes())
    identity = (kit / "site-identity.pem").read_text()
    assert check("hospital-1", identity) == VerifyKey.load(kit / "site-signing.pub")
    assert VerifyKey.load(kit / "coordinator.pub") == SigningKey.load(layout.coordinator_key).public
    # Each site trusts the consortium's app-signing key, which stays with the CA.
    app_key = SigningKey.load(layout.app_signing_key)
    assert _mode(layout.app_signing_key) == 0o600
    assert load_trusted_entities(kit / "trusted-entities.yaml") == {
        "medfed-consortium": app_key.public
    }
    assert (kit / "ca.pem").read_bytes() == layout.ca_cert.read_bytes()
    assert _mode(kit / "supernode.key") == 0o600
    assert _mode(kit / "site-signing.key") == 0o600
    private = serialization.load_ssh_private_key((kit / "supernode.key").read_bytes(), None)
    public = serialization.load_ssh_public_key((kit / "supernode.key.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
    assert SigningKey.load(kit / "site-signing.key").public == VerifyKey.load(
        kit / "site-signing.pub"
    )
    site = load_site_config(kit / "site.toml")
    assert site.site.id == "hospital-1"
    assert site.privacy.require_approval
    assert site.signing_key_path == kit / "site-signing.key"
    # The kit's site.toml points at its own trusted-entities file: `site start` runs only
    # bundles the consortium's app-signing key signed, without an edit.
    assert site.trusted_entities_path == kit / "trusted-entities.yaml"
    assert not site.allows_unsigned_bundles
    assert site.coordinator is not None and site.coordinator.superlink == "127.0.0.1:9092"
    assert site.resolve(site.coordinator.auth_private_key) == kit / "supernode.key"
    readme = (kit / "README.txt").read_text()
    assert "Never leaves this site" in readme
    assert "127.0.0.1:9092" in readme


def test_a_site_kit_holds_no_ca_key(tmp_path: Path) -> None:
    provision(load_consortium(_write(tmp_path)), tmp_path / "pki")
    ca_key = PkiLayout(tmp_path / "pki").ca_key.read_bytes()
    for path in (tmp_path / "pki" / "sites").rglob("*"):
        if path.is_file():
            assert path.name != "ca.key"
            assert path.read_bytes() != ca_key


def test_a_second_run_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    config = load_consortium(_write(tmp_path))
    provision(config, tmp_path / "pki")
    before = _snapshot(tmp_path / "pki")
    with pytest.raises(ProvisionError, match="not empty; nothing was re-issued"):
        provision(config, tmp_path / "pki")
    assert _snapshot(tmp_path / "pki") == before


def test_add_site_reuses_the_ca_and_leaves_other_files_byte_identical(tmp_path: Path) -> None:
    first = _write(tmp_path, CONSORTIUM.split('[[sites]]\nid = "hospital-3"')[0])
    provision(load_consortium(first), tmp_path / "pki")
    before = _snapshot(tmp_path / "pki")
    config = load_consortium(_write(tmp_path))
    report = provision(config, tmp_path / "pki", add_sites=("hospital-3",))
    after = _snapshot(tmp_path / "pki")
    assert report.sites_added == ("hospital-3",)
    assert {k: v for k, v in after.items() if not k.startswith("sites/hospital-3/")} == before
    layout = PkiLayout(tmp_path / "pki")
    assert (layout.site_dir("hospital-3") / "ca.pem").read_bytes() == layout.ca_cert.read_bytes()
    with pytest.raises(ProvisionError, match="exists already"):
        provision(config, tmp_path / "pki", add_sites=("hospital-3",))
    with pytest.raises(ProvisionError, match="not listed"):
        provision(config, tmp_path / "pki", add_sites=("hospital-9",))
    with pytest.raises(ProvisionError, match="holds no consortium CA"):
        provision(config, tmp_path / "empty", add_sites=("hospital-3",))
    assert _snapshot(tmp_path / "pki") == after


def test_cli_provision_json_and_refusal_in_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path)
    out = tmp_path / "pki"
    runner = CliRunner()
    first = runner.invoke(app, ["provision", str(path), "--out", str(out), "--json"])
    assert first.exit_code == 0, first.output
    assert '"sites_added": ["hospital-1", "hospital-2", "hospital-3"]' in first.stdout
    again = runner.invoke(app, ["provision", str(path), "--out", str(out)])
    assert again.exit_code == 1
    assert "Traceback" not in again.output
    assert "nothing was re-issued" in again.output
    bad = _write(tmp_path, '[consortium]\nname = "x"\nport = 1\n')
    refused = runner.invoke(app, ["provision", str(bad), "--out", str(tmp_path / "o")])
    assert refused.exit_code == 1
    assert "key consortium.port" in refused.output


def _replace_server_cert(layout: PkiLayout, **validity: object) -> None:
    ca_key = load_ec_private_key(layout.ca_key)
    ca = load_certificate(layout.ca_cert)
    _, cert = issue_server_certificate(ca_key, ca, hosts=("127.0.0.1",), **validity)  # type: ignore[arg-type]
    write_atomic(layout.server_cert, pem_certificate(cert))


def test_expiry_warns_within_30_days_and_refuses_expired(tmp_path: Path) -> None:
    provision(load_consortium(_write(tmp_path)), tmp_path / "pki")
    layout = PkiLayout(tmp_path / "pki")
    warnings: list[str] = []
    check_certificates(layout, warnings.append)
    assert warnings == []

    _replace_server_cert(layout, valid_days=5)
    check_certificates(layout, warnings.append)
    assert len(warnings) == 1
    assert "SuperLink certificate" in warnings[0]
    assert "days left" in warnings[0]

    _replace_server_cert(layout, not_valid_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    expiry = certificate_expiry("SuperLink", layout.server_cert)
    assert expiry.expired
    assert expiry.days_left < 0
    with pytest.raises(CoordinatorStartError, match=r"refusing to start: .* expired on"):
        check_certificates(layout, warnings.append)


def test_a_ca_can_be_issued_with_a_short_or_past_validity() -> None:
    _, short = create_ca("short", valid_days=1)
    assert short.not_valid_after_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(days=1)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    _, expired = create_ca("past", not_valid_after=past)
    assert expired.not_valid_before_utc < expired.not_valid_after_utc
    assert abs(expired.not_valid_after_utc - past) < dt.timedelta(seconds=1)


def test_cli_status_reports_expiry_and_an_unanswering_superlink(tmp_path: Path) -> None:
    from medfed.processes import free_port

    text = CONSORTIUM.replace("127.0.0.1:9092", f"127.0.0.1:{free_port()}")
    path = _write(tmp_path, text)
    provision(load_consortium(path), tmp_path / "pki")
    _replace_server_cert(PkiLayout(tmp_path / "pki"), valid_days=3)
    result = CliRunner().invoke(
        app, ["coordinator", "status", str(path), "--pki", str(tmp_path / "pki"), "--json"]
    )
    assert result.exit_code == 1  # nothing answers on that port
    assert '"superlink_healthy": false' in result.stdout
    assert '"runs": []' in result.stdout  # the run state, beside the SuperLink's health
    assert "SuperLink certificate" in result.stderr
