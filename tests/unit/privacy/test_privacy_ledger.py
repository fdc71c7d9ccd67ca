"""The append-only privacy ledger: idempotence, refusals, dry runs and composition."""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import pytest

from privacy.accountant import epsilon_of
from privacy.errors import LedgerError
from privacy.events import DpSgdEvent
from privacy.ledger import PrivacyLedger, SpendRecord

DELTA = 1e-5
EVENT = DpSgdEvent(noise_multiplier=1.1, sample_rate=0.05, steps=40)


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


def test_record_round_trips(ledger: PrivacyLedger) -> None:
    record = spend()
    assert ledger.record(record) is True
    assert ledger.records() == [record]
    assert ledger.epsilon("cohort-a", delta=DELTA) == pytest.approx(
        epsilon_of([EVENT], delta=DELTA)
    )


def test_identical_re_record_is_idempotent(ledger: PrivacyLedger, ledger_path: Path) -> None:
    assert ledger.record(spend()) is True
    before = ledger.epsilon("cohort-a", delta=DELTA)
    assert ledger.record(spend()) is False
    assert ledger.epsilon("cohort-a", delta=DELTA) == before
    assert row_count(ledger_path) == 1


@pytest.mark.parametrize(
    "changed",
    [
        {"event": DpSgdEvent(noise_multiplier=1.2, sample_rate=0.05, steps=40)},
        {"event": DpSgdEvent(noise_multiplier=1.1, sample_rate=0.06, steps=40)},
        {"event": DpSgdEvent(noise_multiplier=1.1, sample_rate=0.05, steps=41)},
        {"delta": 1e-6},
    ],
)
def test_conflicting_re_record_is_refused_and_writes_nothing(
    ledger: PrivacyLedger, ledger_path: Path, changed: dict[str, object]
) -> None:
    ledger.record(spend())
    before = ledger.records()
    with pytest.raises(LedgerError, match="already recorded with other parameters"):
        ledger.record(spend(**changed))  # type: ignore[arg-type]
    assert ledger.records() == before
    assert row_count(ledger_path) == 1


def test_epsilon_grows_with_every_round(ledger: PrivacyLedger) -> None:
    epsilons = [ledger.epsilon("cohort-a", delta=DELTA)]
    for round_ in range(1, 6):
        ledger.record(spend(round=round_))
        epsilons.append(ledger.epsilon("cohort-a", delta=DELTA))
    assert all(later > earlier for earlier, later in itertools.pairwise(epsilons))
    assert epsilons[-1] == pytest.approx(epsilon_of([EVENT] * 5, delta=DELTA))


def test_epsilon_after_is_a_dry_run(ledger: PrivacyLedger, ledger_path: Path) -> None:
    ledger.record(spend(round=1))
    projected = ledger.epsilon_after("cohort-a", EVENT, delta=DELTA)
    assert row_count(ledger_path) == 1
    assert len(ledger.records()) == 1
    assert projected == pytest.approx(epsilon_of([EVENT, EVENT], delta=DELTA))
    assert projected > ledger.epsilon("cohort-a", delta=DELTA)
    ledger.record(spend(round=2))
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
    ledger: PrivacyLedger, ledger_path: Path, statement: str
) -> None:
    ledger.record(spend())
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


def test_reopening_keeps_the_history(ledger: PrivacyLedger, ledger_path: Path) -> None:
    ledger.record(spend(round=1))
    ledger.record(spend(round=2))
    reopened = PrivacyLedger(ledger_path)
    assert reopened.records() == ledger.records()
    assert reopened.record(spend(round=2)) is False


def test_events_across_studies_and_runs_compose(ledger: PrivacyLedger) -> None:
    other = DpSgdEvent(noise_multiplier=2.0, sample_rate=0.1, steps=25)
    ledger.record(spend(study="study-1", run_id="run-1", round=1))
    ledger.record(spend(study="study-1", run_id="run-2", round=1))
    ledger.record(spend(study="study-2", run_id="run-9", round=1, event=other))
    ledger.record(spend(dataset="cohort-b", run_id="run-1", round=1, event=other))
    assert ledger.epsilon("cohort-a", delta=DELTA) == pytest.approx(
        epsilon_of([EVENT, EVENT, other], delta=DELTA)
    )
    assert ledger.epsilon("cohort-b", delta=DELTA) == pytest.approx(
        epsilon_of([other], delta=DELTA)
    )
    assert [r.run_id for r in ledger.records("cohort-a")] == ["run-1", "run-2", "run-9"]
    assert len(ledger.records()) == 4


def test_same_run_and_round_on_two_datasets_are_two_spends(ledger: PrivacyLedger) -> None:
    assert ledger.record(spend(dataset="cohort-a")) is True
    assert ledger.record(spend(dataset="cohort-b")) is True
    assert ledger.epsilon("cohort-b", delta=DELTA) > 0
