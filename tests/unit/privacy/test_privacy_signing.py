"""Ed25519 keys and canonical JSON, checked against `cryptography` and `json` directly."""

from __future__ import annotations

import hashlib
import json
import math
import stat
from collections.abc import Callable
from pathlib import Path
from random import Random

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given
from hypothesis import strategies as st

from medfed.privacy.errors import KeyFileError, SigningError
from medfed.privacy.signing import (
    JsonValue,
    SigningKey,
    VerifyKey,
    canonical_json,
    parse_canonical_json,
)

PAYLOAD = b"round 3 of run-1 spent (1.1, 0.05, 40)"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def raw_public(key: SigningKey) -> bytes:
    return key.private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def write_private(path: Path, pem: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(pem)
    path.chmod(mode)
    return path


def test_signature_verifies_with_cryptography_directly(key: SigningKey) -> None:
    signature = key.sign(PAYLOAD)
    assert len(signature) == 64
    Ed25519PublicKey.from_public_bytes(raw_public(key)).verify(signature, PAYLOAD)
    assert key.public.verify(PAYLOAD, signature)


def test_key_id_is_the_start_of_the_sha256_of_the_raw_key(key: SigningKey) -> None:
    assert key.public.key_id == hashlib.sha256(raw_public(key)).hexdigest()[:16]
    assert key.public.raw == raw_public(key)
    assert SigningKey.generate().public.key_id != key.public.key_id


@pytest.mark.parametrize(
    "signature_of",
    [
        lambda key: key.sign(PAYLOAD + b"!"),
        lambda key: SigningKey.generate().sign(PAYLOAD),
        lambda key: key.sign(PAYLOAD)[:-1],
        lambda key: key.sign(PAYLOAD) + b"\0",
        lambda key: b"",
        lambda key: bytes(64),
    ],
    ids=["other payload", "other key", "truncated", "extended", "empty", "zeros"],
)
def test_bad_signatures_are_false_never_errors(
    key: SigningKey, signature_of: Callable[[SigningKey], bytes]
) -> None:
    assert key.public.verify(PAYLOAD, signature_of(key)) is False


def test_private_key_round_trips_with_mode_0600(key: SigningKey, tmp_path: Path) -> None:
    path = tmp_path / "keys" / "site.key"
    key.save(path)
    assert mode_of(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = SigningKey.load(path)
    assert loaded.public == key.public
    assert loaded.sign(PAYLOAD) == key.sign(PAYLOAD)  # Ed25519 is deterministic
    assert not list(path.parent.glob(".site.key.*"))  # no temporary file left


def test_save_keeps_an_existing_key_unless_told(key: SigningKey, tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    key.save(path)
    other = SigningKey.generate()
    with pytest.raises(KeyFileError, match="already exists"):
        other.save(path)
    assert SigningKey.load(path).public == key.public
    other.save(path, overwrite=True)
    assert SigningKey.load(path).public == other.public
    assert mode_of(path) == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620, 0o602, 0o700 | 0o044])
def test_private_key_open_to_others_is_refused(key: SigningKey, tmp_path: Path, mode: int) -> None:
    path = tmp_path / "site.key"
    key.save(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        SigningKey.load(path)
    message = str(info.value)
    assert str(path) in message
    assert f"chmod 600 {path}" in message


def test_owner_only_modes_are_accepted(key: SigningKey, tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    key.save(path)
    path.chmod(0o400)
    assert SigningKey.load(path).public == key.public


def test_public_key_round_trips_as_subject_public_key_info(key: SigningKey, tmp_path: Path) -> None:
    path = tmp_path / "site.pub"
    key.public.save(path)
    assert path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    direct = serialization.load_pem_public_key(path.read_bytes())
    assert isinstance(direct, Ed25519PublicKey)
    direct.verify(key.sign(PAYLOAD), PAYLOAD)
    loaded = VerifyKey.load(path)
    assert loaded == key.public
    assert hash(loaded) == hash(key.public)
    assert loaded.key_id == key.public.key_id
    assert VerifyKey.from_raw(loaded.raw) == loaded


def pem_private(private: ec.EllipticCurvePrivateKey | ed448.Ed448PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_private_keys_of_other_types_are_refused(tmp_path: Path) -> None:
    ec_path = write_private(
        tmp_path / "ec.key", pem_private(ec.generate_private_key(ec.SECP256R1()))
    )
    with pytest.raises(KeyFileError, match=r"ec\.key: holds a EC key, not an Ed25519 key"):
        SigningKey.load(ec_path)
    ed448_path = write_private(
        tmp_path / "ed448.key", pem_private(ed448.Ed448PrivateKey.generate())
    )
    with pytest.raises(KeyFileError, match="Ed448"):
        SigningKey.load(ed448_path)


def test_public_keys_of_other_types_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ec.pub"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(KeyFileError, match=str(path)):
        VerifyKey.load(path)


def test_files_that_are_not_keys_are_refused_with_their_path(
    key: SigningKey, tmp_path: Path
) -> None:
    garbage = write_private(tmp_path / "garbage.key", b"not a key at all\n")
    with pytest.raises(KeyFileError, match=f"{garbage}: not a PEM private key"):
        SigningKey.load(garbage)
    with pytest.raises(KeyFileError, match=f"{garbage}: not a PEM public key"):
        VerifyKey.load(garbage)
    private = tmp_path / "site.key"
    key.save(private)
    with pytest.raises(KeyFileError, match="it holds a private key"):
        VerifyKey.load(private)
    public = tmp_path / "site.pub"
    key.public.save(public)
    public.chmod(0o600)
    with pytest.raises(KeyFileError, match=f"{public}: not a PEM private key"):
        SigningKey.load(public)
    missing = tmp_path / "missing.key"
    with pytest.raises(KeyFileError, match=f"{missing}: no such key file"):
        SigningKey.load(missing)
    with pytest.raises(KeyFileError, match="not a regular file"):
        VerifyKey.load(tmp_path)
    with pytest.raises(KeyFileError, match="not a raw Ed25519 public key"):
        VerifyKey.from_raw(b"short")


def test_encrypted_private_key_is_refused(key: SigningKey, tmp_path: Path) -> None:
    pem = key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    path = write_private(tmp_path / "site.key", pem)
    with pytest.raises(KeyFileError, match="encrypted"):
        SigningKey.load(path)


def test_repr_shows_the_key_id_and_no_key_material(key: SigningKey) -> None:
    assert repr(key) == f"SigningKey(key_id={key.public.key_id!r})"
    assert repr(key.public) == f"VerifyKey(key_id={key.public.key_id!r})"


def test_canonical_json_has_one_exact_form() -> None:
    value: JsonValue = {"b": 1, "a": [1.5, "é\n", None, True, -0.0, 1e300], "ä": {"z": 0, "y": ""}}
    assert canonical_json(value) == (
        '{"a":[1.5,"é\\n",null,true,-0.0,1e+300],"b":1,"ä":{"y":"","z":0}}'.encode()
    )
    assert canonical_json({"x": (1, 2)}) == canonical_json({"x": [1, 2]})
    assert canonical_json(0.1) == b"0.1"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (math.nan, "no JSON form"),
        ({"a": [math.inf]}, r"\$\.a\[0\]: inf has no JSON form"),
        ({1: "a"}, "is not a string"),
        ({"a": {1, 2}}, "a set has no JSON form"),
        ([b"bytes"], "a bytes has no JSON form"),
        ("\ud800", "not valid Unicode"),
    ],
)
def test_canonical_json_refuses_what_has_no_single_form(value: object, message: str) -> None:
    with pytest.raises(SigningError, match=message):
        canonical_json(value)  # type: ignore[arg-type]


def test_canonical_json_refuses_a_value_that_contains_itself() -> None:
    looped: list[object] = []
    looped.append(looped)
    with pytest.raises(SigningError, match="nested too deeply"):
        canonical_json(looped)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [b'{"a": 1}', b'{"b":1,"a":2}', b"NaN", b'{"a":1.0e0}', b"\xff", b"", b'{"a":1,"a":1}'],
)
def test_parse_canonical_json_refuses_other_forms(data: bytes) -> None:
    with pytest.raises(SigningError):
        parse_canonical_json(data)


json_values: st.SearchStrategy[JsonValue] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_canonical_json_round_trips_through_json(value: JsonValue) -> None:
    data = canonical_json(value)
    assert json.loads(data.decode("utf-8")) == value
    assert parse_canonical_json(data) == value
    assert canonical_json(json.loads(data)) == data
    assert data == json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


@given(st.dictionaries(st.text(), json_values, max_size=6), st.randoms(use_true_random=False))
def test_canonical_json_ignores_key_order(mapping: dict[str, JsonValue], rng: Random) -> None:
    items = list(mapping.items())
    rng.shuffle(items)
    assert canonical_json(dict(items)) == canonical_json(mapping)
