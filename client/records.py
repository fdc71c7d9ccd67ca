"""The site's privacy records kept honest together: ledger, audit log and their signed heads.

Every spend goes to the ledger and then to the audit log (`PrivacyGate.record`); after
each append a signed head (how many records, the last one's hash) is written to
`<state dir>/heads/`, apart from both files (a site whose records predate heads gets
them at its next append). `check_site_records` then sees what the
files alone cannot: the newest ledger row deleted with SQLite's sequence rewound, or an
audit log whose tail was cut (`privacy.heads`). A head is never moved backwards: a
writer that finds fewer records than its head counts leaves the head as it is, so a cut
followed by new appends still shows.

The privacy gate refuses to train while the records do not check: a deleted spend row
means the dataset's epsilon is under-counted, and privacy is never silently weaker.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medfed.client.config import SiteConfig
from medfed.privacy.audit import AuditEntry, AuditLog
from medfed.privacy.errors import PrivacyError
from medfed.privacy.heads import (
    SPEND_EVENT,
    SignedHead,
    audit_head_problem,
    cross_check,
    entry_hash,
    ledger_head,
    ledger_head_problem,
    read_head,
    write_head,
)
from medfed.privacy.ledger import PrivacyLedger
from medfed.privacy.signing import SigningKey, VerifyKey

log = logging.getLogger(__name__)

HEADS_DIR = "heads"
AUDIT_HEAD_NAME = "audit-head.json"
LEDGER_HEAD_NAME = "ledger-head.json"


def audit_head_path(config: SiteConfig) -> Path:
    return config.state_dir / HEADS_DIR / AUDIT_HEAD_NAME


def ledger_head_path(config: SiteConfig) -> Path:
    return config.state_dir / HEADS_DIR / LEDGER_HEAD_NAME


def site_audit_log(config: SiteConfig, signer: SigningKey) -> AuditLog:
    """The site's audit log, writing its signed head after every append."""
    path = audit_head_path(config)

    def on_append(entry: AuditEntry) -> None:
        previous = _head_or_none(path)
        if previous is not None and previous.count >= entry.seq:
            log.error(
                "%s: entry %d appended, but the signed head counts %d: the log was cut;"
                " the head is kept for the officer to review",
                config.audit_path,
                entry.seq,
                previous.count,
            )
            return
        head = SignedHead.sign(kind="audit", count=entry.seq, last=entry_hash(entry), signer=signer)
        write_head(path, head)

    return AuditLog(config.audit_path, signer, on_append=on_append)


def write_ledger_head(config: SiteConfig, ledger: PrivacyLedger, signer: SigningKey) -> None:
    """Sign the ledger's current head into the state folder (never backwards)."""
    path = ledger_head_path(config)
    records = ledger.records()
    previous = _head_or_none(path)
    if previous is not None and previous.count >= len(records):
        if previous.count > len(records):
            log.error(
                "%s: %d spend rows, but the signed head counts %d: rows were deleted;"
                " the head is kept for the officer to review",
                config.ledger_path,
                len(records),
                previous.count,
            )
        return
    write_head(path, ledger_head(records, signer))


def recover_unaudited_spends(config: SiteConfig, ledger: PrivacyLedger, audit: AuditLog) -> int:
    """Audit spends that reached the ledger but not the log (a crash between the two
    writes), marked `recovered`; how many. Runs when the gate opens."""
    try:
        entries = audit.entries()
    except PrivacyError:
        return 0  # a malformed log is for `check_site_records` to report
    audited = {
        (e.details.get("dataset"), e.details.get("run_id"), e.details.get("round"))
        for e in entries
        if e.event == SPEND_EVENT
    }
    missing = [r for r in ledger.records() if (r.dataset, r.run_id, r.round) not in audited]
    for record in missing:
        audit.append(
            SPEND_EVENT,
            {
                "dataset": record.dataset,
                "study": record.study,
                "run_id": record.run_id,
                "round": record.round,
                "noise_multiplier": record.event.noise_multiplier,
                "sample_rate": record.event.sample_rate,
                "steps": record.event.steps,
                "delta": record.delta,
                "recovered": True,
                "recorded_at": record.recorded_at.isoformat(),
            },
        )
    return len(missing)


def check_site_records(config: SiteConfig, public: VerifyKey) -> list[str]:
    """Every sign that records were deleted: heads not extended, and spends in only one of
    ledger and audit log. Empty when all agree (signatures are checked elsewhere)."""
    problems: list[str] = []
    ledger = PrivacyLedger(config.ledger_path)
    records = ledger.records()
    try:
        entries = AuditLog(config.audit_path, None).entries()
    except PrivacyError as exc:
        return [f"the audit log cannot be read for the cross-check: {exc}"]
    paths = {"ledger": ledger_head_path(config), "audit": audit_head_path(config)}
    for kind, path in paths.items():
        try:
            head = read_head(path)
        except PrivacyError as exc:
            problems.append(str(exc))
            continue
        if head is None:
            # records written before heads existed have none; once one head is written,
            # a missing other one with records to count was deleted
            other = paths["audit" if kind == "ledger" else "ledger"]
            if (records if kind == "ledger" else entries) and other.exists():
                problems.append(f"{path}: no signed {kind} head (deleted?)")
            continue
        problem = head.signature_problem(public)
        if problem is None:
            problem = (
                ledger_head_problem(head, records)
                if kind == "ledger"
                else audit_head_problem(head, [entry_hash(e) for e in entries])
            )
        if problem is not None:
            problems.append(f"{path}: {problem}")
    problems.extend(cross_check(records, entries))
    return problems


def _head_or_none(path: Path) -> SignedHead | None:
    try:
        return read_head(path)
    except PrivacyError:
        return None
