"""Ed25519 signing keys and the canonical JSON that everything signed is written in.

A site signs its ledger rows and audit entries, and a privacy officer signs approvals,
with an Ed25519 key. A signature covers `canonical_json` of a value: sorted keys, no
spaces, UTF-8, no NaN or infinity, so the same value always gives the same bytes.
Private keys are PEM PKCS8 files of mode 0600; public keys are PEM SubjectPublicKeyInfo.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medfed.common import write_atomic
from medfed.privacy.errors import KeyFileError, SigningError

JsonValue: TypeAlias = (
    bool | int | float | str | Sequence["JsonValue"] | Mapping[str, "JsonValue"] | None
)
"""A value with exactly one canonical JSON form."""

KEY_ID_HEX_CHARS = 16
SIGNATURE_HEX_CHARS = 128
"""An Ed25519 signature is 64 bytes."""


def canonical_json(value: JsonValue) -> bytes:
    """The one byte string that `value` signs as: sorted keys, no spaces, UTF-8.

    Floats are written as Python's shortest round-trip repr; NaN, infinity, non-string
    keys and non-JSON types are refused with `SigningError` rather than coerced.
    """
    try:
        plain = _plain(value, "$")
        text = json.dumps(
            plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode("utf-8")
    except RecursionError as exc:
        raise SigningError("value is nested too deeply (or refers to itself)") from exc
    except UnicodeEncodeError as exc:
        raise SigningError(f"value holds text that is not valid Unicode ({exc.reason})") from exc


def parse_canonical_json(data: bytes) -> JsonValue:
    """Parse bytes that must be exactly `canonical_json` of their value, or raise `SigningError`."""
    try:
        value: JsonValue = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SigningError(f"not valid JSON ({exc})") from exc
    if canonical_json(value) != data:
        raise SigningError("valid JSON, but not in canonical form")
    return value


def _refuse_constant(name: str) -> JsonValue:
    raise ValueError(f"{name} is not allowed")


def _plain(value: JsonValue, where: str) -> object:
    """`value` as the dicts, lists and scalars `json` writes, checking every part."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SigningError(f"{where}: {value} has no JSON form")
        return float(value)
    if isinstance(value, Mapping):
        plain: dict[str, object] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise SigningError(f"{where}: key {key!r} is not a string")
            plain[key] = _plain(item, f"{where}.{key}")
        return plain
    if isinstance(value, list | tuple):
        return [_plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
    raise SigningError(f"{where}: a {type(value).__name__} has no JSON form")


@dataclass(frozen=True, eq=False)
class VerifyKey:
    """An Ed25519 public key, named by its `key_id`."""

    public_key: Ed25519PublicKey

    @classmethod
    def load(cls, path: Path) -> VerifyKey:
        """Read a PEM SubjectPublicKeyInfo Ed25519 public key."""
        data = _read_key_file(path)
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            hint = " (it holds a private key)" if b"PRIVATE KEY" in data else ""
            raise KeyFileError(f"{path}: not a PEM public key{hint}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{path}: holds a {_kind(key)} key, not an Ed25519 key")
        return cls(key)

    @classmethod
    def from_raw(cls, raw: bytes) -> VerifyKey:
        """The key whose raw 32-byte encoding is `raw`."""
        try:
            return cls(Ed25519PublicKey.from_public_bytes(raw))
        except ValueError as exc:
            raise KeyFileError(f"not a raw Ed25519 public key ({len(raw)} bytes)") from exc

    def save(self, path: Path) -> None:
        """Write the key as PEM SubjectPublicKeyInfo, atomically, mode 0644."""
        pem = self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        write_atomic(path, pem, mode=0o644)

    @property
    def raw(self) -> bytes:
        """The raw 32-byte encoding of the key."""
        return self.public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def key_id(self) -> str:
        """The first 16 hex characters of the SHA-256 of the raw key."""
        return hashlib.sha256(self.raw).hexdigest()[:KEY_ID_HEX_CHARS]

    def verify(self, payload: bytes, signature: bytes) -> bool:
        """Whether `signature` is this key's signature of `payload`; never raises for a bad one."""
        try:
            self.public_key.verify(signature, payload)
        except (InvalidSignature, ValueError):
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and self.raw == other.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"VerifyKey(key_id={self.key_id!r})"


@dataclass(frozen=True, eq=False)
class SigningKey:
    """An Ed25519 private key: a site's, or a privacy officer's."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        """A new random key."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        """Read an unencrypted PEM PKCS8 Ed25519 key from a file no one else may read."""
        data = _read_key_file(path, private=True)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError as exc:
            raise KeyFileError(
                f"{path}: the private key is encrypted; medfed needs it plain"
            ) from exc
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise KeyFileError(f"{path}: not a PEM private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path}: holds a {_kind(key)} key, not an Ed25519 key")
        return cls(key)

    def save(self, path: Path, *, overwrite: bool = False) -> None:
        """Write the key as PEM PKCS8, atomically, mode 0600; an existing file is kept
        unless `overwrite`, since replacing a key orphans everything it signed."""
        if path.exists() and not overwrite:
            raise KeyFileError(f"{path}: already exists; refusing to replace a key")
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_atomic(path, pem, mode=0o600)

    @property
    def public(self) -> VerifyKey:
        """The matching public key."""
        return VerifyKey(self.private_key.public_key())

    def sign(self, payload: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `payload`."""
        return self.private_key.sign(payload)

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.public.key_id!r})"


def _read_key_file(path: Path, *, private: bool = False) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path}: no such key file") from exc
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot be read ({exc.strerror})") from exc
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        if private and status.st_mode & 0o077:
            raise KeyFileError(
                f"{path}: private key is readable or writable by group or others"
                f" (mode {stat.S_IMODE(status.st_mode):04o}); run `chmod 600 {path}`"
            )
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read()
    finally:
        os.close(fd)


def _kind(key: object) -> str:
    return type(key).__name__.removeprefix("_").replace("PrivateKey", "").replace("PublicKey", "")
