"""A site's signed receipt for one update: what it trained, for which round, on which model.

The site signs (run, study, round, the model it received, the update it sends, its id)
with its Ed25519 key; the coordinator rebuilds the receipt from its own record of the
round and the update it received, and checks the signature. A reply altered in
transit, replayed from another round or run, or trained on a different model fails.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

from medfed.privacy.signing import SigningKey, VerifyKey, canonical_json

RECEIPT_SCHEMA = "medfed.update-receipt/1"


@dataclass(frozen=True)
class UpdateReceipt:
    """The facts a site's signature on an update covers."""

    run_id: str
    study_sha256: str
    round: int
    model_sha256: str
    update_sha256: str
    site_id: str

    def payload(self) -> bytes:
        """The exact bytes signed: canonical JSON with a schema tag."""
        return canonical_json({"schema": RECEIPT_SCHEMA, **asdict(self)})

    def sign(self, signer: SigningKey) -> str:
        """The signature, as lowercase hex."""
        return signer.sign(self.payload()).hex()

    def verify(self, public: VerifyKey, signature_hex: str) -> bool:
        """True if `signature_hex` is `public`'s signature of this receipt."""
        try:
            signature = bytes.fromhex(signature_hex)
        except ValueError:
            return False
        return public.verify(self.payload(), signature)


def ask_receipt_payload(
    *, run_id: str, query_sha256: str, step: int, site_id: str, released: np.ndarray
) -> bytes:
    """The bytes a site signs over an answer: the egress guard lets out only a vector the site
    worker signed, and the evidence record can show which site said what."""
    digest = hashlib.sha256(np.ascontiguousarray(released, dtype=np.float64).tobytes())
    return "|".join(
        ["medfed-ask-v1", run_id, query_sha256, str(step), site_id, digest.hexdigest()]
    ).encode("utf-8")
