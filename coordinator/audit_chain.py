"""The coordinator's chain of evidence: a signed, hash-chained audit log of every run.

It reuses the sites' log (`privacy.audit.AuditLog`: canonical JSON lines, each with
the previous line's hash and an Ed25519 signature), so `medfed audit verify` checks
both alike. The coordinator signs with the key `medfed provision` issued
(`<pki>/superlink/coordinator-signing.key`, passed as the run config's
`coordinator-key`), kept apart from the run folder; only its public half is published
in the run folder as `coordinator-signing.pub`. A run without a provisioned key (a
simulation, a test of the round loop) makes one in the run folder, and says so.

After every entry the chain's signed head (entries, last hash: `privacy.heads`) is
kept in the run's checkpoint database, so `verify_chain` sees a tail that was cut
(`run.finished` removed, say), which the chain alone cannot show.

Events (names never change meaning; a new kind of event gets a new name):
`run.started`, `run.resumed`, `round.planned`, `round.waiting`, `site.selected`,
`site.refused`, `update.received`, `update.rejected`, `update.clipped`,
`round.aggregated`, `checkpoint.written`, `run.finished`, `run.failed`,
`secure_aggregation.off`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from medfed.coordinator.checkpoints import CHECKPOINTS_NAME, CheckpointStore
from medfed.coordinator.errors import AuditChainError, CoordinatorError
from medfed.privacy.audit import AuditEntry, AuditLog, verify_audit_log
from medfed.privacy.errors import PrivacyError
from medfed.privacy.heads import SignedHead, audit_head_problem, entry_hash
from medfed.privacy.signing import JsonValue, SigningKey, VerifyKey

log = logging.getLogger(__name__)

AUDIT_NAME = "audit.jsonl"
KEY_NAME = "coordinator-signing.key"
PUBLIC_KEY_NAME = "coordinator-signing.pub"
FINAL_EVENTS = frozenset({"run.finished", "run.failed"})


class CoordinatorAudit:
    """Appends the coordinator's events, signed, to `<run dir>/audit.jsonl`."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log

    @classmethod
    def open(
        cls,
        run_dir: Path,
        *,
        signer: SigningKey | None = None,
        store: CheckpointStore | None = None,
    ) -> CoordinatorAudit:
        """The run folder's chain, signed by `signer` (the provisioned coordinator key; None:
        a key made in the run folder), its head kept in `store` after every entry."""
        try:
            if signer is None:
                signer = _run_folder_key(run_dir)
            _publish(run_dir / PUBLIC_KEY_NAME, signer.public)
        except PrivacyError as exc:
            raise AuditChainError(f"the coordinator's signing key: {exc}") from exc
        on_append = None if store is None else _head_keeper(store, signer)
        return cls(AuditLog(run_dir / AUDIT_NAME, signer, on_append=on_append))

    @property
    def path(self) -> Path:
        return self._log.path

    def record(self, event: str, details: Mapping[str, JsonValue]) -> None:
        """Sign and append one event; it is on disk when this returns."""
        try:
            self._log.append(event, details)
        except (PrivacyError, CoordinatorError) as exc:
            raise AuditChainError(f"audit chain {self._log.path}: {exc}") from exc


def _run_folder_key(run_dir: Path) -> SigningKey:
    key_path = run_dir / KEY_NAME
    log.warning(
        "no provisioned coordinator key: the audit chain is signed by %s in the run folder",
        key_path,
    )
    if key_path.exists():
        return SigningKey.load(key_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    signer = SigningKey.generate()
    signer.save(key_path)
    return signer


def _publish(path: Path, public: VerifyKey) -> None:
    """Write the chain's public key; refuse if the chain is another key's."""
    if path.exists():
        existing = VerifyKey.load(path)
        if existing != public:
            raise AuditChainError(
                f"{path}: this run's chain is signed by key {existing.key_id}, not this"
                f" coordinator's key {public.key_id}; use the key the run started with"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    public.save(path)


def _head_keeper(store: CheckpointStore, signer: SigningKey) -> Callable[[AuditEntry], None]:
    def keep(entry: AuditEntry) -> None:
        previous = store.audit_head()
        if previous is not None and int(previous.get("count", 0)) >= entry.seq:
            log.error(
                "audit entry %d appended, but the chain's signed head counts %s: the chain"
                " was cut; the head is kept",
                entry.seq,
                previous.get("count"),
            )
            return
        head = SignedHead.sign(kind="audit", count=entry.seq, last=entry_hash(entry), signer=signer)
        store.save_audit_head(head.to_json())

    return keep


class NoAudit(CoordinatorAudit):
    """Records nothing: a run without a run folder (tests of the round loop alone)."""

    def __init__(self) -> None:
        pass

    @property
    def path(self) -> Path:
        raise AuditChainError("this run keeps no audit chain (no run-dir)")

    def record(self, event: str, details: Mapping[str, JsonValue]) -> None:
        return None


@dataclass(frozen=True)
class ChainCheck:
    """What `verify_chain` found: entries verified, the first problem (None: all good)."""

    entries_checked: int
    problem: str | None
    last_hash: str
    head_count: int | None
    """The entries the signed head counts (None: no head kept)."""

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify_chain(path: Path, public: VerifyKey, *, finished: bool = False) -> ChainCheck:
    """Check the chain at `path` entry by entry, then against the signed head kept in the
    checkpoint database beside it; with `finished` (the run's results say it ended), the
    last entry must be `run.finished` or `run.failed`."""
    verification = verify_audit_log(path, public)
    count, last = verification.entries_checked, verification.last_hash
    if verification.first_bad is not None:
        line, reason = verification.first_bad
        return ChainCheck(count, f"at entry {line}: {reason}", last, None)
    head_json = None
    database = path.parent / CHECKPOINTS_NAME
    if database.exists():
        try:
            head_json = CheckpointStore(database).audit_head()
        except CoordinatorError as exc:
            return ChainCheck(count, str(exc), last, None)
    entries = AuditLog(path, None).entries()
    problem = None
    head_count = None
    if head_json is not None:
        try:
            head = SignedHead.from_json(head_json, f"{database} audit head")
        except PrivacyError as exc:
            return ChainCheck(count, str(exc), last, None)
        head_count = head.count
        problem = head.signature_problem(public) or audit_head_problem(
            head, [entry_hash(entry) for entry in entries]
        )
    if problem is None and finished and (not entries or entries[-1].event not in FINAL_EVENTS):
        problem = "the run has ended but the chain does not end with run.finished (tail cut?)"
    return ChainCheck(count, problem, last, head_count)
