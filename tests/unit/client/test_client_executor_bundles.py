"""The warm executor's bundle check, before anything of a bundle is installed: a signed
bundle passes; an unsigned, tampered or foreign-signed one is refused with a
`bundle.refused` entry that verifies in the site's signed audit log; a site that allows
unsigned bundles is warned at every task. (The whole path, with real SuperLink and
SuperNode processes, is `tests/e2e/test_malicious_bundle.py`.)"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from medfed.client.bundle_check import (
    BUNDLE_REFUSED,
    UNSIGNED_WARNING,
    BundleGate,
    UntrustedBundleError,
)
from medfed.client.egress import Handler
from medfed.client.executor import WarmExecutor
from medfed.flower.testing import Fab, Run
from medfed.privacy.audit import AuditLog, verify_audit_log
from medfed.privacy.bundle_signing import APP_SIGNATURE, sign_bundle
from medfed.privacy.signing import SigningKey

APP_KEY = SigningKey.generate()
SITE_KEY = SigningKey.generate()


def _zip(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


# A bundle of an app that is not medfed's: it runs from its own files, and only if the
# site approved its exact bytes (`approved_apps`); the executors below approved it, so only
# its signature matters to them (medfed bundles: tests/unit/client/test_client_bundle_code.py).
FAB = _zip({
    "pyproject.toml": '[tool.flwr.app.components]\nclientapp = "other.client:app"\n',
    "other/client.py": "app = None\n",
})  # fmt: skip


APPROVED = frozenset({hashlib.sha256(FAB).hexdigest()})


def _pass_through(app: Handler) -> Handler:
    return app


def _executor(
    tmp_path: Path, gate: BundleGate | None, approved: frozenset[str] = APPROVED
) -> tuple[WarmExecutor, AuditLog]:
    audit = AuditLog(tmp_path / "audit.jsonl", SITE_KEY)
    executor = WarmExecutor(
        "127.0.0.1:1", None, _pass_through, bundles=gate, audit=audit.append,
        approved_apps=approved,
    )  # fmt: skip
    return executor, audit


def _task(fab: bytes, override_config: dict[str, object]) -> tuple[Run, Fab]:
    run = Run.create_empty(7)
    run.override_config = override_config  # type: ignore[assignment]
    fab_hash = hashlib.sha256(fab).hexdigest()
    return run, Fab(fab_hash, fab, {})


def _signed(fab: bytes, key: SigningKey = APP_KEY, key_id: str = "medfed-consortium") -> str:
    return sign_bundle(fab, key, key_id=key_id, signed_at=1_750_000_000)


GATE = BundleGate({"medfed-consortium": APP_KEY.public})


def test_a_signed_bundle_passes_and_writes_nothing(tmp_path: Path) -> None:
    executor, audit = _executor(tmp_path, GATE)
    executor.check_bundle(*_task(FAB, {APP_SIGNATURE: _signed(FAB)}))
    assert audit.entries() == []


@pytest.mark.parametrize(
    ("override", "fab", "reason"),
    [
        ({}, FAB, "the app bundle is unsigned"),
        ({APP_SIGNATURE: _signed(FAB)}, FAB + b"one more file", "does not verify"),
        (
            {APP_SIGNATURE: _signed(FAB, SigningKey.generate(), "intruder")},
            FAB,
            "signed by 'intruder', a key not trusted",
        ),
        (
            {APP_SIGNATURE: _signed(FAB, SigningKey.generate())},
            FAB,
            "does not verify",
        ),
    ],
    ids=["unsigned", "tampered", "untrusted-id", "other-key-same-id"],
)
def test_a_refused_bundle_is_written_to_the_signed_audit_log(
    tmp_path: Path, override: dict[str, object], fab: bytes, reason: str
) -> None:
    executor, audit = _executor(tmp_path, GATE)
    run, record = _task(fab, override)
    with pytest.raises(UntrustedBundleError, match=reason):
        executor.check_bundle(run, record)
    (entry,) = audit.entries()
    assert entry.event == BUNDLE_REFUSED
    assert entry.details["fab_hash"] == hashlib.sha256(fab).hexdigest()
    assert entry.details["run_id"] == "7"
    assert reason in str(entry.details["reason"])
    assert verify_audit_log(audit.path, SITE_KEY.public).ok


def test_a_bundle_refused_once_is_refused_again(tmp_path: Path) -> None:
    executor, audit = _executor(tmp_path, GATE)
    for _ in range(2):
        with pytest.raises(UntrustedBundleError):
            executor.check_bundle(*_task(FAB, {}))
    assert [entry.event for entry in audit.entries()] == [BUNDLE_REFUSED] * 2


def test_the_gate_remembers_a_verified_bundle_by_its_bytes_not_its_claimed_hash() -> None:
    gate = BundleGate({"medfed-consortium": APP_KEY.public})
    value = _signed(FAB)
    claimed = hashlib.sha256(FAB).hexdigest()
    assert gate.check(claimed, FAB, {APP_SIGNATURE: value}) == "medfed-consortium"
    with pytest.raises(UntrustedBundleError, match="does not verify"):
        gate.check(claimed, FAB + b"!", {APP_SIGNATURE: value})  # same claimed hash


def test_allowing_unsigned_bundles_warns_at_every_task(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    executor, audit = _executor(tmp_path, None)
    with caplog.at_level("WARNING"):
        for _ in range(3):
            executor.check_bundle(*_task(FAB, {}))
    assert sum(UNSIGNED_WARNING in record.message for record in caplog.records) == 3
    assert audit.entries() == []


def test_a_bundle_of_another_app_signed_by_the_leads_key_is_refused_unless_approved(
    tmp_path: Path,
) -> None:
    # The red team's case: the lead's real key signs a bundle whose ClientApp is its own
    # code (it would run beside the site's data and keys). The signature holds; the site
    # approved no such app, so nothing of it is installed or imported.
    executor, audit = _executor(tmp_path, GATE, approved=frozenset())
    run, record = _task(FAB, {APP_SIGNATURE: _signed(FAB)})
    with pytest.raises(UntrustedBundleError, match=r"other\.client:app is not medfed's own"):
        executor.check_bundle(run, record)
    (entry,) = audit.entries()
    assert entry.event == BUNDLE_REFUSED
    assert "approved no other app" in str(entry.details["reason"])
    assert verify_audit_log(audit.path, SITE_KEY.public).ok
    # Approving another bundle's digest does not approve this one.
    other = hashlib.sha256(FAB + b"x").hexdigest()
    executor, _ = _executor(tmp_path / "other", GATE, approved=frozenset({other}))
    with pytest.raises(UntrustedBundleError, match="not medfed's own"):
        executor.check_bundle(*_task(FAB, {APP_SIGNATURE: _signed(FAB)}))
    # Approved by its exact digest, it runs (its signature still checked).
    executor, audit = _executor(tmp_path / "approved", GATE)
    executor.check_bundle(*_task(FAB, {APP_SIGNATURE: _signed(FAB)}))
    assert audit.entries() == []


def test_an_unsigned_site_still_refuses_another_app_it_did_not_approve(tmp_path: Path) -> None:
    executor, _ = _executor(tmp_path, None, approved=frozenset())
    with pytest.raises(UntrustedBundleError, match="not medfed's own"):
        executor.check_bundle(*_task(FAB, {}))
