"""Signed update receipts: the coordinator takes an update only if its site signed it for
this run, round and model; the check is against `cryptography`'s own Ed25519 verify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from medfed.coordinator.errors import StudyConfigError
from medfed.coordinator.site_keys import load_site_keys
from medfed.coordinator.validate import ReceiptCheck, Rejection, SiteUpdate, validate_train_reply
from medfed.model import wire
from medfed.model.network import arrays_sha256
from medfed.privacy.receipts import RECEIPT_SCHEMA, UpdateReceipt
from medfed.privacy.signing import SigningKey

pytestmark = pytest.mark.usefixtures("server_identity")

REFERENCE = {"heads.readmission.bias": np.zeros(3, dtype=np.float32)}
SITE = "hospital-1"
KEY = SigningKey.generate()
METRICS = {
    wire.NUM_EXAMPLES: 100,
    wire.LOCAL_LOSS: 0.6,
    wire.MODEL_TRAIN_LOSS: 0.6,
    wire.EPSILON: 1.0,
    wire.NOISE_MULTIPLIER: 1.1,
    wire.EVAL_EXAMPLES: 30,
    wire.EVAL_AUROC: 0.7,
    wire.EVAL_LOSS: 0.6,
    wire.EVAL_ACCURACY: 0.6,
}


def _check(round_number: int = 2, **changes: object) -> ReceiptCheck:
    values: dict[str, object] = {
        "run_id": "run-9",
        "study_sha256": "ab" * 32,
        "round": round_number,
        "model_sha256": arrays_sha256(REFERENCE),
        "site_keys": {SITE: KEY.public},
        **changes,
    }
    return ReceiptCheck(**values)  # type: ignore[arg-type]


def _reply(arrays: dict[str, np.ndarray], signature: str, site: str = SITE) -> Message:
    instruction = Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)
    instruction.metadata.__dict__["_message_id"] = instruction.object_id
    content = RecordDict(
        {
            wire.ARRAYS: wire.arrays_to_record(arrays),
            wire.METRICS: MetricRecord(METRICS),
            wire.SITE: ConfigRecord({wire.SITE_ID: site, wire.RECEIPT_SIGNATURE: signature}),
        }
    )
    return Message(content, reply_to=instruction)


def _signed(arrays: dict[str, np.ndarray], round_number: int = 2, key: SigningKey = KEY) -> str:
    receipt = UpdateReceipt(
        run_id="run-9", study_sha256="ab" * 32, round=round_number,
        model_sha256=arrays_sha256(REFERENCE), update_sha256=arrays_sha256(arrays), site_id=SITE,
    )  # fmt: skip
    return receipt.sign(key)


UPDATE = {"heads.readmission.bias": np.array([0.1, -0.2, 0.3], dtype=np.float32)}


def test_the_signature_is_plain_ed25519_over_the_canonical_receipt() -> None:
    signature = bytes.fromhex(_signed(UPDATE))
    payload = json.dumps(
        {
            "model_sha256": arrays_sha256(REFERENCE), "round": 2, "run_id": "run-9",
            "schema": RECEIPT_SCHEMA, "site_id": SITE, "study_sha256": "ab" * 32,
            "update_sha256": arrays_sha256(UPDATE),
        },
        sort_keys=True, separators=(",", ":"),
    ).encode()  # fmt: skip
    public = Ed25519PublicKey.from_public_bytes(KEY.public.raw)
    public.verify(signature, payload)  # raises if not valid


def test_a_signed_update_is_taken() -> None:
    result = validate_train_reply(_reply(UPDATE, _signed(UPDATE)), REFERENCE, receipts=_check())
    assert isinstance(result, SiteUpdate)


@pytest.mark.parametrize(
    ("make_reply", "check", "reason"),
    [
        # Altered in transit: one value changed after signing.
        (
            lambda: _reply(
                {"heads.readmission.bias": np.array([0.1, -0.2, 9.9], dtype=np.float32)},
                _signed(UPDATE),
            ),
            _check(),
            "does not verify",
        ),
        # Replayed: a reply signed for round 1 presented in round 2.
        (lambda: _reply(UPDATE, _signed(UPDATE, round_number=1)), _check(), "does not verify"),
        # Trained on another model than the one the coordinator sent this round.
        (
            lambda: _reply(UPDATE, _signed(UPDATE)),
            _check(model_sha256="00" * 32),
            "does not verify",
        ),
        # Signed by a key that is not the site's.
        (
            lambda: _reply(UPDATE, _signed(UPDATE, key=SigningKey.generate())),
            _check(),
            "does not verify",
        ),
        # A site the coordinator has no key for.
        (
            lambda: _reply(UPDATE, _signed(UPDATE), site="hospital-x"),
            _check(),
            "not a registered site",
        ),
        (lambda: _reply(UPDATE, "zz"), _check(), "does not verify"),
    ],
)
def test_unsigned_altered_or_replayed_updates_are_rejected(
    make_reply: object, check: ReceiptCheck, reason: str
) -> None:
    result = validate_train_reply(make_reply(), REFERENCE, receipts=check)  # type: ignore[operator]
    assert isinstance(result, Rejection)
    assert reason in result.reason


def test_site_keys_load_from_a_folder_and_bad_ones_are_named(tmp_path: Path) -> None:
    KEY.public.save(tmp_path / f"{SITE}.pub")
    assert load_site_keys(tmp_path)[SITE].raw == KEY.public.raw
    (tmp_path / "broken.pub").write_text("not a key")
    with pytest.raises(StudyConfigError, match=r"broken\.pub"):
        load_site_keys(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StudyConfigError, match="holds no"):
        load_site_keys(empty)
