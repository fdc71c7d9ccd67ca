"""The signed, append-only privacy ledger: idempotence, refusals, dry runs, composition,
signatures checked with `cryptography`, tamper detection, schema versions and crashes."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medfed.privacy.accountant import epsilon_of
from medfed.privacy.errors import LedgerError
from medfed.privacy.events import DpSgdEvent
from medfed.privacy.ledger import (
    SCHEMA_VERSION,
    LedgerVerification,
    PrivacyLedger,
    RecordedSpend,
    SpendRecord,
)
from medfed.privacy.signing import SigningKey
from tests.conftest import TEST_TAG_VARIABLE

DELTA = 1e-5
EVENT = DpSgdEvent(noise_multiplier=1.1, sample_rate=0.05, steps=40)
REPO_ROOT = Path(__file__).resolve().parents[3]


def spend(
    *,
    dataset: str = "cohort-a",
    study: str = "study-1",
    run_id: str = "run-1",
    round: int = 1,
    event: DpSgdEvent = EVENT,
    delta: float = DELTA,
) -> SpendRecord:
    return SpendRecord(
        dataset=dataset, study=study, run_id=run_id, round=round, event=event, delta=delta
    )


def row_count(path: Path) -> int:
    with sqlite3.connect(path) as connection:
        count: int = connection.execute("SELECT COUNT(*) FROM spend").fetchone()[0]
    connection.close()
    return count


def tamper(path: Path, *statements: str) -> None:
    """Do what an attacker with write access to the file could: drop the triggers first."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        for trigger in ("spend_no_update", "spend_no_delete"):
            connection.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        for statement in statements:
            connection.execute(statement)
    finally:
        connection.close()


@pytest.fixture(scope="module")
def signer() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "site" / "ledger.sqlite"


@pytest.fixture
def ledger(ledger_path: Path) -> PrivacyLedger:
    return PrivacyLedger(ledger_path)


def test_new_ledger_is_empty_and_spends_nothing(ledger: PrivacyLedger, ledger_path: Path) -> None:
    assert ledger_path.exists()
    assert ledger.records() == []
    assert ledger.epsilon("cohort-a", delta=DELTA) == 0.0
    with sqlite3.connect(ledger_path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    connection.close()


def test_record_round_trips(ledger: PrivacyLedger, signer: SigningKey) -> None:
    record = spend()
    before = dt.datetime.now(dt.UTC)
    assert ledger.record(record, signer=signer) is True
    assert ledger.records() == [record]
    (stored,) = ledger.records()
    assert isinstance(stored, RecordedSpend)
    assert stored == record and hash(stored) == hash(record)
    assert stored != spend(round=2)
    assert stored.study == "study-1"
    assert stored.seq == 1
    assert stored.recorded_at is not None
    assert stored.recorded_at.utcoffset() == dt.timedelta(0)
    assert before <= stored.recorded_at <= dt.datetime.now(dt.UTC)
    assert ledger.epsilon("cohort-a", delta=DELTA) == pytest.approx(
        epsilon_of([EVENT], delta=DELTA)
    )


def test_record_requires_a_signer(ledger: PrivacyLedger) -> None:
    with pytest.raises(TypeError, match="signer"):
        ledger.record(spend())  # type: ignore[call-arg]
    assert ledger.records() == []


def test_row_signature_verifies_with_cryptography_directly(
    ledger: PrivacyLedger, ledger_path: Path, signer: SigningKey
) -> None:
    ledger.record(spend(round=7), signer=signer)
    with sqlite3.connect(ledger_path) as connection:
        connection.row_factory = sqlite3.Row
        row = connection.execute("SELECT * FROM spend").fetchone()
    connection.close()
    payload = json.dumps(
        {
            "schema": "medfed.privacy.spend/2",
            "dataset": "cohort-a",
            "study": "study-1",
            "run_id": "run-1",
            "round": 7,
            "noise_multiplier": 1.1,
            "sample_rate": 0.05,
            "steps": 40,
            "delta": DELTA,
            "recorded_at": row["recorded_at"],
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode("utf-8")
    assert row["key_id"] == signer.public.key_id
    Ed25519PublicKey.from_public_bytes(signer.public.raw).verify(
        bytes.fromhex(row["signature"]), payload
    )


def test_identical_re_record_is_idempotent(
    ledger: PrivacyLedger, ledger_path: Path, signer: SigningKey
) -> None:
    assert ledger.record(spend(), signer=signer) is True
    before = ledger.epsilon("cohort-a", delta=DELTA)
    assert ledger.record(spend(), signer=signer) is False
    assert ledger.epsilon("cohort-a", delta=DELTA) == before
    assert row_count(ledger_path) == 1


@pytest.mark.parametrize(
    "changed",
    [
        {"event": DpSgdEvent(noise_multiplier=1.2, sample_rate=0.05, steps=40)},
        {"event": DpSgdEvent(noise_multiplier=1.1, sample_rate=0.06, steps=40)},
        {"event": DpSgdEvent(noise_multiplier=1.1, sample_rate=0.05, steps=41)},
        {"delta": 1e-6},
        {"study": "study-2"},
    ],
)
def test_conflicting_re_record_is_refused_and_writes_nothing(
    ledger: PrivacyLedger, ledger_path: Path, signer: SigningKey, changed: dict[str, object]
) -> None:
    ledger.record(spend(), signer=signer)
    before = ledger.records()
    with pytest.raises(LedgerError, match="already recorded with other parameters"):
        ledger.record(spend(**changed), signer=signer)  # type: ignore[arg-type]
    assert ledger.records() == before
    assert row_count(ledger_path) == 1


def test_epsilon_grows_with_every_round(ledger: PrivacyLedger, signer: SigningKey) -> None:
    epsilons = [ledger.epsilon("cohort-a", delta=DELTA)]
    for round_ in range(1, 6):
        ledger.record(spend(round=round_), signer=signer)
        epsilons.append(ledger.epsilon("cohort-a", delta=DELTA))
    assert all(later > earlier for earlier, later in itertools.pairwise(epsilons))
    assert epsilons[-1] == pytest.approx(epsilon_of([EVENT] * 5, delta=DELTA))


def test_epsilon_after_is_a_dry_run(
    ledger: PrivacyLedger, ledger_path: Path, signer: SigningKey
) -> None:
    ledger.record(spend(round=1), signer=signer)
    projected = ledger.epsilon_after("cohort-a", EVENT, delta=DELTA)
    assert row_count(ledger_path) == 1
    assert len(ledger.records()) == 1
    assert projected == pytest.approx(epsilon_of([EVENT, EVENT], delta=DELTA))
    assert projected > ledger.epsilon("cohort-a", delta=DELTA)
    ledger.record(spend(round=2), signer=signer)
    assert ledger.epsilon("cohort-a", delta=DELTA) == pytest.approx(projected)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE spend SET steps = 1",
        "UPDATE spend SET noise_multiplier = 100.0 WHERE round = 1",
        "DELETE FROM spend",
        "DELETE FROM spend WHERE round = 1",
    ],
)
def test_raw_update_and_delete_are_refused(
    ledger: PrivacyLedger, ledger_path: Path, signer: SigningKey, statement: str
) -> None:
    ledger.record(spend(), signer=signer)
    before = ledger.records()
    connection = sqlite3.connect(ledger_path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            connection.execute(statement)
        connection.rollback()
    finally:
        connection.close()
    assert ledger.records() == before


def test_garbage_file_is_refused_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"this is not a database, just some text " * 200)
    with pytest.raises(LedgerError) as info:
        PrivacyLedger(path)
    assert str(path) in str(info.value)


def test_reopening_keeps_the_history(
    ledger: PrivacyLedger, ledger_path: Path, signer: SigningKey
) -> None:
    ledger.record(spend(round=1), signer=signer)
    ledger.record(spend(round=2), signer=signer)
    reopened = PrivacyLedger(ledger_path)
    assert reopened.records() == ledger.records()
    assert [r.recorded_at for r in reopened.records()] == [r.recorded_at for r in ledger.records()]
    assert reopened.record(spend(round=2), signer=signer) is False
    assert reopened.verify(signer.public).ok


def test_events_across_studies_and_runs_compose(ledger: PrivacyLedger, signer: SigningKey) -> None:
    other = DpSgdEvent(noise_multiplier=2.0, sample_rate=0.1, steps=25)
    ledger.record(spend(study="study-1", run_id="run-1", round=1), signer=signer)
    ledger.record(spend(study="study-1", run_id="run-2", round=1), signer=signer)
    ledger.record(spend(study="study-2", run_id="run-9", round=1, event=other), signer=signer)
    ledger.record(spend(dataset="cohort-b", run_id="run-1", round=1, event=other), signer=signer)
    assert ledger.epsilon("cohort-a", delta=DELTA) == pytest.approx(
        epsilon_of([EVENT, EVENT, other], delta=DELTA)
    )
    assert ledger.epsilon("cohort-b", delta=DELTA) == pytest.approx(
        epsilon_of([other], delta=DELTA)
    )
    assert [r.run_id for r in ledger.records("cohort-a")] == ["run-1", "run-2", "run-9"]
    assert [r.study for r in ledger.records("cohort-a")] == ["study-1", "study-1", "study-2"]
    assert len(ledger.records()) == 4


def test_same_run_and_round_on_two_datasets_are_two_spends(
    ledger: PrivacyLedger, signer: SigningKey
) -> None:
    assert ledger.record(spend(dataset="cohort-a"), signer=signer) is True
    assert ledger.record(spend(dataset="cohort-b"), signer=signer) is True
    assert ledger.epsilon("cohort-b", delta=DELTA) > 0


# Verification: every row signed, no row edited or deleted.


def filled(ledger: PrivacyLedger, signer: SigningKey, rounds: int = 4) -> PrivacyLedger:
    for round_ in range(1, rounds + 1):
        ledger.record(spend(round=round_), signer=signer)
    return ledger


def test_clean_ledger_verifies(ledger: PrivacyLedger, signer: SigningKey) -> None:
    assert ledger.verify(signer.public) == LedgerVerification(rows_checked=0, bad=())
    filled(ledger, signer)
    result = ledger.verify(signer.public)
    assert result == LedgerVerification(rows_checked=4, bad=())
    assert result.ok


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE spend SET noise_multiplier = 100.0 WHERE seq = 2",
        "UPDATE spend SET steps = 1 WHERE seq = 2",
        "UPDATE spend SET study = 'other' WHERE seq = 2",
        "UPDATE spend SET recorded_at = '2020-01-01T00:00:00+00:00' WHERE seq = 2",
        "UPDATE spend SET signature = (SELECT signature FROM spend WHERE seq = 1) WHERE seq = 2",
    ],
)
def test_an_edited_row_is_named(
    ledger: PrivacyLedger, ledger_path: Path, signer: SigningKey, statement: str
) -> None:
    filled(ledger, signer)
    tamper(ledger_path, statement)
    assert PrivacyLedger(ledger_path).verify(signer.public) == LedgerVerification(
        rows_checked=4, bad=((2, "signature does not match the row (row edited?)"),)
    )


def test_a_deleted_row_is_named(
    ledger: PrivacyLedger, ledger_path: Path, signer: SigningKey
) -> None:
    filled(ledger, signer)
    tamper(ledger_path, "DELETE FROM spend WHERE seq = 3")
    result = ledger.verify(signer.public)
    assert result.rows_checked == 3
    assert result.bad == ((4, "sequence gap before seq 4 (row deleted?)"),)


def test_deleted_newest_rows_are_named(
    ledger: PrivacyLedger, ledger_path: Path, signer: SigningKey
) -> None:
    filled(ledger, signer)
    tamper(ledger_path, "DELETE FROM spend WHERE seq >= 3")
    (bad,) = ledger.verify(signer.public).bad
    assert bad[0] == 3
    assert "after seq 2" in bad[1]
    assert "up to seq 4 missing" in bad[1]


def test_rows_signed_by_another_key_are_named(
    ledger: PrivacyLedger, ledger_path: Path, signer: SigningKey
) -> None:
    intruder = SigningKey.generate()
    ledger.record(spend(round=1), signer=signer)
    ledger.record(spend(round=2), signer=intruder)
    assert ledger.verify(signer.public).bad == (
        (2, f"signed by another key {intruder.public.key_id}"),
    )
    # Claiming the site's key id does not help: the signature is still the intruder's.
    tamper(ledger_path, f"UPDATE spend SET key_id = '{signer.public.key_id}' WHERE seq = 2")
    assert ledger.verify(signer.public).bad == (
        (2, "signature does not match the row (row edited?)"),
    )


def test_a_row_with_values_out_of_range_is_reported_not_raised(
    ledger: PrivacyLedger, ledger_path: Path, signer: SigningKey
) -> None:
    filled(ledger, signer, rounds=2)
    tamper(ledger_path, "UPDATE spend SET sample_rate = 7.0 WHERE seq = 1")
    ((seq, reason),) = ledger.verify(signer.public).bad
    assert seq == 1
    assert reason.startswith("row is malformed")


# Schema versions.


def test_a_newer_schema_is_refused(ledger_path: Path, signer: SigningKey) -> None:
    filled(PrivacyLedger(ledger_path), signer, rounds=1)
    tamper(ledger_path, "PRAGMA user_version = 3")
    with pytest.raises(
        LedgerError, match=r"schema 3 is newer than this medfed reads \(2\); upgrade medfed"
    ) as info:
        PrivacyLedger(ledger_path)
    assert str(ledger_path) in str(info.value)


def test_an_unknown_older_schema_is_refused(ledger_path: Path) -> None:
    PrivacyLedger(ledger_path)
    tamper(ledger_path, "PRAGMA user_version = 1")
    with pytest.raises(LedgerError, match="schema 1 is not one medfed wrote"):
        PrivacyLedger(ledger_path)


def test_the_old_unsigned_schema_is_refused(ledger_path: Path) -> None:
    ledger_path.parent.mkdir(parents=True)
    connection = sqlite3.connect(ledger_path)
    with connection:
        connection.execute(
            "CREATE TABLE spend (seq INTEGER PRIMARY KEY AUTOINCREMENT, dataset TEXT NOT NULL,"
            " study TEXT NOT NULL, run_id TEXT NOT NULL, round INTEGER NOT NULL,"
            " noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, steps INTEGER NOT NULL,"
            " delta REAL NOT NULL, recorded_at TEXT NOT NULL, UNIQUE (dataset, run_id, round))"
        )
        connection.execute(
            "INSERT INTO spend (dataset, study, run_id, round, noise_multiplier, sample_rate,"
            " steps, delta, recorded_at) VALUES ('a', 's', 'r', 1, 1.1, 0.05, 40, 1e-5, 'now')"
        )
    connection.close()
    with pytest.raises(LedgerError, match="unsigned privacy ledger from an older medfed") as info:
        PrivacyLedger(ledger_path)
    assert str(ledger_path) in str(info.value)
    assert row_count(ledger_path) == 1  # refused without touching it


def test_another_sqlite_file_is_refused(ledger_path: Path) -> None:
    ledger_path.parent.mkdir(parents=True)
    connection = sqlite3.connect(ledger_path)
    with connection:
        connection.execute("CREATE TABLE patients (id INTEGER)")
    connection.close()
    with pytest.raises(LedgerError, match="not a privacy ledger"):
        PrivacyLedger(ledger_path)


# Crashes: a row is on disk when record() returns, and a kill never leaves half a row.

_RECORD_THEN_EXIT = """
import os, sys
from pathlib import Path
from medfed.privacy.events import DpSgdEvent
from medfed.privacy.ledger import PrivacyLedger, SpendRecord
from medfed.privacy.signing import SigningKey

ledger = PrivacyLedger(Path(sys.argv[1]))
signer = SigningKey.load(Path(sys.argv[2]))
event = DpSgdEvent(noise_multiplier=1.1, sample_rate=0.05, steps=40)
rounds = range(1, 100_000) if sys.argv[3] == "many" else [1]
for round_ in rounds:
    ledger.record(
        SpendRecord(dataset="cohort-a", study="study-1", run_id="run-1", round=round_,
                    event=event, delta=1e-5),
        signer=signer,
    )
    print(round_, flush=True)
os._exit(0)  # as if killed between the spend and sending the update
"""


def child(ledger_path: Path, key_path: Path, mode: str, tag: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _RECORD_THEN_EXIT, str(ledger_path), str(key_path), mode],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), TEST_TAG_VARIABLE: tag},
        stdout=subprocess.PIPE,
        text=True,
    )


def integrity(path: Path) -> str:
    connection = sqlite3.connect(path)
    try:
        result: str = connection.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        connection.close()
    return result


def test_a_spend_survives_an_exit_right_after_record(
    ledger_path: Path, signer: SigningKey, tmp_path: Path, process_tag: str
) -> None:
    key_path = tmp_path / "site.key"
    signer.save(key_path)
    process = child(ledger_path, key_path, "one", process_tag)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0
    assert out.split() == ["1"]
    reopened = PrivacyLedger(ledger_path)
    assert reopened.records() == [spend(round=1)]
    assert reopened.verify(signer.public) == LedgerVerification(rows_checked=1, bad=())
    assert integrity(ledger_path) == "ok"


def test_sigkill_in_the_middle_of_recording_leaves_only_whole_signed_rows(
    ledger_path: Path, signer: SigningKey, tmp_path: Path, process_tag: str
) -> None:
    key_path = tmp_path / "site.key"
    signer.save(key_path)
    process = child(ledger_path, key_path, "many", process_tag)
    assert process.stdout is not None
    confirmed = 0
    try:
        while confirmed < 40:
            line = process.stdout.readline()
            assert line, "the recording process ended early"
            confirmed = int(line)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL
    assert integrity(ledger_path) == "ok"
    reopened = PrivacyLedger(ledger_path)
    records = reopened.records()
    assert len(records) >= confirmed  # every confirmed spend is there, maybe one more
    assert [record.round for record in records] == list(range(1, len(records) + 1))
    assert all(record == spend(round=record.round) for record in records)
    assert reopened.verify(signer.public) == LedgerVerification(rows_checked=len(records), bad=())
    assert reopened.record(spend(round=len(records) + 1), signer=signer) is True


def test_records_of_a_malformed_row_raise_a_ledger_error(
    ledger: PrivacyLedger, ledger_path: Path, signer: SigningKey
) -> None:
    filled(ledger, signer, rounds=1)
    tamper(ledger_path, "UPDATE spend SET recorded_at = 'yesterday'")
    with pytest.raises(LedgerError, match="a spend row is malformed"):
        ledger.records()
    assert ledger.verify(signer.public).bad[0][1].startswith("row is malformed")
