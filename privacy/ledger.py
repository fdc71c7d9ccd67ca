"""The site's privacy ledger: an append-only SQLite table of DP spend events.

Epsilon for a dataset composes every event recorded against it, across rounds,
runs and studies. Recording is idempotent on (dataset, run, round): a retried
round never spends twice, and a retry with different parameters is refused.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from privacy.accountant import epsilon_of
from privacy.errors import LedgerError
from privacy.events import DpSgdEvent

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
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
    UNIQUE (dataset, run_id, round)
);
CREATE TRIGGER IF NOT EXISTS spend_no_update BEFORE UPDATE ON spend
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS spend_no_delete BEFORE DELETE ON spend
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
"""


@dataclass(frozen=True)
class SpendRecord:
    """One row of the ledger."""

    dataset: str
    study: str
    run_id: str
    round: int
    event: DpSgdEvent
    delta: float


class PrivacyLedger:
    """Spend events of one site, in a SQLite file that the site owns."""

    def __init__(self, path: Path) -> None:
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as connection:
                connection.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{path}: not a readable privacy ledger ({exc})") from exc

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self._path, timeout=30, isolation_level=None)) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            yield connection

    def records(self, dataset: str | None = None) -> list[SpendRecord]:
        """All spend records, oldest first, optionally of one dataset."""
        query = (
            "SELECT dataset, study, run_id, round, noise_multiplier, sample_rate, steps, delta"
            " FROM spend"
        )
        params: tuple[str, ...] = ()
        if dataset is not None:
            query += " WHERE dataset = ?"
            params = (dataset,)
        with self._connect() as connection:
            rows = connection.execute(query + " ORDER BY seq", params).fetchall()
        return [
            SpendRecord(
                dataset=row[0],
                study=row[1],
                run_id=row[2],
                round=int(row[3]),
                event=DpSgdEvent(
                    noise_multiplier=float(row[4]), sample_rate=float(row[5]), steps=int(row[6])
                ),
                delta=float(row[7]),
            )
            for row in rows
        ]

    def epsilon(self, dataset: str, *, delta: float) -> float:
        """Epsilon spent so far on `dataset`, composing all its events at `delta`."""
        return epsilon_of((record.event for record in self.records(dataset)), delta=delta)

    def epsilon_after(self, dataset: str, event: DpSgdEvent, *, delta: float) -> float:
        """Epsilon that `dataset` would have after `event`: a dry run that writes nothing."""
        events = [record.event for record in self.records(dataset)]
        return epsilon_of([*events, event], delta=delta)

    def record(self, spend: SpendRecord) -> bool:
        """Append `spend`; return False if this (dataset, run, round) was already recorded.

        A second record of the same (dataset, run, round) with different parameters
        is refused: a round's spend is written once and never changed.
        """
        event = spend.event
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                existing = connection.execute(
                    "SELECT noise_multiplier, sample_rate, steps, delta FROM spend"
                    " WHERE dataset = ? AND run_id = ? AND round = ?",
                    (spend.dataset, spend.run_id, spend.round),
                ).fetchone()
                if existing is not None:
                    connection.execute("ROLLBACK")
                    if tuple(existing) != (
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
                    "INSERT INTO spend (dataset, study, run_id, round, noise_multiplier,"
                    " sample_rate, steps, delta, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        spend.dataset,
                        spend.study,
                        spend.run_id,
                        spend.round,
                        event.noise_multiplier,
                        event.sample_rate,
                        event.steps,
                        spend.delta,
                        dt.datetime.now(dt.UTC).isoformat(),
                    ),
                )
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        return True
