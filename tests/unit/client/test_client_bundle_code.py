"""The signed bundle is what runs: a medfed bundle whose code is not byte for byte the
installed medfed the executor runs is refused (and audited like an unsigned one); the
bundle `medfed round start` and the demo build passes."""

from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from pathlib import Path

import pytest

from medfed.app_bundle import APP_PACKAGES, build_app_dir
from medfed.client.bundle_check import BUNDLE_REFUSED, BundleGate, UntrustedBundleError
from medfed.client.bundle_code import RUNTIME_ROOMS, installed_code_mismatch, installed_medfed
from medfed.client.egress import Handler
from medfed.client.executor import WarmExecutor
from medfed.flower.fab import build_fab
from medfed.flower.testing import Fab, Run
from medfed.privacy.audit import AuditLog, verify_audit_log
from medfed.privacy.bundle_signing import APP_SIGNATURE, sign_bundle
from medfed.privacy.signing import SigningKey

APP_KEY = SigningKey.generate()
SITE_KEY = SigningKey.generate()


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_app_dir(tmp_path_factory.mktemp("app"), {APP_SIGNATURE: ""})


@pytest.fixture(scope="module")
def fab(app_dir: Path) -> bytes:
    return build_fab(app_dir)


def _rebuilt(app_dir: Path, tmp_path: Path, change: str, text: str) -> bytes:
    """The bundle of a copy of `app_dir` with `change` (a path in it) appended to."""
    copy = Path(shutil.copytree(app_dir, tmp_path / "changed"))
    with (copy / change).open("a", encoding="utf-8") as out:
        out.write(text)
    return build_fab(copy)


def _installed_copy(tmp_path: Path) -> Path:
    """The installed medfed, copied (its linked rooms as folders) to change it safely."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "bench")
    return Path(shutil.copytree(installed_medfed(), tmp_path / "medfed", ignore=ignore))


def test_the_bundle_medfed_builds_is_the_installed_code(fab: bytes) -> None:
    assert installed_code_mismatch(fab) is None
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "medfed/__init__.py" in names
    assert set(RUNTIME_ROOMS) <= set(APP_PACKAGES)


def test_a_bundle_whose_code_differs_is_refused_naming_the_file(
    app_dir: Path, tmp_path: Path
) -> None:
    changed = _rebuilt(app_dir, tmp_path, "medfed/client/egress.py", "\nALLOW_ALL = True\n")
    reason = installed_code_mismatch(changed)
    assert reason is not None
    assert "medfed/client/egress.py differs from the installed medfed" in reason


def test_installed_code_the_bundle_lacks_is_refused(fab: bytes, tmp_path: Path) -> None:
    installed = _installed_copy(tmp_path)
    (installed / "sites" / "extra_reader.py").write_text("print('unsigned')\n")
    reason = installed_code_mismatch(fab, installed)
    assert reason == (
        "the installed medfed/sites/extra_reader.py is not in the bundle, so it would run unsigned"
    )


def test_an_installed_file_edited_at_the_site_is_caught_too(fab: bytes, tmp_path: Path) -> None:
    installed = _installed_copy(tmp_path)
    with (installed / "privacy" / "ledger.py").open("a", encoding="utf-8") as out:
        out.write("# patched locally\n")
    reason = installed_code_mismatch(fab, installed)
    assert reason is not None and "medfed/privacy/ledger.py differs" in reason


def _zip(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


MEDFED_APP = '[tool.flwr.app.components]\nclientapp = "medfed.client.client_app:app"\n'


def test_a_medfed_app_without_medfed_code_is_refused() -> None:
    # What `flwr run .` of the repository builds: the rooms at the top level, not medfed/.
    bundle = _zip({"pyproject.toml": MEDFED_APP, "client/client_app.py": "app = None\n"})
    reason = installed_code_mismatch(bundle)
    assert reason is not None and "carries no medfed/ code" in reason


def test_a_medfed_bundle_missing_a_room_the_site_runs_is_refused(fab: bytes) -> None:
    source = zipfile.ZipFile(io.BytesIO(fab))
    files = {
        name: source.read(name).decode()
        for name in source.namelist()
        if not name.startswith("medfed/privacy/")
    }
    reason = installed_code_mismatch(_zip(files))
    assert reason == "it does not carry medfed/privacy/, which this site would run unsigned"


def test_an_app_that_is_not_medfeds_runs_from_its_own_files() -> None:
    other = '[tool.flwr.app.components]\nclientapp = "stockapp.client:app"\n'
    assert installed_code_mismatch(_zip({"pyproject.toml": other})) is None
    assert installed_code_mismatch(b"not a zip") == "the app bundle is not a zip archive"


def _pass_through(app: Handler) -> Handler:
    return app


def test_the_executor_refuses_and_audits_a_signed_bundle_with_other_code(
    app_dir: Path, tmp_path: Path
) -> None:
    # Signed with the consortium's real key: the signature holds, the code does not match.
    changed = _rebuilt(app_dir, tmp_path, "medfed/model/network.py", "\n# another model\n")
    audit = AuditLog(tmp_path / "audit.jsonl", SITE_KEY)
    executor = WarmExecutor(
        "127.0.0.1:1", None, _pass_through,
        bundles=BundleGate({"medfed-consortium": APP_KEY.public}), audit=audit.append,
    )  # fmt: skip
    run = Run.create_empty(9)
    signature = sign_bundle(changed, APP_KEY, key_id="medfed-consortium", signed_at=1_750_000_000)
    run.override_config = {APP_SIGNATURE: signature}  # type: ignore[assignment]
    record = Fab(hashlib.sha256(changed).hexdigest(), changed, {})
    with pytest.raises(UntrustedBundleError, match="not the code this site runs"):
        executor.check_bundle(run, record)
    (entry,) = audit.entries()
    assert entry.event == BUNDLE_REFUSED
    assert "medfed/model/network.py differs" in str(entry.details["reason"])
    assert verify_audit_log(audit.path, SITE_KEY.public).ok
