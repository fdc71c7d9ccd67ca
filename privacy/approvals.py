"""A privacy officer's signed approval of a study at a site, and its table in the ledger file.

An approval says: officer `officer_key_id` allows study `study` (the exact study file
whose SHA-256 is `study_sha256`) to spend up to (`epsilon`, `delta`) at site `site_id`.
The site keeps approvals append-only next to its spend, and trusts one only if it
verifies with the officer's public key; the newest verifying approval wins.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import astuple, dataclass

from medfed.privacy.errors import ApprovalError, LedgerError
from medfed.privacy.signing import (
    KEY_ID_HEX_CHARS,
    SIGNATURE_HEX_CHARS,
    SigningKey,
    VerifyKey,
    canonical_json,
)

APPROVAL_PAYLOAD_SCHEMA = "medfed.privacy.approval/1"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(rf"[0-9a-f]{{{KEY_ID_HEX_CHARS}}}")
_SIGNATURE = re.compile(rf"[0-9a-f]{{{SIGNATURE_HEX_CHARS}}}")

APPROVALS_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS approvals (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    site_id TEXT NOT NULL,
    study TEXT NOT NULL,
    study_sha256 TEXT NOT NULL,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    approved_at TEXT NOT NULL,
    officer_key_id TEXT NOT NULL,
    signature TEXT NOT NULL UNIQUE,
    added_at TEXT NOT NULL
) STRICT""",
    """CREATE TRIGGER IF NOT EXISTS approvals_no_update BEFORE UPDATE ON approvals
    BEGIN SELECT RAISE(ABORT, 'the approvals table is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS approvals_no_delete BEFORE DELETE ON approvals
    BEGIN SELECT RAISE(ABORT, 'the approvals table is append-only'); END""",
)
"""Statements that create the table in the ledger file (run by `PrivacyLedger`)."""
_COLUMNS = "site_id, study, study_sha256, epsilon, delta, approved_at, officer_key_id, signature"


@dataclass(frozen=True)
class Approval:
    """Officer `officer_key_id` allows `study` at `site_id` up to (`epsilon`, `delta`)."""

    site_id: str
    study: str
    study_sha256: str
    epsilon: float
    delta: float
    approved_at: str
    """ISO 8601 with a UTC offset, e.g. `2025-01-31T09:00:00+00:00`."""
    officer_key_id: str

    def __post_init__(self) -> None:
        for name in ("site_id", "study"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ApprovalError(f"{name} must be a non-empty string, got {value!r}")
        if not isinstance(self.study_sha256, str) or not _SHA256_HEX.fullmatch(self.study_sha256):
            raise ApprovalError(f"study_sha256 must be 64 lowercase hex, got {self.study_sha256!r}")
        if not _is_number(self.epsilon) or not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ApprovalError(f"epsilon must be positive and finite, got {self.epsilon!r}")
        if not _is_number(self.delta) or not 0 < self.delta < 1:
            raise ApprovalError(f"delta must be in (0, 1), got {self.delta!r}")
        if not isinstance(self.officer_key_id, str) or not _KEY_ID.fullmatch(self.officer_key_id):
            raise ApprovalError(f"officer_key_id must be a key id, got {self.officer_key_id!r}")
        _check_utc(self.approved_at)

    def payload(self) -> bytes:
        """The bytes the officer signs."""
        return canonical_json(
            {
                "schema": APPROVAL_PAYLOAD_SCHEMA,
                "site_id": self.site_id,
                "study": self.study,
                "study_sha256": self.study_sha256,
                "epsilon": float(self.epsilon),
                "delta": float(self.delta),
                "approved_at": self.approved_at,
                "officer_key_id": self.officer_key_id,
            }
        )


@dataclass(frozen=True)
class SignedApproval:
    """An approval and the officer's Ed25519 signature of its payload, in lowercase hex."""

    approval: Approval
    signature: str

    def __post_init__(self) -> None:
        if not isinstance(self.signature, str) or not _SIGNATURE.fullmatch(self.signature):
            raise ApprovalError("signature must be 128 lowercase hex characters")

    def problem(self, officer: VerifyKey) -> str | None:
        """Why this approval is not `officer`'s, or None if its signature verifies."""
        if self.approval.officer_key_id != officer.key_id:
            return f"signed by another key {self.approval.officer_key_id}"
        if not officer.verify(self.approval.payload(), bytes.fromhex(self.signature)):
            return "signature does not match the approval (row edited?)"
        return None


def sign_approval(approval: Approval, officer: SigningKey) -> SignedApproval:
    """The officer's signature of `approval`, which must name the officer's own key."""
    if approval.officer_key_id != officer.public.key_id:
        raise ApprovalError(
            f"the approval names officer key {approval.officer_key_id}, but the signing key"
            f" is {officer.public.key_id}"
        )
    return SignedApproval(approval, officer.sign(approval.payload()).hex())


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string, the form `approved_at` takes."""
    return dt.datetime.now(dt.UTC).isoformat()


def insert_approval(connection: sqlite3.Connection, signed: SignedApproval) -> bool:
    """Append `signed` in the caller's transaction; False if it is already stored."""
    fields = (*astuple(signed.approval), signed.signature)
    existing = connection.execute(
        f"SELECT {_COLUMNS} FROM approvals WHERE signature = ?", (signed.signature,)
    ).fetchone()
    if existing is not None:
        if tuple(existing) != fields:
            raise LedgerError("another approval with the same signature is already stored")
        return False
    connection.execute(
        f"INSERT INTO approvals ({_COLUMNS}, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (*fields, utc_now()),
    )
    return True


def read_approvals(connection: sqlite3.Connection) -> list[tuple[int, SignedApproval | str]]:
    """Every stored row, oldest first: its seq, and the approval or why it is malformed."""
    rows = connection.execute(f"SELECT seq, {_COLUMNS} FROM approvals ORDER BY seq").fetchall()
    read: list[tuple[int, SignedApproval | str]] = []
    for seq, *fields in rows:
        try:
            approval = Approval(*fields[:-1])
            read.append((int(seq), SignedApproval(approval, fields[-1])))
        except ApprovalError as exc:
            read.append((int(seq), f"malformed approval ({exc})"))
    return read


def newest_valid(
    rows: Iterable[tuple[int, SignedApproval | str]],
    *,
    study_sha256: str,
    site_id: str,
    officer: VerifyKey,
) -> Approval | None:
    """The newest (by `approved_at`, then by seq) approval of this study at this site that
    verifies with `officer`'s key; None if there is none."""
    valid = [
        (dt.datetime.fromisoformat(signed.approval.approved_at), seq, signed.approval)
        for seq, signed in rows
        if isinstance(signed, SignedApproval)
        and signed.approval.study_sha256 == study_sha256
        and signed.approval.site_id == site_id
        and signed.problem(officer) is None
    ]
    return max(valid, key=lambda item: item[:2])[2] if valid else None


def problems(
    rows: Iterable[tuple[int, SignedApproval | str]], officer: VerifyKey
) -> list[tuple[int, str]]:
    """(seq, reason) of every row that is not a verifying approval by `officer`."""
    found: list[tuple[int, str]] = []
    for seq, signed in rows:
        reason = signed if isinstance(signed, str) else signed.problem(officer)
        if reason is not None:
            found.append((seq, reason))
    return found


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_utc(text: object) -> None:
    try:
        when = dt.datetime.fromisoformat(text) if isinstance(text, str) else None
    except ValueError:
        when = None
    if when is None or when.utcoffset() != dt.timedelta(0):
        raise ApprovalError(f"approved_at must be an ISO 8601 time in UTC, got {text!r}")
