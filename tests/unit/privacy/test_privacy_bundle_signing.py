"""Signed app bundles, checked against Flower's own FAB verification (`_verify_fab`, what
`flower-supernode --trusted-entities` runs) and its trusted-entities validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.app_bundle import build_app_dir
from medfed.flower.fab import build_fab
from medfed.flower.testing import Fab, flower_check_trusted_keys, flower_verify_fab
from medfed.privacy.bundle_signing import (
    APP_SIGNATURE,
    flower_verification,
    load_trusted_entities,
    sign_bundle,
    trusted_entities_yaml,
    verify_bundle,
)
from medfed.privacy.errors import BundleSignatureError, KeyFileError
from medfed.privacy.signing import SigningKey

KEY = SigningKey.generate()
TRUSTED = {"medfed-consortium": KEY.public}


@pytest.fixture(scope="module")
def fab(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    app = build_app_dir(tmp_path_factory.mktemp("app"), {APP_SIGNATURE: ""})
    return build_fab(app)


def _flower_accepts(fab: bytes, value: str, trusted: dict[str, str]) -> bool:
    import hashlib

    record = Fab(hashlib.sha256(fab).hexdigest(), fab, flower_verification(value))
    return flower_verify_fab(record, trusted)


def test_the_same_app_builds_the_same_bundle_so_a_signature_made_before_submit_holds(
    tmp_path: Path, fab: bytes
) -> None:
    again = build_fab(build_app_dir(tmp_path / "again", {APP_SIGNATURE: ""}))
    assert again == fab


def test_a_signed_bundle_verifies_here_and_in_flowers_own_check(fab: bytes) -> None:
    value = sign_bundle(fab, KEY, key_id="medfed-consortium", signed_at=1_750_000_000)
    assert verify_bundle(fab, value, TRUSTED) == "medfed-consortium"
    flower_trusted = {"medfed-consortium": trusted_entities_yaml(TRUSTED).split('"')[1]}
    flower_check_trusted_keys(flower_trusted)  # Flower takes the key as Ed25519
    assert _flower_accepts(fab, value, flower_trusted)


def test_a_tampered_bundle_is_refused_here_and_by_flower(fab: bytes) -> None:
    value = sign_bundle(fab, KEY, key_id="medfed-consortium", signed_at=1_750_000_000)
    tampered = fab[:-1] + bytes([fab[-1] ^ 1])
    with pytest.raises(BundleSignatureError, match="does not verify"):
        verify_bundle(tampered, value, TRUSTED)
    flower_trusted = {"medfed-consortium": trusted_entities_yaml(TRUSTED).split('"')[1]}
    assert not _flower_accepts(tampered, value, flower_trusted)


@pytest.mark.parametrize(
    ("make_value", "reason"),
    [
        (lambda fab: "", "unsigned"),
        (lambda fab: "medfed-consortium:12", "malformed"),
        (
            lambda fab: sign_bundle(
                fab, SigningKey.generate(), key_id="medfed-consortium", signed_at=1
            ),
            "does not verify",
        ),
        (lambda fab: sign_bundle(fab, KEY, key_id="someone-else", signed_at=1), "not trusted"),
        (lambda fab: "medfed-consortium:1:%%%", "does not verify|base64url"),
        # The time is signed too: a signature moved to another time does not verify.
        (
            lambda fab: sign_bundle(fab, KEY, key_id="medfed-consortium", signed_at=1).replace(
                ":1:", ":2:"
            ),
            "does not verify",
        ),
    ],
)
def test_an_unsigned_or_badly_signed_bundle_is_refused(
    fab: bytes, make_value: object, reason: str
) -> None:
    with pytest.raises(BundleSignatureError, match=reason):
        verify_bundle(fab, make_value(fab), TRUSTED)  # type: ignore[operator]


def test_trusted_entities_round_trip_and_bad_lines_are_named(tmp_path: Path) -> None:
    path = tmp_path / "trusted-entities.yaml"
    path.write_text("# the consortium's app-signing key\n" + trusted_entities_yaml(TRUSTED))
    assert load_trusted_entities(path) == TRUSTED
    path.write_text('medfed-consortium: "ssh-rsa AAAA"\n')
    with pytest.raises(KeyFileError, match="line 1"):
        load_trusted_entities(path)
    path.write_text("# nothing\n")
    with pytest.raises(KeyFileError, match="no trusted entity"):
        load_trusted_entities(path)


def test_the_coordinator_signs_the_bundle_flwr_run_will_build(tmp_path: Path, fab: bytes) -> None:
    from medfed.app_bundle import sign_app

    app = build_app_dir(tmp_path / "app", {APP_SIGNATURE: ""})
    value = sign_app(app, KEY, key_id="medfed-consortium", signed_at=1_750_000_000)
    assert verify_bundle(fab, value, TRUSTED) == "medfed-consortium"
    (app / "medfed" / "client" / "client_app.py").write_text("# replaced\n")
    with pytest.raises(BundleSignatureError, match="does not verify"):
        verify_bundle(build_fab(app), value, TRUSTED)
