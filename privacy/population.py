"""The privacy unit: a site's patient population, and what the ledger keeps about it.

A spend is charged to an officer-declared *privacy unit* (`privacy_unit` in `site.toml`,
per dataset or for the whole site; the site id when none is declared), never to a hash
of the data: a corrected value, a new data version or another study contract spends
from the same budget. The ledger also records which patients each unit covers, as
site-secret keyed digests (HMAC-SHA256 of the patient id under a key derived from the
site's signing key: the ids themselves are never stored, and no one without the site's
key can confirm a candidate id). A unit whose patients overlap another unit's composes
the other unit's spends too, so renaming a unit, or declaring a second one over the
same patients, never starts a fresh budget.

Neighbouring relation: every epsilon medfed accounts is for datasets that differ by
adding or removing one patient (all of one patient's rows). The patient count is
private under that relation: it leaves the site only noised (`NoisyCount`), and the
sampling rate and noise are set from public numbers or that noised count.

The tables live in the ledger's SQLite file and are append-only like the spend table.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import secrets
import sqlite3
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from medfed.privacy.errors import LedgerError
from medfed.privacy.signing import SigningKey

NEIGHBOURING_RELATION = "add-remove-one-patient"
"""The neighbouring relation every epsilon of this ledger is stated for."""
RELATION_TEXT = "add or remove one patient (all of that patient's rows)"

PATIENT_KEY_LABEL = b"medfed.privacy.patient-key/1"
LEGACY_DATASET_CHARS = 64
"""A spend of an older medfed is keyed on a 64-hex data fingerprint, not a unit."""

POPULATION_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS privacy_units (
    unit TEXT PRIMARY KEY,
    relation TEXT NOT NULL,
    declared_at TEXT NOT NULL
) STRICT""",
    """CREATE TABLE IF NOT EXISTS privacy_patients (
    unit TEXT NOT NULL,
    patient_key TEXT NOT NULL,
    first_seen TEXT NOT NULL,
    PRIMARY KEY (unit, patient_key)
) STRICT""",
    """CREATE INDEX IF NOT EXISTS privacy_patients_by_key ON privacy_patients (patient_key)""",
    """CREATE TABLE IF NOT EXISTS privacy_counts (
    unit TEXT NOT NULL,
    population_sha256 TEXT NOT NULL,
    noisy_count REAL NOT NULL,
    noise_std REAL NOT NULL,
    released_at TEXT NOT NULL,
    PRIMARY KEY (unit, population_sha256)
) STRICT""",
    """CREATE TABLE IF NOT EXISTS privacy_notes (
    unit TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    note TEXT NOT NULL,
    PRIMARY KEY (unit, run_id, round)
) STRICT""",
    *(
        f"""CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table}
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END"""
        for table in ("privacy_units", "privacy_patients", "privacy_counts", "privacy_notes")
        for op in ("UPDATE", "DELETE")
    ),
)
"""Statements that create the tables in the ledger file (run by `PrivacyLedger`)."""

Connect = Callable[[], AbstractContextManager[sqlite3.Connection]]


def patient_key_secret(signer: SigningKey) -> bytes:
    """The site's secret for keyed digests, derived from its signing key (never sent)."""
    raw = signer.private_key.private_bytes_raw()
    return hashlib.sha256(PATIENT_KEY_LABEL + raw).digest()


def patient_keys(secret: bytes, patient_ids: Iterable[str]) -> frozenset[str]:
    """HMAC-SHA256 of each patient id under the site's secret, hex."""
    return frozenset(
        hmac.new(secret, pid.encode(), hashlib.sha256).hexdigest() for pid in patient_ids
    )


def population_digest(keys: Iterable[str]) -> str:
    """One digest of a set of patient keys (sorted): a version of the population."""
    digest = hashlib.sha256(b"medfed.privacy.population/1")
    for key in sorted(keys):
        digest.update(key.encode())
    return digest.hexdigest()


def keyed_digest(secret: bytes, value: str) -> str:
    """A site-secret HMAC of `value`: what leaves the site in place of a data fingerprint,
    so nobody without the site's key can confirm a candidate dataset by hashing it."""
    return hmac.new(secret, b"medfed.data-version/1" + value.encode(), hashlib.sha256).hexdigest()


def is_legacy_dataset(name: str) -> bool:
    """A spend row of an older medfed, keyed on a data fingerprint instead of a unit."""
    return len(name) == LEGACY_DATASET_CHARS and all(c in "0123456789abcdef" for c in name)


@dataclass(frozen=True)
class NoisyCount:
    """A unit's patient count as it may leave the site: N plus Gaussian noise of
    standard deviation `noise_std` (sensitivity 1 under add/remove-one), rounded."""

    unit: str
    population_sha256: str
    value: float
    noise_std: float

    @property
    def public(self) -> int:
        """The count to use anywhere it may be seen: the noised count, at least 1."""
        return max(1, round(self.value))


def draw_noisy_count(patients: int, *, noise_std: float) -> float:
    """`patients` plus Gaussian noise from the operating system's random source."""
    if not (math.isfinite(noise_std) and noise_std > 0):
        raise LedgerError(f"the count's noise must be positive, got {noise_std}")
    return patients + secrets.SystemRandom().gauss(0.0, noise_std)


class PopulationStore:
    """The privacy units of one ledger file: their patients, noised counts and notes."""

    def __init__(self, connect: Connect) -> None:
        self._connect = connect

    def register(self, unit: str, keys: Iterable[str]) -> None:
        """Declare `unit` (once) and add the patients `keys` to it (they stay forever)."""
        now = dt.datetime.now(dt.UTC).isoformat()
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.execute(
                    "INSERT OR IGNORE INTO privacy_units VALUES (?, ?, ?)",
                    (unit, NEIGHBOURING_RELATION, now),
                )
                connection.executemany(
                    "INSERT OR IGNORE INTO privacy_patients VALUES (?, ?, ?)",
                    [(unit, key, now) for key in keys],
                )
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

    def units(self) -> dict[str, int]:
        """Every declared unit and how many patients it has ever covered."""
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT u.unit, COUNT(p.patient_key) FROM privacy_units u"
                " LEFT JOIN privacy_patients p ON p.unit = u.unit GROUP BY u.unit ORDER BY u.unit"
            ).fetchall()
        return {str(unit): int(count) for unit, count in rows}

    def relation(self, unit: str) -> str:
        """The neighbouring relation `unit`'s epsilon is stated for."""
        with self._connect() as connection:
            row = connection.execute(
                "SELECT relation FROM privacy_units WHERE unit = ?", (unit,)
            ).fetchone()
        return NEIGHBOURING_RELATION if row is None else str(row[0])

    def sharing_patients(self, unit: str) -> set[str]:
        """`unit` and every other unit that covers one of its patients: their spends
        all fall on some patient of `unit`."""
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT DISTINCT other.unit FROM privacy_patients mine"
                " JOIN privacy_patients other ON other.patient_key = mine.patient_key"
                " WHERE mine.unit = ?",
                (unit,),
            ).fetchall()
        return {unit, *(str(row[0]) for row in rows)}

    def noisy_count(self, unit: str, population_sha256: str) -> NoisyCount | None:
        """The count released for this version of `unit`'s patients; None if none yet."""
        with self._connect() as connection:
            row = connection.execute(
                "SELECT noisy_count, noise_std FROM privacy_counts"
                " WHERE unit = ? AND population_sha256 = ?",
                (unit, population_sha256),
            ).fetchone()
        if row is None:
            return None
        return NoisyCount(unit, population_sha256, float(row[0]), float(row[1]))

    def store_count(self, count: NoisyCount) -> NoisyCount:
        """Keep `count` as the one released for its version; the one kept already wins
        (a count is released once per version, so re-asking never averages noise away)."""
        with self._connect() as connection:
            connection.execute(
                "INSERT OR IGNORE INTO privacy_counts VALUES (?, ?, ?, ?, ?)",
                (
                    count.unit,
                    count.population_sha256,
                    count.value,
                    count.noise_std,
                    dt.datetime.now(dt.UTC).isoformat(),
                ),
            )
        stored = self.noisy_count(count.unit, count.population_sha256)
        if stored is None:
            raise LedgerError(f"the noised count of unit {count.unit} was not stored")
        return stored

    def add_note(self, unit: str, run_id: str, round_: int, note: str) -> None:
        """Attach `note` (e.g. "no guarantee") to a spend of `unit`."""
        with self._connect() as connection:
            connection.execute(
                "INSERT OR IGNORE INTO privacy_notes VALUES (?, ?, ?, ?)",
                (unit, run_id, round_, note),
            )

    def notes(self, unit: str | None = None) -> list[tuple[str, str, int, str]]:
        """(unit, run, round, note) of every note, optionally of one unit."""
        query = "SELECT unit, run_id, round, note FROM privacy_notes"
        params: tuple[str, ...] = ()
        if unit is not None:
            query += " WHERE unit = ?"
            params = (unit,)
        with self._connect() as connection:
            rows = connection.execute(query + " ORDER BY unit, run_id, round", params).fetchall()
        return [(str(u), str(r), int(n), str(t)) for u, r, n, t in rows]
