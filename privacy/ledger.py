"""The site's privacy ledger: an append-only SQLite file of signed DP spend events.

Epsilon for a dataset composes every event recorded against it, across rounds,
runs and studies. Recording is idempotent on (dataset, run, round): a retried
round never spends twice, and a retry with different parameters is refused.

Every spend row is signed with the site's Ed25519 key, so the site and its privacy
officer can check that no row was edited or deleted (`PrivacyLedger.verify`). The
same file holds the officer's signed approvals (`privacy.approvals`). A row is
committed (WAL, synchronous FULL) before `record` returns, so a crash right after
a spend never loses it.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.privacy import approvals as approvals_table
from medfed.privacy.accountant import epsilon_of
from medfed.privacy.approvals import Approval, SignedApproval
from medfed.privacy.errors import DpConfigError, LedgerError
from medfed.privacy.events import DpSgdEvent
from medfed.privacy.population import POPULATION_SCHEMA, PopulationStore, is_legacy_dataset
from medfed.privacy.signing import SigningKey, VerifyKey, canonical_json

SCHEMA_VERSION = 2
"""`PRAGMA user_version` of a ledger file; 0 with a `spend` table is the unsigned schema 1."""
SPEND_PAYLOAD_SCHEMA = "medfed.privacy.spend/2"

_SPEND_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS spend (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset TEXT NOT NULL,
    study TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    delta REAL NOT NULL,
    recorded_at TEXT NOT NULL,
    key_id TEXT NOT NULL,
    signature TEXT NOT NULL,
    UNIQUE (dataset, run_id, round)
) STRICT""",
    """CREATE TRIGGER IF NOT EXISTS spend_no_update BEFORE UPDATE ON spend
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS spend_no_delete BEFORE DELETE ON spend
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END""",
)
_SPEND_COLUMNS = (
    "seq, dataset, study, run_id, round, noise_multiplier, sample_rate, steps, delta,"
    " recorded_at, key_id, signature"
)


@dataclass(frozen=True, eq=False)
class SpendRecord:
    """One spend: `event` against `dataset` in round `round` of run `run_id` of `study`."""

    dataset: str
    study: str
    run_id: str
    round: int
    event: DpSgdEvent
    delta: float

    def _spend(self) -> tuple[str, str, str, int, DpSgdEvent, float]:
        return (self.dataset, self.study, self.run_id, self.round, self.event, self.delta)

    def __eq__(self, other: object) -> bool:
        """The same spend, whenever and wherever it was written (a `RecordedSpend` equals
        the `SpendRecord` it records)."""
        if not isinstance(other, SpendRecord):
            return NotImplemented
        return self._spend() == other._spend()

    def __hash__(self) -> int:
        return hash(self._spend())


@dataclass(frozen=True, eq=False)
class RecordedSpend(SpendRecord):
    """A spend as the ledger holds it: with its row number and the time it was recorded."""

    seq: int
    recorded_at: dt.datetime


@dataclass(frozen=True)
class LedgerVerification:
    """What `PrivacyLedger.verify` found: rows checked, and (seq, reason) for each bad one."""

    rows_checked: int
    bad: tuple[tuple[int, str], ...]

    @property
    def ok(self) -> bool:
        return not self.bad


def spend_payload(spend: SpendRecord, *, recorded_at: str) -> bytes:
    """The bytes a site signs for `spend`: every field but the row's place in the file."""
    return canonical_json(
        {
            "schema": SPEND_PAYLOAD_SCHEMA,
            "dataset": spend.dataset,
            "study": spend.study,
            "run_id": spend.run_id,
            "round": int(spend.round),
            "noise_multiplier": float(spend.event.noise_multiplier),
            "sample_rate": float(spend.event.sample_rate),
            "steps": int(spend.event.steps),
            "delta": float(spend.delta),
            "recorded_at": recorded_at,
        }
    )


class PrivacyLedger:
    """Signed spend events and officers' approvals of one site, in a SQLite file it owns."""

    def __init__(self, path: Path) -> None:
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as connection:
                self._open_schema(connection)
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{path}: not a readable privacy ledger ({exc})") from exc

    def _open_schema(self, connection: sqlite3.Connection) -> None:
        """Create the schema in a new file, or check that an existing file has this one."""
        connection.execute("BEGIN IMMEDIATE")
        try:
            version = int(connection.execute("PRAGMA user_version").fetchone()[0])
            tables = {
                str(row[0])
                for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if version == 0 and "spend" in tables:
                raise LedgerError(
                    f"{self._path}: an unsigned privacy ledger from an older medfed (schema 1);"
                    " its rows cannot be signed after the fact. Keep it, start a new ledger"
                    " file, and have the privacy officer carry its spend over"
                )
            if version == 0 and tables:
                raise LedgerError(f"{self._path}: a SQLite file, but not a privacy ledger")
            if version > SCHEMA_VERSION:
                raise LedgerError(
                    f"{self._path}: ledger schema {version} is newer than this medfed reads"
                    f" ({SCHEMA_VERSION}); upgrade medfed to open it"
                )
            if version not in (0, SCHEMA_VERSION):
                raise LedgerError(f"{self._path}: ledger schema {version} is not one medfed wrote")
            for statement in (
                *_SPEND_SCHEMA,
                *approvals_table.APPROVALS_SCHEMA,
                *POPULATION_SCHEMA,
            ):
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self._path, timeout=30, isolation_level=None)) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            yield connection

    def records(self, dataset: str | None = None) -> list[RecordedSpend]:
        """All spend records, oldest first, optionally of one dataset."""
        query = f"SELECT {_SPEND_COLUMNS} FROM spend"
        params: tuple[str, ...] = ()
        if dataset is not None:
            query += " WHERE dataset = ?"
            params = (dataset,)
        with self._connect() as connection:
            rows = connection.execute(query + " ORDER BY seq", params).fetchall()
        try:
            return [_spend_of(row) for row in rows]
        except (ValueError, DpConfigError) as exc:
            raise LedgerError(
                f"{self._path}: a spend row is malformed ({exc}); verify the ledger"
            ) from exc

    @property
    def population(self) -> PopulationStore:
        """The privacy units of this ledger: their patients, noised counts and notes."""
        return PopulationStore(self._connect)

    def unit_records(self, unit: str) -> list[RecordedSpend]:
        """Every spend that falls on some patient of privacy unit `unit`: its own, those of
        every unit that covers one of its patients, and any spend an older medfed keyed
        on a data fingerprint (which cannot be traced to patients, so it counts against
        every unit of the site). Oldest first."""
        units = self.population.sharing_patients(unit)
        return [
            record
            for record in self.records()
            if record.dataset in units or is_legacy_dataset(record.dataset)
        ]

    def epsilon(self, dataset: str, *, delta: float) -> float:
        """Epsilon spent so far on `dataset`, composing all its events at `delta`."""
        return epsilon_of((record.event for record in self.records(dataset)), delta=delta)

    def epsilon_after(self, dataset: str, event: DpSgdEvent, *, delta: float) -> float:
        """Epsilon that `dataset` would have after `event`: a dry run that writes nothing."""
        events = [record.event for record in self.records(dataset)]
        return epsilon_of([*events, event], delta=delta)

    def record(self, spend: SpendRecord, *, signer: SigningKey) -> bool:
        """Append `spend`, signed by `signer`; False if this (dataset, run, round) was
        already recorded. The row is durable on disk when this returns.

        A second record of the same (dataset, run, round) with a different study or
        parameters is refused: a round's spend is written once and never changed.
        """
        event = spend.event
        recorded_at = dt.datetime.now(dt.UTC).isoformat()
        signature = signer.sign(spend_payload(spend, recorded_at=recorded_at)).hex()
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                existing = connection.execute(
                    "SELECT study, noise_multiplier, sample_rate, steps, delta FROM spend"
                    " WHERE dataset = ? AND run_id = ? AND round = ?",
                    (spend.dataset, spend.run_id, spend.round),
                ).fetchone()
                if existing is not None:
                    connection.execute("ROLLBACK")
                    if tuple(existing) != (
                        spend.study,
                        event.noise_multiplier,
                        event.sample_rate,
                        event.steps,
                        spend.delta,
                    ):
                        raise LedgerError(
                            f"run {spend.run_id} round {spend.round} on dataset {spend.dataset}"
                            " was already recorded with other parameters"
                        )
                    return False
                connection.execute(
                    f"INSERT INTO spend ({_SPEND_COLUMNS.removeprefix('seq, ')})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        spend.dataset,
                        spend.study,
                        spend.run_id,
                        spend.round,
                        event.noise_multiplier,
                        event.sample_rate,
                        event.steps,
                        spend.delta,
                        recorded_at,
                        signer.public.key_id,
                        signature,
                    ),
                )
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        return True

    def verify(self, public: VerifyKey) -> LedgerVerification:
        """Check every spend row's signature against the site's key `public`, and that no
        row is missing. Deleting the newest rows *and* rewinding SQLite's sequence counter
        is not detectable from the file alone; compare with a count kept elsewhere."""
        with self._connect() as connection:
            rows = connection.execute(f"SELECT {_SPEND_COLUMNS} FROM spend ORDER BY seq").fetchall()
            last = _last_assigned(connection, "spend")
        bad = _sequence_gaps([int(row[0]) for row in rows], last)
        for row in rows:
            reason = _spend_row_problem(row, public)
            if reason is not None:
                bad.append((int(row[0]), reason))
        return LedgerVerification(rows_checked=len(rows), bad=tuple(sorted(bad)))

    def add_approval(self, signed: SignedApproval) -> bool:
        """Append an officer's signed approval; False if the same one is already stored.

        It is stored as given; `approval_for` trusts it only if it verifies."""
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                added = approvals_table.insert_approval(connection, signed)
                connection.execute("COMMIT" if added else "ROLLBACK")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        return added

    def approvals(self) -> list[SignedApproval]:
        """Every well-formed stored approval, oldest first, verified or not; malformed rows
        are reported by `invalid_approvals`."""
        return [signed for _, signed in self._approval_rows() if isinstance(signed, SignedApproval)]

    def approvals_verified(self, officer: VerifyKey) -> list[Approval]:
        """Every stored approval that verifies with `officer`'s key, oldest first."""
        return [
            signed.approval
            for _, signed in self._approval_rows()
            if isinstance(signed, SignedApproval) and signed.problem(officer) is None
        ]

    def approval_for(
        self, study_sha256: str, officer: VerifyKey, *, site_id: str
    ) -> Approval | None:
        """The newest approval of the study with this SHA-256 at `site_id` that verifies
        with `officer`'s key; None if there is none. Rows that do not verify are skipped
        (see `invalid_approvals`)."""
        return approvals_table.newest_valid(
            self._approval_rows(), study_sha256=study_sha256, site_id=site_id, officer=officer
        )

    def invalid_approvals(self, officer: VerifyKey) -> tuple[tuple[int, str], ...]:
        """(seq, reason) for each approval row that does not verify with `officer`'s key
        (malformed, signed by another key, or edited) and for each deleted row."""
        with self._connect() as connection:
            rows = approvals_table.read_approvals(connection)
            last = _last_assigned(connection, "approvals")
        found = _sequence_gaps([seq for seq, _ in rows], last)
        found.extend(approvals_table.problems(rows, officer))
        return tuple(sorted(found))

    def _approval_rows(self) -> list[tuple[int, SignedApproval | str]]:
        with self._connect() as connection:
            return approvals_table.read_approvals(connection)


def _spend_of(row: Sequence[Any]) -> RecordedSpend:
    seq, dataset, study, run_id, round_, noise, rate, steps, delta, recorded_at = row[:10]
    return RecordedSpend(
        dataset=dataset,
        study=study,
        run_id=run_id,
        round=int(round_),
        event=DpSgdEvent(noise_multiplier=float(noise), sample_rate=float(rate), steps=int(steps)),
        delta=float(delta),
        recorded_at=dt.datetime.fromisoformat(recorded_at),
        seq=int(seq),
    )


def _spend_row_problem(row: Sequence[Any], public: VerifyKey) -> str | None:
    key_id, signature = row[10], row[11]
    try:
        payload = spend_payload(_spend_of(row), recorded_at=str(row[9]))
        signature_bytes = bytes.fromhex(str(signature))
    except (ValueError, DpConfigError) as exc:
        return f"row is malformed ({exc})"
    if key_id != public.key_id:
        return f"signed by another key {key_id}"
    if not public.verify(payload, signature_bytes):
        return "signature does not match the row (row edited?)"
    return None


def _last_assigned(connection: sqlite3.Connection, table: str) -> int:
    row = connection.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
    return 0 if row is None else int(row[0])


def _sequence_gaps(seqs: Sequence[int], last_assigned: int) -> list[tuple[int, str]]:
    """(seq, reason) for every break in 1, 2, ...: AUTOINCREMENT never reuses a seq, and a
    rolled-back insert gives its seq back, so a gap means a deleted row."""
    gaps: list[tuple[int, str]] = []
    previous = 0
    for seq in seqs:
        if seq != previous + 1:
            gaps.append((seq, f"sequence gap before seq {seq} (row deleted?)"))
        previous = seq
    if last_assigned > previous:
        gaps.append(
            (
                previous + 1,
                f"sequence gap after seq {previous}: up to seq {last_assigned} missing"
                " (rows deleted?)",
            )
        )
    return gaps
