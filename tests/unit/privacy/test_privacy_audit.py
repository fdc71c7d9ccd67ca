"""The audit log: chain and signatures checked with `hashlib` and `cryptography`, every kind
of tamper named at its line, torn tails, concurrent writers and a SIGKILL."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.privacy.audit import (
    GENESIS_PREV,
    TORN_SUFFIX,
    TORN_TAIL_EVENT,
    AuditLog,
    AuditVerification,
    verify_audit_log,
)
from medfed.privacy.errors import AuditLogError
from medfed.privacy.signing import SigningKey
from tests.conftest import TEST_TAG_VARIABLE

REPO_ROOT = Path(__file__).resolve().parents[3]
KEY = SigningKey.generate()


def write_log(path: Path, entries: int = 4) -> list[bytes]:
    log = AuditLog(path, KEY)
    for number in range(1, entries + 1):
        log.append("round.trained", {"round": number, "epsilon": 0.25 * number, "note": "é\n"})
    return path.read_bytes().splitlines(keepends=True)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.jsonl"


def first_bad(path: Path) -> tuple[int, str] | None:
    return verify_audit_log(path, KEY.public).first_bad


def test_entries_chain_and_verify_with_hashlib_and_cryptography(log_path: Path) -> None:
    lines = write_log(log_path, entries=3)
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o640
    public = Ed25519PublicKey.from_public_bytes(KEY.public.raw)
    prev = "0" * 64
    for number, line in enumerate(lines, 1):
        assert line.endswith(b"\n")
        entry = json.loads(line)
        assert set(entry) == {"seq", "time", "actor", "event", "details", "prev", "signature"}
        assert (entry["seq"], entry["actor"], entry["prev"]) == (number, KEY.public.key_id, prev)
        assert entry["details"] == {"round": number, "epsilon": 0.25 * number, "note": "é\n"}
        signature = bytes.fromhex(entry.pop("signature"))
        payload = json.dumps(
            entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")
        public.verify(signature, payload)
        prev = hashlib.sha256(line[:-1]).hexdigest()
    assert verify_audit_log(log_path, KEY.public) == AuditVerification(3, None, prev)


def test_append_returns_the_entry_written(log_path: Path) -> None:
    log = AuditLog(log_path, KEY)
    first = log.append("study.approved", {"epsilon": 3.0})
    second = log.append("round.trained", {})
    assert (first.seq, first.prev, first.event) == (1, GENESIS_PREV, "study.approved")
    assert second.prev == hashlib.sha256(first.line()).hexdigest()
    assert log.entries() == [first, second]
    assert log_path.read_bytes() == first.line() + b"\n" + second.line() + b"\n"


def test_an_empty_or_missing_log(log_path: Path) -> None:
    with pytest.raises(AuditLogError, match="no such audit log"):
        verify_audit_log(log_path, KEY.public)
    assert AuditLog(log_path, None).entries() == []
    log_path.parent.mkdir(parents=True)
    log_path.write_bytes(b"")
    assert verify_audit_log(log_path, KEY.public) == AuditVerification(0, None, GENESIS_PREV)


def test_a_read_only_log_refuses_to_append(log_path: Path) -> None:
    write_log(log_path, entries=2)
    reader = AuditLog(log_path, None)
    assert [entry.seq for entry in reader.entries()] == [1, 2]
    with pytest.raises(AuditLogError, match="only be read"):
        reader.append("x", {})


@pytest.mark.parametrize(
    ("event", "details", "message"),
    [
        ("", {}, "non-empty string"),
        ("x", {"a": float("nan")}, "cannot be written"),
        ("x", {"a": object()}, "cannot be written"),
        ("x", {1: "a"}, "cannot be written"),
    ],
)
def test_bad_events_are_refused_and_write_nothing(
    log_path: Path, event: str, details: dict[str, object], message: str
) -> None:
    with pytest.raises(AuditLogError, match=message):
        AuditLog(log_path, KEY).append(event, details)  # type: ignore[arg-type]
    assert not log_path.exists()


def test_verifying_with_another_key_names_line_1(log_path: Path) -> None:
    write_log(log_path)
    other = SigningKey.generate().public
    result = verify_audit_log(log_path, other)
    assert result.first_bad == (1, f"signed by another key {KEY.public.key_id}")
    assert result.entries_checked == 0


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def test_an_edited_entry_is_named(log_path: Path) -> None:
    lines = write_log(log_path)
    lines[1] = lines[1].replace(b'"round":2', b'"round":7')
    rewrite(log_path, lines)
    result = verify_audit_log(log_path, KEY.public)
    assert result.first_bad == (2, "bad signature (entry edited?)")
    assert result.entries_checked == 1
    assert result.last_hash == hashlib.sha256(lines[0][:-1]).hexdigest()


def test_a_deleted_entry_is_named(log_path: Path) -> None:
    lines = write_log(log_path)
    rewrite(log_path, lines[:2] + lines[3:])
    bad = first_bad(log_path)
    assert bad is not None
    assert bad[0] == 3
    assert bad[1].startswith("seq is 4, expected 3")


def test_reordered_entries_are_named(log_path: Path) -> None:
    lines = write_log(log_path)
    rewrite(log_path, [lines[0], lines[2], lines[1], lines[3]])
    assert first_bad(log_path) == (
        2,
        "seq is 3, expected 2 (an entry deleted, copied or reordered?)",
    )


def test_a_copied_entry_is_named(log_path: Path) -> None:
    lines = write_log(log_path)
    rewrite(log_path, [*lines, lines[-1]])
    assert first_bad(log_path) == (
        5,
        "seq is 4, expected 5 (an entry deleted, copied or reordered?)",
    )


def test_a_renumbered_chain_without_the_key_is_named(log_path: Path) -> None:
    """An attacker who deletes line 2 and renumbers the rest cannot re-sign them."""
    lines = write_log(log_path)
    kept = [lines[0], *lines[2:]]
    for index in range(1, len(kept)):
        entry = json.loads(kept[index])
        entry["seq"] = index + 1
        entry["prev"] = hashlib.sha256(kept[index - 1][:-1]).hexdigest()
        kept[index] = (
            json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
            + b"\n"
        )
    rewrite(log_path, kept)
    assert first_bad(log_path) == (2, "bad signature (entry edited?)")


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda line: b"{not json}\n", "malformed JSON"),
        (lambda line: line.replace(b'"seq":', b'"seq": '), "not in canonical form"),
        (lambda line: b"\n", "empty line"),
        (lambda line: b'{"seq":3}\n', "not an audit entry"),
        (lambda line: line.replace(b'"seq":3', b'"seq":"3"'), "malformed entry: bad seq"),
    ],
)
def test_a_malformed_line_is_named(
    log_path: Path, edit: Callable[[bytes], bytes], reason: str
) -> None:
    lines = write_log(log_path)
    lines[2] = edit(lines[2])
    rewrite(log_path, lines)
    bad = first_bad(log_path)
    assert bad is not None
    assert bad[0] == 3
    assert reason in bad[1]


@pytest.fixture(scope="module")
def valid_log(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("valid") / "audit.jsonl"
    write_log(path, entries=5)
    return path.read_bytes()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("edited") / "audit.jsonl"


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_single_byte_edit_is_named_at_its_line(
    valid_log: bytes, scratch: Path, data: st.DataObject
) -> None:
    """Replace, insert or delete one byte anywhere: the line that held it is named."""
    original = valid_log
    kind = data.draw(st.sampled_from(["replace", "insert", "delete"]))
    if kind == "insert":
        position = data.draw(st.integers(0, len(original)))
        byte = data.draw(st.integers(0, 255))
        edited = original[:position] + bytes([byte]) + original[position:]
    else:
        position = data.draw(st.integers(0, len(original) - 1))
        if kind == "replace":
            byte = data.draw(st.integers(0, 255).filter(lambda b: b != original[position]))
            edited = original[:position] + bytes([byte]) + original[position + 1 :]
        else:
            edited = original[:position] + original[position + 1 :]
    scratch.write_bytes(edited)
    result = verify_audit_log(scratch, KEY.public)
    assert result.first_bad is not None, (kind, position)
    assert result.first_bad[0] == first_changed_line(original, edited)
    assert result.entries_checked == result.first_bad[0] - 1


def first_changed_line(original: bytes, edited: bytes) -> int:
    """The number of the first line, newline included, that differs between the two."""
    before, after = lines_of(original), lines_of(edited)
    return next(
        number
        for number, (old, new) in enumerate(itertools.zip_longest(before, after), 1)
        if old != new
    )


def lines_of(data: bytes) -> list[bytes]:
    return re.findall(rb"[^\n]*\n|[^\n]+$", data)


# Crashes mid-write: a torn tail is set aside, recorded in the chain, and the log goes on.


def test_a_torn_tail_is_reported_then_set_aside_and_recorded(log_path: Path) -> None:
    lines = write_log(log_path, entries=3)
    torn = lines[2][:40]
    rewrite(log_path, [*lines[:2], torn])
    assert first_bad(log_path) == (3, "incomplete last line (crash mid-write, or cut?)")
    entry = AuditLog(log_path, KEY).append("site.restarted", {})
    side = log_path.with_name(log_path.name + TORN_SUFFIX)
    assert side.read_bytes() == torn
    result = verify_audit_log(log_path, KEY.public)
    assert result.ok
    assert result.entries_checked == 4
    recorded = AuditLog(log_path, None).entries()
    assert [e.event for e in recorded] == ["round.trained"] * 2 + [
        TORN_TAIL_EVENT,
        "site.restarted",
    ]
    assert recorded[2].details == {
        "offset": len(lines[0]) + len(lines[1]),
        "length": 40,
        "sha256": hashlib.sha256(torn).hexdigest(),
        "kept_in": side.name,
        "kept_at_offset": 0,
    }
    assert entry == recorded[3]


def test_a_log_that_is_all_torn_starts_over_after_setting_it_aside(log_path: Path) -> None:
    log_path.parent.mkdir(parents=True)
    log_path.write_bytes(b'{"seq":1,"ti')
    AuditLog(log_path, KEY).append("site.started", {})
    entries = AuditLog(log_path, None).entries()
    assert [(e.seq, e.event) for e in entries] == [(1, TORN_TAIL_EVENT), (2, "site.started")]
    assert verify_audit_log(log_path, KEY.public).ok


def test_appending_after_a_malformed_last_entry_is_refused(log_path: Path) -> None:
    lines = write_log(log_path, entries=2)
    lines[1] = b"{garbage}\n"
    rewrite(log_path, lines)
    before = log_path.read_bytes()
    with pytest.raises(AuditLogError, match="last entry is malformed"):
        AuditLog(log_path, KEY).append("x", {})
    assert log_path.read_bytes() == before


def test_entries_longer_than_the_read_chunk(log_path: Path) -> None:
    log = AuditLog(log_path, KEY)
    log.append("big", {"blob": "x" * 200_000})
    log.append("big", {"blob": "y" * 150_000})
    log.append("small", {})
    assert [e.seq for e in log.entries()] == [1, 2, 3]
    assert verify_audit_log(log_path, KEY.public).ok


_APPEND_MANY = """
import sys, time
from pathlib import Path
from medfed.privacy.audit import AuditLog
from medfed.privacy.signing import SigningKey

log = AuditLog(Path(sys.argv[1]), SigningKey.load(Path(sys.argv[2])))
while not Path(sys.argv[5]).exists():  # start together with the other writers
    time.sleep(0.001)
for number in range(int(sys.argv[3])):
    log.append("worker.step", {"worker": sys.argv[4], "number": number, "pad": "p" * 3000})
    print(number, flush=True)
"""


def appender(
    log_path: Path, key_path: Path, count: int, name: str, tag: str
) -> subprocess.Popen[str]:
    """A process appending `count` entries once `go` exists beside the key."""
    go = key_path.with_name("go")
    return subprocess.Popen(
        [sys.executable, "-c", _APPEND_MANY, *map(str, (log_path, key_path, count, name, go))],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), TEST_TAG_VARIABLE: tag},
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    path = tmp_path / "site.key"
    KEY.save(path)
    return path


def test_two_processes_appending_never_interleave(
    log_path: Path, key_path: Path, process_tag: str
) -> None:
    workers = [appender(log_path, key_path, 150, name, process_tag) for name in ("a", "b")]
    key_path.with_name("go").touch()
    for worker in workers:
        worker.communicate(timeout=120)
        assert worker.returncode == 0
    result = verify_audit_log(log_path, KEY.public)
    assert result == AuditVerification(300, None, result.last_hash)
    entries = AuditLog(log_path, None).entries()
    for name in ("a", "b"):
        numbers = [e.details["number"] for e in entries if e.details["worker"] == name]
        assert numbers == list(range(150))
    switches = sum(
        1 for a, b in itertools.pairwise(entries) if a.details["worker"] != b.details["worker"]
    )
    assert switches >= 2, "the writers did not overlap, so this tested nothing"


def test_sigkill_while_appending_leaves_a_log_that_verifies_or_recovers(
    log_path: Path, key_path: Path, process_tag: str
) -> None:
    worker = appender(log_path, key_path, 1_000_000, "a", process_tag)
    key_path.with_name("go").touch()
    assert worker.stdout is not None
    confirmed = -1
    try:
        while confirmed < 100:
            line = worker.stdout.readline()
            assert line, "the appending process ended early"
            confirmed = int(line)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        worker.stdout.close()
    before = verify_audit_log(log_path, KEY.public)
    assert before.ok or (before.first_bad is not None and "incomplete" in before.first_bad[1])
    assert before.entries_checked >= confirmed + 1
    AuditLog(log_path, KEY).append("site.restarted", {})
    after = verify_audit_log(log_path, KEY.public)
    assert after.ok
    assert after.entries_checked >= before.entries_checked + 1
