"""Signed heads and cross-checks: what makes deleting the newest records visible.

An append-only log verifies entry by entry, but a log whose newest entries were cut off
is still a valid, shorter log; so is a ledger whose newest rows were deleted and whose
SQLite sequence counter was rewound. Two independent checks see it:

- a **signed head** (how many records, and the hash of the last one) written somewhere
  else after every append: the site daemon's state file, the coordinator's checkpoint
  database, or a copy the officer exports. A record set shorter than its head, or whose
  record at the head's position is not the one the head names, was truncated or
  rewritten. Records appended after the head was written are fine (it is a prefix).
- a **cross-check** of the site's ledger with its audit log: every spend is written to
  both, so a spend in one and not the other was deleted from the other.

Neither check trusts the file it checks; the head is signed by the same key as the
records, so forging it needs that key (and then the records could be re-signed anyway:
an officer-exported head kept off the site is what defends against that).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from medfed.common import write_atomic
from medfed.privacy.audit import AuditEntry, AuditVerification
from medfed.privacy.errors import AuditLogError
from medfed.privacy.ledger import RecordedSpend
from medfed.privacy.signing import SigningKey, VerifyKey, canonical_json

HEAD_SCHEMA = "medfed.privacy.head/1"
SPEND_EVENT = "budget spent"
"""The site audit log's event for a recorded spend (written by the privacy gate)."""
HeadKind = Literal["audit", "ledger"]


@dataclass(frozen=True)
class SignedHead:
    """`count` records of `kind`, the last one with hash `last`, as of `written_at`."""

    kind: HeadKind
    count: int
    last: str
    written_at: str
    key_id: str
    signature: str

    def payload(self) -> bytes:
        """The bytes the signature covers: every field but the signature."""
        return canonical_json(
            {
                "schema": HEAD_SCHEMA,
                "kind": self.kind,
                "count": self.count,
                "last": self.last,
                "written_at": self.written_at,
                "key_id": self.key_id,
            }
        )

    @classmethod
    def sign(cls, *, kind: HeadKind, count: int, last: str, signer: SigningKey) -> SignedHead:
        unsigned = cls(
            kind=kind,
            count=count,
            last=last,
            written_at=dt.datetime.now(dt.UTC).isoformat(),
            key_id=signer.public.key_id,
            signature="",
        )
        return replace(unsigned, signature=signer.sign(unsigned.payload()).hex())

    def to_json(self) -> dict[str, str | int]:
        return {
            "kind": self.kind,
            "count": self.count,
            "last": self.last,
            "written_at": self.written_at,
            "key_id": self.key_id,
            "signature": self.signature,
        }

    @classmethod
    def from_json(cls, value: object, where: str) -> SignedHead:
        """Parse a head; raise `AuditLogError` naming `where` if it is not one."""
        fields = {"kind", "count", "last", "written_at", "key_id", "signature"}
        if not isinstance(value, dict) or set(value) != fields:
            raise AuditLogError(f"{where}: not a signed head (it must hold {sorted(fields)})")
        kind, count = value["kind"], value["count"]
        if kind not in ("audit", "ledger") or not isinstance(count, int) or count < 0:
            raise AuditLogError(f"{where}: not a signed head (bad kind or count)")
        if not all(isinstance(value[name], str) for name in fields - {"count"}):
            raise AuditLogError(f"{where}: not a signed head (a field is not text)")
        return cls(
            kind=kind,
            count=count,
            last=value["last"],
            written_at=value["written_at"],
            key_id=value["key_id"],
            signature=value["signature"],
        )

    def signature_problem(self, public: VerifyKey) -> str | None:
        """Why this head cannot be trusted with `public`, or None."""
        if self.key_id != public.key_id:
            return f"the {self.kind} head is signed by another key {self.key_id}"
        try:
            raw = bytes.fromhex(self.signature)
        except ValueError:
            return f"the {self.kind} head's signature is not hex"
        if not public.verify(self.payload(), raw):
            return f"the {self.kind} head's signature does not match (head edited?)"
        return None


def spend_hash(spend: RecordedSpend) -> str:
    """What a ledger head names as its last row: the row's identity and parameters."""
    return hashlib.sha256(
        canonical_json(
            {
                "seq": spend.seq,
                "dataset": spend.dataset,
                "run_id": spend.run_id,
                "round": spend.round,
                "recorded_at": spend.recorded_at.isoformat(),
            }
        )
    ).hexdigest()


def entry_hash(entry: AuditEntry) -> str:
    """What an audit head names as its last entry: the hash the next entry chains to."""
    return hashlib.sha256(entry.line()).hexdigest()


def ledger_head(records: list[RecordedSpend], signer: SigningKey) -> SignedHead:
    """The signed head of a ledger's spend rows (oldest first)."""
    last = spend_hash(records[-1]) if records else ""
    return SignedHead.sign(kind="ledger", count=len(records), last=last, signer=signer)


def audit_head(verification: AuditVerification, signer: SigningKey) -> SignedHead:
    """The signed head of an audit log that verified (`verify_audit_log`)."""
    return SignedHead.sign(
        kind="audit",
        count=verification.entries_checked,
        last=verification.last_hash if verification.entries_checked else "",
        signer=signer,
    )


def ledger_head_problem(head: SignedHead, records: list[RecordedSpend]) -> str | None:
    """Why the ledger's rows do not extend `head` (rows deleted or rewritten), or None."""
    if len(records) < head.count:
        return (
            f"the ledger holds {len(records)} spend rows but its signed head of"
            f" {head.written_at} counted {head.count}: rows were deleted (truncated)"
        )
    if head.count and spend_hash(records[head.count - 1]) != head.last:
        return (
            f"ledger row {head.count} is not the one its signed head of {head.written_at}"
            " names: rows were deleted and others written in their place"
        )
    return None


def audit_head_problem(head: SignedHead, hashes: list[str]) -> str | None:
    """Why an audit log whose entries hash to `hashes` does not extend `head`, or None."""
    if len(hashes) < head.count:
        return (
            f"the audit log holds {len(hashes)} entries but its signed head of"
            f" {head.written_at} counted {head.count}: its tail was cut"
        )
    if head.count and hashes[head.count - 1] != head.last:
        return (
            f"audit entry {head.count} is not the one its signed head of {head.written_at}"
            " names: entries were removed and others written in their place"
        )
    return None


def cross_check(records: Iterable[RecordedSpend], entries: Iterable[AuditEntry]) -> list[str]:
    """Every spend in the ledger must be in the audit log and the other way round; one
    line per (dataset, run, round) found in only one of them."""
    in_ledger = {(r.dataset, r.run_id, r.round) for r in records}
    in_audit: set[tuple[str, str, int]] = set()
    for entry in entries:
        if entry.event != SPEND_EVENT:
            continue
        details = entry.details
        dataset, run_id = details.get("dataset"), details.get("run_id")
        round_ = details.get("round")
        if isinstance(dataset, str) and isinstance(run_id, str) and isinstance(round_, int):
            in_audit.add((dataset, run_id, round_))
    problems = [
        f"spend of run {run} round {round_} on dataset {dataset} is in the audit log"
        " but not in the ledger (ledger row deleted?)"
        for dataset, run, round_ in sorted(in_audit - in_ledger)
    ]
    problems.extend(
        f"spend of run {run} round {round_} on dataset {dataset} is in the ledger"
        " but not in the audit log (audit entries cut?)"
        for dataset, run, round_ in sorted(in_ledger - in_audit)
    )
    return problems


def write_head(path: Path, head: SignedHead) -> None:
    """Write `head` to `path` atomically (a crash leaves the old head or the new one)."""
    data = json.dumps(head.to_json(), sort_keys=True, indent=1) + "\n"
    write_atomic(path, data.encode(), mode=0o640)


def read_head(path: Path) -> SignedHead | None:
    """The head in `path`; None if the file does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditLogError(f"{path}: the signed head cannot be read ({exc})") from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AuditLogError(f"{path}: the signed head is not JSON ({exc.msg})") from exc
    return SignedHead.from_json(document, str(path))
