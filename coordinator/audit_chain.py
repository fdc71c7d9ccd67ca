"""The coordinator's chain of evidence: a signed, hash-chained audit log of every run.

It reuses the sites' log (`privacy.audit.AuditLog`: canonical JSON lines, each with
the previous line's hash and an Ed25519 signature), so `medfed audit verify` checks
both alike. The coordinator signs with `coordinator-signing.key` in the run folder
(created, mode 0600, on first use) and publishes `coordinator-signing.pub` beside it.

Events (names never change meaning; a new kind of event gets a new name):
`run.started`, `run.resumed`, `round.planned`, `round.waiting`, `site.selected`,
`site.refused`, `update.received`, `update.rejected`, `update.clipped`,
`round.aggregated`, `checkpoint.written`, `run.finished`, `run.failed`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from medfed.coordinator.errors import AuditChainError
from medfed.privacy.audit import AuditLog
from medfed.privacy.errors import PrivacyError
from medfed.privacy.signing import JsonValue, SigningKey

AUDIT_NAME = "audit.jsonl"
KEY_NAME = "coordinator-signing.key"
PUBLIC_KEY_NAME = "coordinator-signing.pub"


class CoordinatorAudit:
    """Appends the coordinator's events, signed, to `<run dir>/audit.jsonl`."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log

    @classmethod
    def open(cls, run_dir: Path) -> CoordinatorAudit:
        """The run folder's chain, with its signing key (made on first use)."""
        key_path, public_path = run_dir / KEY_NAME, run_dir / PUBLIC_KEY_NAME
        try:
            if key_path.exists():
                signer = SigningKey.load(key_path)
            else:
                run_dir.mkdir(parents=True, exist_ok=True)
                signer = SigningKey.generate()
                signer.save(key_path)
            if not public_path.exists():
                signer.public.save(public_path)
        except PrivacyError as exc:
            raise AuditChainError(f"the coordinator's signing key: {exc}") from exc
        return cls(AuditLog(run_dir / AUDIT_NAME, signer))

    @property
    def path(self) -> Path:
        return self._log.path

    def record(self, event: str, details: Mapping[str, JsonValue]) -> None:
        """Sign and append one event; it is on disk when this returns."""
        try:
            self._log.append(event, details)
        except PrivacyError as exc:
            raise AuditChainError(f"audit chain {self._log.path}: {exc}") from exc


class NoAudit(CoordinatorAudit):
    """Records nothing: a run without a run folder (tests of the round loop alone)."""

    def __init__(self) -> None:
        pass

    @property
    def path(self) -> Path:
        raise AuditChainError("this run keeps no audit chain (no run-dir)")

    def record(self, event: str, details: Mapping[str, JsonValue]) -> None:
        return None
