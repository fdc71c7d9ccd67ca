"""Officers' signed approvals: ranges, signatures checked with `cryptography`, storage in
the ledger file, and which approval a site trusts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medfed.privacy.approvals import Approval, SignedApproval, sign_approval, utc_now
from medfed.privacy.errors import ApprovalError, LedgerError
from medfed.privacy.ledger import PrivacyLedger
from medfed.privacy.signing import SigningKey

STUDY_SHA = hashlib.sha256(b"study file v1").hexdigest()
OTHER_SHA = hashlib.sha256(b"study file v2").hexdigest()


@pytest.fixture(scope="module")
def officer() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def ledger(tmp_path: Path) -> PrivacyLedger:
    return PrivacyLedger(tmp_path / "ledger.sqlite")


def approval(officer: SigningKey, **changes: object) -> Approval:
    fields: dict[str, object] = {
        "site_id": "hospital-1",
        "study": "sepsis-2025",
        "study_sha256": STUDY_SHA,
        "epsilon": 3.0,
        "delta": 1e-5,
        "approved_at": "2025-03-01T09:00:00+00:00",
        "officer_key_id": officer.public.key_id,
        **changes,
    }
    return Approval(**fields)  # type: ignore[arg-type]


def signed(officer: SigningKey, **changes: object) -> SignedApproval:
    return sign_approval(approval(officer, **changes), officer)


def tamper(path: Path, statement: str) -> None:
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("DROP TRIGGER IF EXISTS approvals_no_update")
        connection.execute("DROP TRIGGER IF EXISTS approvals_no_delete")
        connection.execute(statement)
    finally:
        connection.close()


def test_signature_verifies_with_cryptography_directly(officer: SigningKey) -> None:
    result = signed(officer, epsilon=2)
    payload = json.dumps(
        {
            "schema": "medfed.privacy.approval/1",
            "site_id": "hospital-1",
            "study": "sepsis-2025",
            "study_sha256": STUDY_SHA,
            "epsilon": 2.0,
            "delta": 1e-5,
            "approved_at": "2025-03-01T09:00:00+00:00",
            "officer_key_id": officer.public.key_id,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    Ed25519PublicKey.from_public_bytes(officer.public.raw).verify(
        bytes.fromhex(result.signature), payload
    )
    assert result.problem(officer.public) is None


@pytest.mark.parametrize(
    "changes",
    [
        {"epsilon": 0.0},
        {"epsilon": -1.0},
        {"epsilon": math.inf},
        {"epsilon": math.nan},
        {"epsilon": True},
        {"epsilon": "3"},
        {"delta": 0.0},
        {"delta": 1.0},
        {"delta": math.nan},
        {"delta": -1e-5},
        {"approved_at": "2025-03-01T09:00:00"},
        {"approved_at": "2025-03-01T10:00:00+01:00"},
        {"approved_at": "yesterday"},
        {"study_sha256": STUDY_SHA.upper()},
        {"study_sha256": STUDY_SHA[:-1]},
        {"officer_key_id": "not-a-key-id"},
        {"site_id": ""},
        {"study": ""},
    ],
)
def test_out_of_range_approvals_are_refused(
    officer: SigningKey, changes: dict[str, object]
) -> None:
    with pytest.raises(ApprovalError):
        approval(officer, **changes)


def test_utc_now_is_a_valid_approved_at(officer: SigningKey) -> None:
    assert approval(officer, approved_at=utc_now()).approved_at.endswith("+00:00")


def test_an_officer_signs_only_approvals_naming_their_key(officer: SigningKey) -> None:
    other = SigningKey.generate()
    with pytest.raises(ApprovalError, match="names officer key"):
        sign_approval(approval(officer), other)


@pytest.mark.parametrize("signature", ["", "ab" * 63, "AB" * 64, "zz" * 64])
def test_malformed_signatures_are_refused(officer: SigningKey, signature: str) -> None:
    with pytest.raises(ApprovalError, match="128 lowercase hex"):
        SignedApproval(approval(officer), signature)


def test_problem_names_the_other_key_and_an_edit(officer: SigningKey) -> None:
    other = SigningKey.generate()
    by_other = signed(other, officer_key_id=other.public.key_id)
    assert by_other.problem(officer.public) == f"signed by another key {other.public.key_id}"
    edited = dataclasses.replace(signed(officer), approval=approval(officer, epsilon=30.0))
    assert edited.problem(officer.public) == "signature does not match the approval (row edited?)"


def test_approvals_are_stored_once_and_listed(ledger: PrivacyLedger, officer: SigningKey) -> None:
    first = signed(officer)
    second = signed(officer, approved_at="2025-04-01T09:00:00+00:00", epsilon=4.0)
    assert ledger.add_approval(first) is True
    assert ledger.add_approval(first) is False
    assert ledger.add_approval(second) is True
    assert ledger.approvals() == [first, second]
    assert ledger.invalid_approvals(officer.public) == ()
    assert ledger.approvals_verified(officer.public) == [first.approval, second.approval]


def test_the_newest_verifying_approval_is_the_one_trusted(
    ledger: PrivacyLedger, officer: SigningKey
) -> None:
    newer = signed(officer, approved_at="2025-04-01T09:00:00+00:00", epsilon=1.5)
    older = signed(officer, epsilon=5.0)
    ledger.add_approval(newer)
    ledger.add_approval(older)  # an old approval added later (a replay) does not win
    ledger.add_approval(signed(officer, study_sha256=OTHER_SHA, epsilon=9.0))
    ledger.add_approval(
        signed(officer, site_id="hospital-2", approved_at="2026-01-01T00:00:00+00:00")
    )
    found = ledger.approval_for(STUDY_SHA, officer.public, site_id="hospital-1")
    assert found == newer.approval
    assert ledger.approval_for(OTHER_SHA, officer.public, site_id="hospital-1") == approval(
        officer, study_sha256=OTHER_SHA, epsilon=9.0
    )
    assert ledger.approval_for(STUDY_SHA, officer.public, site_id="hospital-3") is None
    missing = hashlib.sha256(b"no such study").hexdigest()
    assert ledger.approval_for(missing, officer.public, site_id="hospital-1") is None


def test_approvals_by_another_key_are_skipped_and_reported(
    ledger: PrivacyLedger, officer: SigningKey
) -> None:
    intruder = SigningKey.generate()
    ledger.add_approval(signed(officer, epsilon=1.0))
    ledger.add_approval(
        signed(
            intruder,
            officer_key_id=intruder.public.key_id,
            epsilon=50.0,
            approved_at="2026-01-01T00:00:00+00:00",
        )
    )
    assert ledger.approval_for(STUDY_SHA, officer.public, site_id="hospital-1") == approval(
        officer, epsilon=1.0
    )
    assert ledger.invalid_approvals(officer.public) == (
        (2, f"signed by another key {intruder.public.key_id}"),
    )
    assert ledger.approvals_verified(officer.public) == [approval(officer, epsilon=1.0)]


def test_a_forged_approval_naming_the_officer_is_skipped_and_reported(
    ledger: PrivacyLedger, officer: SigningKey
) -> None:
    intruder = SigningKey.generate()
    forged = approval(officer, epsilon=50.0, approved_at="2026-01-01T00:00:00+00:00")
    ledger.add_approval(signed(officer, epsilon=1.0))
    ledger.add_approval(SignedApproval(forged, intruder.sign(forged.payload()).hex()))
    assert ledger.approval_for(STUDY_SHA, officer.public, site_id="hospital-1") == approval(
        officer, epsilon=1.0
    )
    assert ledger.invalid_approvals(officer.public) == (
        (2, "signature does not match the approval (row edited?)"),
    )


def test_an_edited_approval_row_is_skipped_and_reported(
    ledger: PrivacyLedger, officer: SigningKey, tmp_path: Path
) -> None:
    ledger.add_approval(signed(officer, epsilon=1.0))
    ledger.add_approval(signed(officer, epsilon=2.0, approved_at="2025-04-01T09:00:00+00:00"))
    tamper(tmp_path / "ledger.sqlite", "UPDATE approvals SET epsilon = 20.0 WHERE seq = 2")
    assert ledger.approval_for(STUDY_SHA, officer.public, site_id="hospital-1") == approval(
        officer, epsilon=1.0
    )
    assert ledger.invalid_approvals(officer.public) == (
        (2, "signature does not match the approval (row edited?)"),
    )


def test_a_malformed_approval_row_is_reported_not_raised(
    ledger: PrivacyLedger, officer: SigningKey, tmp_path: Path
) -> None:
    ledger.add_approval(signed(officer, epsilon=1.0))
    tamper(tmp_path / "ledger.sqlite", "UPDATE approvals SET epsilon = -1.0 WHERE seq = 1")
    assert ledger.approvals() == []
    assert ledger.approval_for(STUDY_SHA, officer.public, site_id="hospital-1") is None
    ((seq, reason),) = ledger.invalid_approvals(officer.public)
    assert seq == 1
    assert reason.startswith("malformed approval (epsilon must be positive")


def test_a_deleted_approval_row_is_reported(
    ledger: PrivacyLedger, officer: SigningKey, tmp_path: Path
) -> None:
    for day in range(1, 4):
        ledger.add_approval(signed(officer, approved_at=f"2025-03-0{day}T09:00:00+00:00"))
    tamper(tmp_path / "ledger.sqlite", "DELETE FROM approvals WHERE seq = 3")
    ((seq, reason),) = ledger.invalid_approvals(officer.public)
    assert seq == 3
    assert "after seq 2" in reason


def test_the_same_signature_with_other_fields_is_refused(
    ledger: PrivacyLedger, officer: SigningKey
) -> None:
    original = signed(officer)
    ledger.add_approval(original)
    copy = SignedApproval(approval(officer, epsilon=10.0), original.signature)
    with pytest.raises(LedgerError, match="same signature"):
        ledger.add_approval(copy)


@pytest.mark.parametrize(
    "statement", ["UPDATE approvals SET epsilon = 100.0", "DELETE FROM approvals"]
)
def test_the_approvals_table_is_append_only(
    ledger: PrivacyLedger, officer: SigningKey, tmp_path: Path, statement: str
) -> None:
    ledger.add_approval(signed(officer))
    connection = sqlite3.connect(tmp_path / "ledger.sqlite")
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            connection.execute(statement)
        connection.rollback()
    finally:
        connection.close()
    assert ledger.approvals() == [signed(officer)]


def test_approvals_survive_reopening(
    ledger: PrivacyLedger, officer: SigningKey, tmp_path: Path
) -> None:
    ledger.add_approval(signed(officer))
    reopened = PrivacyLedger(tmp_path / "ledger.sqlite")
    assert reopened.approval_for(STUDY_SHA, officer.public, site_id="hospital-1") == approval(
        officer
    )
