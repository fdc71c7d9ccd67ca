"""Red-team row "truncation" at the site: deleting the newest ledger row (and rewinding its
sequence) or cutting the audit log's tail is seen by `budget show`, `audit verify` and the
privacy gate, through the signed heads and the ledger/audit cross-check."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import app
from medfed.client.config import SiteConfig
from medfed.client.errors import SiteRefusal
from medfed.client.privacy_gate import PrivacyGate
from medfed.client.records import check_site_records
from medfed.consortium import DemoSite
from medfed.model.contract import DEMO_CONTRACT
from medfed.privacy.audit import verify_audit_log
from medfed.privacy.ledger import PrivacyLedger, SpendRecord
from medfed.privacy.population import NoisyCount
from medfed.privacy.signing import SigningKey
from tests.sitekit import make_study, site_config, train_request, write_sites

runner = CliRunner()
STUDY = make_study(rounds=3, sites=1, target_epsilon=2.0, local_steps=2)
DATASET = "dataset-1"
PATIENTS = 2_000
COUNT = NoisyCount(DATASET, "v1", float(PATIENTS), 10.0)


@pytest.fixture
def site(tmp_path: Path) -> DemoSite:
    (only,) = write_sites(tmp_path, STUDY, n_sites=1, seed=3)
    return only


def _spend(config: SiteConfig, rounds: int) -> PrivacyGate:
    gate = PrivacyGate(config, PrivacyLedger(config.ledger_path))
    for number in range(1, rounds + 1):
        request = train_request(STUDY, number)
        plan = gate.plan(request, unit=DATASET, count=COUNT, contract=DEMO_CONTRACT)
        assert gate.record(request, plan, unit=DATASET)
    return gate


def _delete_newest_row_and_rewind(ledger: Path) -> None:
    """What the red team did: drop the guard, delete, and rewind AUTOINCREMENT."""
    with sqlite3.connect(ledger) as db:
        db.execute("DROP TRIGGER spend_no_delete")
        newest = db.execute("SELECT max(seq) FROM spend").fetchone()[0]
        db.execute("DELETE FROM spend WHERE seq = ?", (newest,))
        db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'spend'", (newest - 1,))


def _cut_tail(log: Path, lines: int) -> None:
    kept = log.read_bytes().split(b"\n")[:-1][:-lines]
    log.write_bytes(b"\n".join(kept) + b"\n")


def _cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_honest_records_check_everywhere(site: DemoSite) -> None:
    config = site_config(site.site_toml)
    _spend(config, 2)
    assert check_site_records(config, SigningKey.load(config.signing_key_path).public) == []
    assert _cli("budget", "show", str(site.site_toml))[0] == 0
    code, output = _cli("audit", "verify", str(config.audit_path), "--key", str(site.site_toml))
    assert code == 0, output


def test_deleted_newest_ledger_row_with_rewound_sequence_is_detected(site: DemoSite) -> None:
    config = site_config(site.site_toml)
    _spend(config, 2)
    _delete_newest_row_and_rewind(config.ledger_path)
    public = SigningKey.load(config.signing_key_path).public
    # the ledger alone cannot see it: every row verifies and no sequence gap shows
    assert PrivacyLedger(config.ledger_path).verify(public).ok
    problems = check_site_records(config, public)
    assert any("rows were deleted" in p for p in problems), problems
    assert any("in the audit log but not in the ledger" in p for p in problems), problems

    code, _ = _cli("budget", "show", str(site.site_toml))
    assert code == 1
    shown = json.loads(runner.invoke(app, ["budget", "show", str(site.site_toml), "--json"]).stdout)
    assert shown["records_verified"] is False
    code, output = _cli("audit", "verify", str(config.audit_path), "--key", str(site.site_toml))
    assert code == 1 and "not in the ledger" in output
    # and no more budget is spent on an under-counted ledger
    gate = PrivacyGate(config, PrivacyLedger(config.ledger_path))
    with pytest.raises(SiteRefusal, match="privacy records do not check"):
        gate.plan(train_request(STUDY, 3), unit=DATASET, count=COUNT, contract=DEMO_CONTRACT)


def test_cut_audit_tail_is_detected_and_stays_detected(site: DemoSite) -> None:
    config = site_config(site.site_toml)
    gate = _spend(config, 2)
    public = SigningKey.load(config.signing_key_path).public
    _cut_tail(config.audit_path, 1)
    assert verify_audit_log(config.audit_path, public).ok  # a valid, shorter chain
    problems = check_site_records(config, public)
    assert any("its tail was cut" in p for p in problems), problems
    assert any("in the ledger but not in the audit log" in p for p in problems), problems
    # a later append does not move the head back over the cut
    gate.audit.append("site.note", {"text": "appended after the cut"})
    assert any("audit" in p and "head" in p for p in check_site_records(config, public))
    code, output = _cli("audit", "verify", str(config.audit_path), "--key", str(site.site_toml))
    assert code == 1, output


def test_a_spend_that_reached_only_the_ledger_is_audited_when_the_gate_opens(
    site: DemoSite,
) -> None:
    """A crash between the ledger write and the audit append is not tampering."""
    config = site_config(site.site_toml)
    gate = _spend(config, 1)
    request = train_request(STUDY, 2)
    plan = gate.plan(request, unit=DATASET, count=COUNT, contract=DEMO_CONTRACT)
    PrivacyLedger(config.ledger_path).record(
        SpendRecord(DATASET, plan.study, request.run_id, 2, plan.event, plan.delta),
        signer=SigningKey.load(config.signing_key_path),
    )
    public = SigningKey.load(config.signing_key_path).public
    assert check_site_records(config, public)  # the spend is missing from the log
    PrivacyGate(config, PrivacyLedger(config.ledger_path))  # the daemon restarts
    assert check_site_records(config, public) == []
    recovered = [
        json.loads(line)
        for line in config.audit_path.read_text().splitlines()
        if '"recovered":true' in line
    ]
    assert [entry["details"]["round"] for entry in recovered] == [2]
