"""The site's bundle gate: it runs a FAB only if a trusted key signed those exact bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.client.bundle_check import BundleGate, UntrustedBundleError
from medfed.privacy.bundle_signing import APP_SIGNATURE, sign_bundle, trusted_entities_yaml
from medfed.privacy.signing import SigningKey

KEY = SigningKey.generate()
FAB = b"PK\x03\x04 a bundle's bytes"


def _gate(tmp_path: Path) -> BundleGate:
    path = tmp_path / "trusted-entities.yaml"
    path.write_text(trusted_entities_yaml({"medfed-consortium": KEY.public}))
    return BundleGate.load(path)


def test_a_signed_bundle_passes_and_names_its_signer(tmp_path: Path) -> None:
    value = sign_bundle(FAB, KEY, key_id="medfed-consortium", signed_at=5)
    assert _gate(tmp_path).check("ab" * 32, FAB, {APP_SIGNATURE: value}) == "medfed-consortium"


@pytest.mark.parametrize(
    ("run_config", "fab", "reason"),
    [
        ({}, FAB, "unsigned"),
        ({APP_SIGNATURE: 7}, FAB, "not a string"),
        (
            {APP_SIGNATURE: sign_bundle(FAB, KEY, key_id="medfed-consortium", signed_at=5)},
            FAB + b"!",
            "does not verify",
        ),
    ],
    ids=["unsigned", "not-a-string", "tampered"],
)
def test_an_unsigned_or_tampered_bundle_is_refused(
    tmp_path: Path, run_config: dict[str, object], fab: bytes, reason: str
) -> None:
    with pytest.raises(UntrustedBundleError, match=reason):
        _gate(tmp_path).check("ab" * 32, fab, run_config)


def test_a_missing_trusted_entities_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UntrustedBundleError, match="cannot read the trusted entities"):
        BundleGate.load(tmp_path / "nope.yaml")
