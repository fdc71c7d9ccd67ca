"""An audit log: a hash chain of signed JSON lines, one per event, that shows any edit.

Each line is `canonical_json` of {seq, time, actor, event, details, prev, signature}:
`seq` counts from 1, `actor` is the signer's key id, `prev` is the SHA-256 (hex) of the
previous line's bytes without its newline ("0" * 64 for the first), and `signature` is
the actor's Ed25519 signature of `canonical_json` of the other six fields. Editing,
deleting, inserting or reordering a line breaks a signature, a seq or a prev, and
`verify_audit_log` names the first line where that shows. Removing the newest lines
leaves a valid shorter chain: anchor `AuditVerification.last_hash` elsewhere to see it.

Appends hold an exclusive `flock` on the file, so processes never interleave, and
are fsynced before `append` returns. A crash mid-write can leave a torn last line
(no newline). The next append moves those bytes to `<log>.torn`, truncates them, and
appends a signed `audit.torn_tail_removed` entry with their offset, length and SHA-256
before its own entry. Refusing to append instead would stop a site that was merely
killed at the wrong moment; truncating silently would let a torn (or tampered) tail
vanish without a trace. This way the chain of complete entries stays valid, the
bytes are kept, and the removal itself is signed into the chain for review.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from medfed.common import fsync_directory
from medfed.privacy.errors import AuditLogError, SigningError
from medfed.privacy.signing import (
    KEY_ID_HEX_CHARS,
    SIGNATURE_HEX_CHARS,
    JsonValue,
    SigningKey,
    VerifyKey,
    canonical_json,
    parse_canonical_json,
)

GENESIS_PREV = "0" * 64
"""The `prev` of the first entry."""
TORN_TAIL_EVENT = "audit.torn_tail_removed"
TORN_SUFFIX = ".torn"
_FIELDS = frozenset({"seq", "time", "actor", "event", "details", "prev", "signature"})
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(rf"[0-9a-f]{{{KEY_ID_HEX_CHARS}}}")
_SIGNATURE = re.compile(rf"[0-9a-f]{{{SIGNATURE_HEX_CHARS}}}")
_CHUNK = 1 << 16


@dataclass(frozen=True)
class AuditEntry:
    """One line of the log."""

    seq: int
    time: str
    actor: str
    event: str
    details: Mapping[str, JsonValue]
    prev: str
    signature: str

    def signed_payload(self) -> bytes:
        """The bytes `signature` covers: every field but the signature."""
        return canonical_json(
            {
                "seq": self.seq,
                "time": self.time,
                "actor": self.actor,
                "event": self.event,
                "details": self.details,
                "prev": self.prev,
            }
        )

    def line(self) -> bytes:
        """The entry as written, without the newline."""
        return canonical_json(
            {
                "seq": self.seq,
                "time": self.time,
                "actor": self.actor,
                "event": self.event,
                "details": self.details,
                "prev": self.prev,
                "signature": self.signature,
            }
        )


@dataclass(frozen=True)
class AuditVerification:
    """What `verify_audit_log` found.

    `entries_checked` counts the entries that verified before the first bad one (all of
    them when `first_bad` is None); `first_bad` is (1-based line number, reason);
    `last_hash` is the `prev` the next entry after the verified ones would carry.
    """

    entries_checked: int
    first_bad: tuple[int, str] | None
    last_hash: str

    @property
    def ok(self) -> bool:
        return self.first_bad is None


class AuditLog:
    """An append-only, signed, hash-chained JSON-lines log at `path`.

    With `signer` None the log can only be read.
    """

    def __init__(self, path: Path, signer: SigningKey | None) -> None:
        self._path = path
        self._signer = signer

    @property
    def path(self) -> Path:
        return self._path

    def append(self, event: str, details: Mapping[str, JsonValue]) -> AuditEntry:
        """Sign and append one entry; it is on disk when this returns."""
        if self._signer is None:
            raise AuditLogError(f"{self._path}: opened without a signing key; it can only be read")
        if not isinstance(event, str) or not event:
            raise AuditLogError(f"event must be a non-empty string, got {event!r}")
        try:
            canonical_json(details)
        except SigningError as exc:
            raise AuditLogError(f"details of {event!r} cannot be written: {exc}") from exc
        self._path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise AuditLogError(f"{self._path}: cannot be opened ({exc.strerror})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last_line, complete_end, size = _tail(fd)
            if size == 0:
                fsync_directory(self._path.parent)
            if complete_end < size:
                torn = self._set_aside_torn_tail(fd, complete_end, size)
                last_line = self._write(fd, self._signer, last_line, TORN_TAIL_EVENT, torn).line()
            return self._write(fd, self._signer, last_line, event, details)
        finally:
            os.close(fd)  # releases the lock

    def entries(self) -> list[AuditEntry]:
        """Every complete entry, oldest first, parsed but not verified; a malformed line
        raises `AuditLogError` (use `verify_audit_log` to check a log)."""
        entries = []
        for number, line in enumerate(_complete_lines(_read(self._path, missing_ok=True)), 1):
            try:
                entries.append(_parse(line))
            except _Malformed as exc:
                raise AuditLogError(f"{self._path}: line {number}: {exc}") from exc
        return entries

    def _write(
        self,
        fd: int,
        signer: SigningKey,
        last_line: bytes | None,
        event: str,
        details: Mapping[str, JsonValue],
    ) -> AuditEntry:
        if last_line is None:
            seq, prev = 1, GENESIS_PREV
        else:
            try:
                seq, prev = _parse(last_line).seq + 1, _sha256(last_line)
            except _Malformed as exc:
                raise AuditLogError(
                    f"{self._path}: the last entry is malformed ({exc}); refusing to append"
                    " after it. Run the audit verifier and have the log reviewed"
                ) from exc
        unsigned = AuditEntry(
            seq=seq,
            time=dt.datetime.now(dt.UTC).isoformat(),
            actor=signer.public.key_id,
            event=event,
            details=details,
            prev=prev,
            signature="",
        )
        signature = signer.sign(unsigned.signed_payload()).hex()
        entry = replace(unsigned, signature=signature)
        _write_all(fd, entry.line() + b"\n")
        os.fsync(fd)
        return entry

    def _set_aside_torn_tail(self, fd: int, start: int, end: int) -> dict[str, JsonValue]:
        """Copy the torn bytes to the side file (durably), then cut them from the log."""
        torn = os.pread(fd, end - start, start)
        side = self._path.with_name(self._path.name + TORN_SUFFIX)
        side_fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            side_offset = os.fstat(side_fd).st_size
            _write_all(side_fd, torn)
            os.fsync(side_fd)
        finally:
            os.close(side_fd)
        fsync_directory(side.parent)
        os.ftruncate(fd, start)
        os.fsync(fd)
        return {
            "offset": start,
            "length": len(torn),
            "sha256": _sha256(torn),
            "kept_in": side.name,
            "kept_at_offset": side_offset,
        }


def verify_audit_log(path: Path, public: VerifyKey) -> AuditVerification:
    """Check every line of the log at `path` against the actor key `public`, and name the
    first line that is malformed, signed by another key, badly signed, out of sequence,
    or not chained to the line before it."""
    data = _read(path, missing_ok=False)
    lines = data.split(b"\n")
    torn = lines.pop() != b""  # the text after the last newline
    if torn:
        lines.append(data.rsplit(b"\n", 1)[-1])
    prev = GENESIS_PREV
    for number, line in enumerate(lines, 1):
        if torn and number == len(lines):
            reason: str | None = "incomplete last line (crash mid-write, or cut?)"
        else:
            reason = _problem(line, number, prev, public)
        if reason is not None:
            return AuditVerification(number - 1, (number, reason), prev)
        prev = _sha256(line)
    return AuditVerification(len(lines), None, prev)


class _Malformed(Exception):
    pass


def _problem(line: bytes, number: int, prev: str, public: VerifyKey) -> str | None:
    try:
        entry = _parse(line)
    except _Malformed as exc:
        return str(exc)
    if entry.actor != public.key_id:
        return f"signed by another key {entry.actor}"
    if not public.verify(entry.signed_payload(), bytes.fromhex(entry.signature)):
        return "bad signature (entry edited?)"
    if entry.seq != number:
        return f"seq is {entry.seq}, expected {number} (an entry deleted, copied or reordered?)"
    if entry.prev != prev:
        return "prev is not the hash of the line before (an entry deleted or reordered?)"
    return None


def _parse(line: bytes) -> AuditEntry:
    if not line:
        raise _Malformed("empty line")
    try:
        value = parse_canonical_json(line)
    except SigningError as exc:
        raise _Malformed(f"malformed JSON: {exc}") from exc
    if not isinstance(value, dict) or set(value) != _FIELDS:
        raise _Malformed(f"not an audit entry: it must hold exactly {sorted(_FIELDS)}")
    fields: dict[str, Any] = value
    checks = {
        "seq": isinstance(fields["seq"], int)
        and not isinstance(fields["seq"], bool)
        and fields["seq"] >= 1,
        "time": isinstance(fields["time"], str),
        "actor": isinstance(fields["actor"], str) and bool(_KEY_ID.fullmatch(fields["actor"])),
        "event": isinstance(fields["event"], str) and bool(fields["event"]),
        "details": isinstance(fields["details"], dict),
        "prev": isinstance(fields["prev"], str) and bool(_SHA256_HEX.fullmatch(fields["prev"])),
        "signature": isinstance(fields["signature"], str)
        and bool(_SIGNATURE.fullmatch(fields["signature"])),
    }
    wrong = [name for name, good in checks.items() if not good]
    if wrong:
        raise _Malformed(f"malformed entry: bad {', '.join(wrong)}")
    return AuditEntry(**fields)


def _tail(fd: int) -> tuple[bytes | None, int, int]:
    """(the last complete line without its newline, or None; where the complete lines
    end; the file's size). Reads backwards only as far as it needs to."""
    size = os.fstat(fd).st_size
    buffer, start = b"", size
    while start > 0:
        step = min(_CHUNK, start)
        start -= step
        buffer = os.pread(fd, step, start) + buffer
        if buffer.count(b"\n", 0, buffer.rfind(b"\n") + 1) >= 2:
            break
    last_newline = buffer.rfind(b"\n")
    if last_newline < 0:
        return None, 0, size
    line_start = buffer.rfind(b"\n", 0, last_newline) + 1
    return buffer[line_start:last_newline], start + last_newline + 1, size


def _complete_lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")[:-1]


def _read(path: Path, *, missing_ok: bool) -> bytes:
    """The whole log, read under a shared lock so no append is seen half-written."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        if missing_ok:
            return b""
        raise AuditLogError(f"{path}: no such audit log") from exc
    except OSError as exc:
        raise AuditLogError(f"{path}: cannot be read ({exc.strerror})") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise AuditLogError(f"{path}: cannot be read ({exc.strerror})") from exc
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
