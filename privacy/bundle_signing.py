"""Signed app bundles: the consortium signs the FAB it submits; a site runs only a FAB
that a key it trusts signed.

The signature is Flower's own FAB verification format (its Ed25519 primitives, as a
SuperNode started with `--trusted-entities` checks them): Ed25519 over `signed_at`
(8 bytes, big-endian) followed by the
SHA-256 of the FAB's bytes, base64url-encoded; trusted keys are OpenSSH `ssh-ed25519`
lines keyed by an id, as in `flower-supernode --trusted-entities` YAML. Flower 1.42 only
carries signatures for apps fetched from Flower Hub (`flwr run` of a local app sends an
empty verification map, and a SuperNode started with `--trusted-entities` then refuses
every run), so medfed ships the signature in the run config under `APP_SIGNATURE` and the
site's warm executor checks it before it installs or runs the bundle.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medfed.privacy.errors import BundleSignatureError, KeyFileError
from medfed.privacy.signing import SigningKey, VerifyKey

APP_SIGNATURE = "app-signature"
"""The run config key that carries the bundle's signature: `<key id>:<signed_at>:<sig>`."""
TRUSTED_ENTITIES_NAME = "trusted-entities.yaml"
_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def message_to_sign(fab: bytes, signed_at: int) -> bytes:
    """What is signed, as Flower's `create_message_to_sign` builds it."""
    return signed_at.to_bytes(8, "big") + hashlib.sha256(fab).digest()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def sign_bundle(fab: bytes, key: SigningKey, *, key_id: str, signed_at: int) -> str:
    """The `APP_SIGNATURE` value for `fab`: `<key id>:<signed_at>:<base64url signature>`."""
    if not _KEY_ID.match(key_id):
        raise BundleSignatureError(f"key id {key_id!r}: use letters, digits, '.', '_' or '-'")
    if not 0 <= signed_at < 2**63:
        raise BundleSignatureError(f"signed_at {signed_at} is not a Unix time")
    signature = key.sign(message_to_sign(fab, signed_at))
    return f"{key_id}:{signed_at}:{_b64url(signature)}"


def flower_verification(value: str) -> dict[str, str]:
    """The same signature as the verification map Flower's FAB record holds
    (`{key id: '{"signature": ..., "signed_at": ...}'}`), for Flower's own check."""
    key_id, signed_at, signature = _parse(value)
    return {key_id: f'{{"signature": "{signature}", "signed_at": {signed_at}}}'}


def _parse(value: str) -> tuple[str, int, str]:
    parts = value.split(":")
    if len(parts) != 3 or not _KEY_ID.match(parts[0]) or not parts[1].isdigit():
        raise BundleSignatureError(
            f"run config {APP_SIGNATURE!r} is malformed (expected <key id>:<signed_at>:<sig>)"
        )
    return parts[0], int(parts[1]), parts[2]


def verify_bundle(fab: bytes, value: str, trusted: Mapping[str, VerifyKey]) -> str:
    """The id of the trusted key that signed `fab`; raise `BundleSignatureError` if none did."""
    if not value:
        raise BundleSignatureError(
            "the app bundle is unsigned: this site runs only bundles the consortium signed"
        )
    key_id, signed_at, signature = _parse(value)
    public = trusted.get(key_id)
    if public is None:
        raise BundleSignatureError(f"the app bundle is signed by {key_id!r}, a key not trusted")
    try:
        raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    except (binascii.Error, ValueError) as exc:
        raise BundleSignatureError("the app bundle's signature is not base64url") from exc
    if not public.verify(message_to_sign(fab, signed_at), raw):
        raise BundleSignatureError(
            f"the app bundle's signature by {key_id!r} does not verify: the bundle was altered"
            " after signing, or signed by another key"
        )
    return key_id


def openssh_public_line(public: VerifyKey) -> str:
    """`ssh-ed25519 AAAA...`: the form Flower's trusted-entities file holds."""
    line = public.public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return line.decode("ascii")


def trusted_entities_yaml(trusted: Mapping[str, VerifyKey]) -> str:
    """A trusted-entities file in Flower's YAML form: one `id: "ssh-ed25519 ..."` a line."""
    for key_id in trusted:
        if not _KEY_ID.match(key_id):
            raise BundleSignatureError(f"key id {key_id!r}: use letters, digits, '.', '_' or '-'")
    return "".join(f'{key_id}: "{openssh_public_line(key)}"\n' for key_id, key in trusted.items())


def load_trusted_entities(path: Path) -> dict[str, VerifyKey]:
    """The keys of a trusted-entities file (`id: "ssh-ed25519 ..."` lines; comments allowed)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the trusted entities ({exc.strerror})") from exc
    trusted: dict[str, VerifyKey] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key_id, _, rest = line.partition(":")
        key_id, rest = key_id.strip(), rest.strip().strip("'\"")
        try:
            if not _KEY_ID.match(key_id):
                raise ValueError(f"bad key id {key_id!r}")
            key = serialization.load_ssh_public_key(rest.encode("ascii"))
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("not an Ed25519 key")
        except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
            raise KeyFileError(f"{path}, line {number}: {exc}") from exc
        trusted[key_id] = VerifyKey(key)
    if not trusted:
        raise KeyFileError(f"{path}: no trusted entity in it")
    return trusted
