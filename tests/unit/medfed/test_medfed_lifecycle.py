"""Certificate lifecycle: renewing the SuperLink's certificate keeps the CA and the sites'
kits byte-identical; a revoked site (or its very key) is recorded and never registered
again; the CLI answers in one line or one JSON document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from medfed.cli import app
from medfed.coordinator.consortium import load_consortium
from medfed.lifecycle import (
    is_revoked,
    record_revocation,
    registered_nodes,
    remember_node,
    renew_superlink,
    revoked_sites,
)
from medfed.privacy.pki import issued_by, load_certificate
from medfed.provision import PkiLayout, ProvisionError, provision

CONSORTIUM = """\
[consortium]
name = "lifecycle"
address = "127.0.0.1:9092"
run_dir = "{run_dir}"

[[sites]]
id = "hospital-1"

[[sites]]
id = "hospital-2"
"""


def _files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.fixture
def pki(tmp_path: Path) -> tuple[Path, PkiLayout]:
    toml = tmp_path / "consortium.toml"
    toml.write_text(CONSORTIUM.format(run_dir=tmp_path / "runs"))
    provision(load_consortium(toml), tmp_path / "pki")
    return toml, PkiLayout(tmp_path / "pki")


def test_renewal_issues_a_new_superlink_certificate_from_the_same_ca(
    pki: tuple[Path, PkiLayout],
) -> None:
    toml, layout = pki
    before = _files(layout.root)
    old = load_certificate(layout.server_cert)

    renewed = renew_superlink(load_consortium(toml), layout)

    new = load_certificate(layout.server_cert)
    assert new.serial_number != old.serial_number
    assert issued_by(new, load_certificate(layout.ca_cert))
    assert new.not_valid_after_utc >= old.not_valid_after_utc
    assert renewed.not_valid_after == new.not_valid_after_utc
    sans = new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans == old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    after = _files(layout.root)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"superlink/superlink.pem", "superlink/superlink.key"}


def test_identity_renewal_reissues_only_that_sites_certificate_for_its_key(
    pki: tuple[Path, PkiLayout],
) -> None:
    from medfed.privacy.identity import identity_check
    from medfed.privacy.signing import VerifyKey

    toml, layout = pki
    runner = CliRunner()
    before = _files(layout.root)
    kit = layout.site_dir("hospital-2")
    old = load_certificate(kit / "site-identity.pem")
    result = runner.invoke(
        app,
        ["provision", str(toml), "--out", str(layout.root), "--renew-identity", "hospital-2",
         "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (document,) = json.loads(result.stdout)
    assert document["identity_cert"] == str(kit / "site-identity.pem")
    new = load_certificate(kit / "site-identity.pem")
    assert new.serial_number != old.serial_number
    check = identity_check(layout.ca_cert.read_bytes())
    pem = (kit / "site-identity.pem").read_text()
    assert check("hospital-2", pem) == VerifyKey.load(kit / "site-signing.pub")
    after = _files(layout.root)
    assert {name for name in before if before[name] != after[name]} == {
        "sites/hospital-2/site-identity.pem"
    }
    unknown = runner.invoke(
        app, ["provision", str(toml), "--out", str(layout.root), "--renew-identity", "nobody"]
    )
    assert unknown.exit_code == 1 and "not listed" in unknown.output
    assert "Traceback" not in unknown.output


def test_renewal_without_the_ca_key_is_refused(pki: tuple[Path, PkiLayout]) -> None:
    toml, layout = pki
    layout.ca_key.unlink()
    with pytest.raises(ProvisionError, match="cannot renew without the consortium CA"):
        renew_superlink(load_consortium(toml), layout)


def test_a_revoked_site_and_its_key_stay_revoked(pki: tuple[Path, PkiLayout]) -> None:
    _, layout = pki
    keys = layout.supernode_public_keys()
    assert not is_revoked(layout, "hospital-1", keys["hospital-1"])

    entry = record_revocation(layout, "hospital-1")
    again = record_revocation(layout, "hospital-1")  # idempotent: the first time stays

    assert entry == again
    assert is_revoked(layout, "hospital-1", keys["hospital-1"])
    assert not is_revoked(layout, "hospital-2", keys["hospital-2"])
    # The same key presented under another site's name is still refused.
    assert is_revoked(layout, "hospital-2", keys["hospital-1"])
    assert list(revoked_sites(layout)) == ["hospital-1"]
    with pytest.raises(ProvisionError, match="no provisioned kit"):
        record_revocation(layout, "hospital-9")


def test_a_corrupt_revocation_list_is_an_error_not_an_empty_list(
    pki: tuple[Path, PkiLayout],
) -> None:
    _, layout = pki
    (layout.root / "revoked.json").write_text("[]")
    with pytest.raises(ProvisionError, match="is not a revocation list"):
        revoked_sites(layout)


def test_registered_node_ids_are_remembered(tmp_path: Path) -> None:
    remember_node(tmp_path, "hospital-1", "123")
    remember_node(tmp_path, "hospital-2", "456")
    assert registered_nodes(tmp_path) == {"hospital-1": "123", "hospital-2": "456"}


def test_cli_renew_and_revoke(pki: tuple[Path, PkiLayout]) -> None:
    toml, layout = pki
    runner = CliRunner()
    renewed = runner.invoke(app, ["provision", str(toml), "--out", str(layout.root), "--renew",
                                  "--json"])  # fmt: skip
    assert renewed.exit_code == 0, renewed.output
    assert json.loads(renewed.stdout)["superlink_cert"] == str(layout.server_cert)

    revoked = runner.invoke(app, ["coordinator", "revoke", str(toml), "--pki", str(layout.root),
                                  "hospital-2", "--json"])  # fmt: skip
    assert revoked.exit_code == 0, revoked.output
    document = json.loads(revoked.stdout)
    assert (document["site"], document["unregistered_node"]) == ("hospital-2", None)
    assert "restart the SuperLink" in document["note"]

    unknown = runner.invoke(app, ["coordinator", "revoke", str(toml), "--pki", str(layout.root),
                                  "hospital-9"])  # fmt: skip
    assert unknown.exit_code == 1
    assert "no provisioned kit for 'hospital-9'" in unknown.output
    assert "Traceback" not in unknown.output
