"""Checkpoints: after each round, everything a run needs to continue, in one SQLite row.

A checkpoint holds the global model and the strategy's optimiser state (numpy's .npz
format, read back with `allow_pickle=False`), the round, the coordinator's RNG state,
the round's plan, the run's results so far and the lineage of the model (rounds,
sites, datasets, epsilon per site, app bundle). Each is written in one transaction,
so a coordinator killed mid-write leaves the previous checkpoint as the last one.
Round 0 is the run's start: its id and initial model, so a run killed in its first
round resumes under the same run id.
"""

from __future__ import annotations

import io
import json
import sqlite3
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.coordinator.errors import CheckpointError
from medfed.model.wire import arrays_sha256

CHECKPOINTS_NAME = "checkpoints.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    round INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    study_sha256 TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    model BLOB NOT NULL,
    strategy_state BLOB NOT NULL,
    state TEXT NOT NULL
)
"""
_HEAD_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    head TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class Checkpoint:
    """The state of a run after `round` (0: at its start).

    `state` is JSON: the RNG state, the round's plan, the results so far and the lineage.
    """

    run_id: str
    round: int
    study_sha256: str
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray]
    state: dict[str, Any]

    @property
    def model_sha256(self) -> str:
        return arrays_sha256(self.arrays)


def _npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    named: dict[str, Any] = {name: np.asarray(array) for name, array in arrays.items()}
    np.savez(buffer, allow_pickle=False, **named)
    return buffer.getvalue()


def _from_npz(data: bytes, what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{what} cannot be read: {exc}") from exc


class CheckpointStore:
    """The checkpoints of one run, in `<run dir>/checkpoints.db`."""

    def __init__(self, path: Path) -> None:
        self._path = path

    @property
    def path(self) -> Path:
        return self._path

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with closing(sqlite3.connect(self._path, timeout=30)) as connection:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=FULL")
                connection.execute(_SCHEMA)
                connection.execute(_HEAD_SCHEMA)
                yield connection
        except sqlite3.Error as exc:
            raise CheckpointError(f"{self._path}: {exc}") from exc

    def save(self, checkpoint: Checkpoint) -> None:
        """Write `checkpoint` in one transaction; a round is written once."""
        state = json.dumps(checkpoint.state, sort_keys=True, allow_nan=False)
        with self._connect() as connection, connection:
            last = connection.execute("SELECT run_id, max(round) FROM checkpoints").fetchone()
            if last[1] is not None and last[0] != checkpoint.run_id:
                raise CheckpointError(f"{self._path} holds run {last[0]}, not {checkpoint.run_id}")
            if last[1] is not None and checkpoint.round <= last[1]:
                raise CheckpointError(
                    f"{self._path}: round {checkpoint.round} is not after the last checkpoint"
                    f" (round {last[1]})"
                )
            connection.execute(
                "INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    checkpoint.round,
                    checkpoint.run_id,
                    checkpoint.study_sha256,
                    checkpoint.model_sha256,
                    _npz(checkpoint.arrays),
                    _npz(checkpoint.strategy_state),
                    state,
                ),
            )

    def rounds(self) -> list[int]:
        """The rounds checkpointed, oldest first (empty if none or no file)."""
        if not self._path.exists():
            return []
        with self._connect() as connection:
            return [
                row[0] for row in connection.execute("SELECT round FROM checkpoints ORDER BY 1")
            ]

    def load(self, round_number: int | None = None) -> Checkpoint | None:
        """The checkpoint of `round_number` (default: the last), or None if there is none.

        The model's digest is checked against the one written with it.
        """
        if not self._path.exists():
            return None
        query = "SELECT * FROM checkpoints " + (
            "ORDER BY round DESC LIMIT 1" if round_number is None else "WHERE round = ?"
        )
        with self._connect() as connection:
            row = connection.execute(query, () if round_number is None else (round_number,))
            found = row.fetchone()
        if found is None:
            return None
        number, run_id, study_sha256, model_sha256, model, strategy_state, state = found
        arrays = _from_npz(model, f"{self._path}: round {number}'s model")
        if arrays_sha256(arrays) != model_sha256:
            raise CheckpointError(
                f"{self._path}: round {number}'s model does not match its digest (corrupted?)"
            )
        try:
            document = json.loads(state)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{self._path}: round {number}'s state is not JSON") from exc
        return Checkpoint(
            run_id=run_id,
            round=number,
            study_sha256=study_sha256,
            arrays=arrays,
            strategy_state=_from_npz(strategy_state, f"{self._path}: round {number}'s state"),
            state=document,
        )

    def save_audit_head(self, head: Mapping[str, Any]) -> None:
        """Keep the audit chain's signed head (`privacy.heads.SignedHead`) beside the
        checkpoints, replacing the one before: `medfed audit verify` and `medfed report`
        compare the chain with it, so a cut tail shows."""
        document = json.dumps(dict(head), sort_keys=True)
        with self._connect() as connection, connection:
            connection.execute("INSERT OR REPLACE INTO audit_head VALUES (1, ?)", (document,))

    def audit_head(self) -> dict[str, Any] | None:
        """The audit chain's signed head as JSON, or None if none was kept."""
        if not self._path.exists():
            return None
        with self._connect() as connection:
            row = connection.execute("SELECT head FROM audit_head WHERE id = 1").fetchone()
        if row is None:
            return None
        try:
            document = json.loads(row[0])
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{self._path}: the audit head is not JSON") from exc
        if not isinstance(document, dict):
            raise CheckpointError(f"{self._path}: the audit head is not a JSON object")
        return document
