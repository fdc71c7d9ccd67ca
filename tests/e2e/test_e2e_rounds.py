"""The lead's workflow with real processes: `medfed coordinator start`, two SuperNodes
serving demo hospitals, `medfed round start --follow`, then `round status`, `round list`,
`medfed report` and `medfed audit verify` on the run folder the ServerApp wrote."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from medfed.consortium import DemoSite, demo_study, write_demo_consortium
from medfed.coordinator.consortium import load_consortium
from medfed.coordinator.study import StudySettings
from medfed.flower import SUPERNODE_CONNECTED_LINE as SUPERNODE_READY
from medfed.processes import ProcessGroup, find_program, free_port, log_contains
from medfed.provision import PkiLayout, provision
from tests.conftest import TEST_TAG_VARIABLE, pids_with_env
from tests.sitekit import ledger_of

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SITES = ("hospital-1", "hospital-2")


def _medfed(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medfed", *args], env=env, capture_output=True, text=True,
        timeout=timeout, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _study_toml(path: Path, values: dict[str, object]) -> None:
    lines = ["[study]"]
    for key, value in values.items():
        text = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
        lines.append(f'"{key}" = {text}')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class Lead:
    """A running consortium: its consortium.toml, PKI, demo sites and process environment."""

    root: Path
    consortium: Path
    layout: PkiLayout
    sites: tuple[DemoSite, ...]
    env: dict[str, str]

    def medfed(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return _medfed(*args, env=self.env, timeout=timeout)


@contextlib.contextmanager
def running_consortium(tmp_path: Path, process_tag: str, rounds: int) -> Iterator[Lead]:
    """`medfed coordinator start` and one SuperNode per demo hospital, `study.toml` for a
    demo study of `rounds` rounds approved at both; everything stopped afterwards."""
    port = free_port()
    consortium = tmp_path / "consortium.toml"
    consortium.write_text(
        f'[consortium]\nname = "north"\naddress = "127.0.0.1:{port}"\nrun_dir = "run"\n'
        + "".join(f'\n[[sites]]\nid = "{site}"\n' for site in SITES),
        encoding="utf-8",
    )
    layout = PkiLayout(tmp_path / "pki")
    provision(load_consortium(consortium), layout.root)
    study = demo_study(rounds=rounds, sites=2, target_epsilon=3.0, seed=7, local_steps=10)
    # These SuperNodes run Flower's per-message ClientApp, without the site worker that
    # holds a secure round's keys between messages (`medfed site start`, tested in the
    # demo, site-daemon and soak tests): the lead's commands are what is tested here.
    study = StudySettings.from_run_config({**study.to_run_config(), "secure-aggregation": False})
    demo_sites = write_demo_consortium(tmp_path / "sites", study, n_sites=2, seed=7)
    for site in demo_sites:  # the sites sign with the demo's keys: the lead holds their halves
        shutil.copyfile(site.site_toml.parent / "keys" / "site-signing.pub",
                        layout.site_dir(site.site_id) / "site-signing.pub")  # fmt: skip
    _study_toml(tmp_path / "study.toml",
                {k: v for k, v in study.to_run_config().items()
                 if k not in ("results-path", "sites-root", "site-keys-dir", "run-dir",
                              "resume", "contract")})  # fmt: skip

    env = {**os.environ, TEST_TAG_VARIABLE: process_tag, "PYTHONUNBUFFERED": "1"}
    out_path = tmp_path / "coordinator.out"
    with open(out_path, "wb") as out:
        coordinator = subprocess.Popen(
            [sys.executable, "-m", "medfed", "coordinator", "start", str(consortium),
             "--pki", str(layout.root)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while b"ready: 2 sites" not in out_path.read_bytes():
            assert time.monotonic() < deadline, out_path.read_text(errors="replace")
            time.sleep(0.3)
        with ProcessGroup(log_dir=tmp_path / "logs", env=env) as group:
            for site in demo_sites:
                kit = layout.site_dir(site.site_id)
                node = group.start(site.site_id, [
                    find_program("flower-supernode", install_hint="flwr"),
                    "--superlink", f"127.0.0.1:{port}",
                    "--root-certificates", str(kit / "ca.pem"),
                    "--auth-supernode-private-key", str(kit / "supernode.key"),
                    "--node-config", f'site-config="{site.site_toml}"',
                    "--host", "127.0.0.1", "--port", str(free_port()),
                ], env={"FLWR_HOME": str(tmp_path / "flwr" / site.site_id)})  # fmt: skip
                deadline = time.monotonic() + 60
                while not log_contains(node, SUPERNODE_READY):
                    assert time.monotonic() < deadline, node.log_path.read_text(errors="replace")
                    time.sleep(0.3)
            yield Lead(tmp_path, consortium, layout, demo_sites, env)
    finally:
        coordinator.send_signal(signal.SIGTERM)
        coordinator.wait(timeout=30)
    deadline = time.monotonic() + 10
    while pids_with_env(TEST_TAG_VARIABLE, process_tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pids_with_env(TEST_TAG_VARIABLE, process_tag) == []


def test_a_lead_starts_follows_and_reports_a_run(tmp_path: Path, process_tag: str) -> None:
    with running_consortium(tmp_path, process_tag, rounds=2) as lead:
        consortium, layout, env = lead.consortium, lead.layout, lead.env
        started = _medfed("round", "start", str(tmp_path / "study.toml"), "--consortium",
                          str(consortium), "--pki", str(layout.root), "--follow", "--json",
                          env=env, timeout=600)  # fmt: skip
        assert started.returncode == 0, started.stderr
        document = json.loads(started.stdout)
        assert document["status"] == "completed", document
        assert document["rounds_completed"] == 2
        run = str(document["run"])
        results = document["results"]
        assert results["signed_updates"] is True
        for record in results["per_round"]:
            assert record["participants"] == list(SITES)
            assert record["rejected"] == {} and record["refused"] == {}
            assert record["local_steps_by_site"] == {s: 10 for s in SITES}

        status = _medfed("round", "status", run, "--consortium", str(consortium),
                         "--json", env=env)  # fmt: skip
        assert status.returncode == 0 and json.loads(status.stdout)["status"] == "completed"
        listing = json.loads(_medfed("round", "list", "--consortium", str(consortium),
                                     "--json", env=env).stdout)  # fmt: skip
        assert [r["run"] for r in listing["runs"]] == [run]

        folder = Path(str(document["folder"]))
        report = _medfed("report", str(folder), "--out", str(tmp_path / "report.html"),
                         "--json", env=env)  # fmt: skip
        assert report.returncode == 0, report.stderr
        assert json.loads(report.stdout)["audit_verified"] is True
        html = (tmp_path / "report.html").read_text(encoding="utf-8")
        assert results["per_round"][-1]["model_sha256"] in html
        assert html.count("<svg") == 5
        public = folder / "coordinator-signing.pub"
        verify = _medfed("audit", "verify", str(folder / "audit.jsonl"), "--key",
                         str(public), "--json", env=env)  # fmt: skip
        assert verify.returncode == 0 and json.loads(verify.stdout)["verified"] is True


def test_a_stopped_run_resumes_under_its_id_and_spends_once_per_round(
    tmp_path: Path, process_tag: str
) -> None:
    with running_consortium(tmp_path, process_tag, rounds=2) as lead:
        study_toml, pki = str(lead.root / "study.toml"), str(lead.layout.root)
        started = lead.medfed("round", "start", study_toml, "--consortium",
                              str(lead.consortium), "--pki", pki, "--json")  # fmt: skip
        assert started.returncode == 0, started.stderr
        document = json.loads(started.stdout)
        run, folder = str(document["run"]), Path(str(document["folder"]))
        # Stop it once the run has started (checkpoint 0) and before any site trains:
        # while the coordinator still asks the sites for their status.
        chain = folder / "audit.jsonl"
        deadline = time.monotonic() + 120
        while not (chain.exists() and b'"checkpoint.written"' in chain.read_bytes()):
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.1)
        assert b'"round.planned"' not in chain.read_bytes()
        stopped = lead.medfed("round", "stop", run, "--consortium", str(lead.consortium),
                              "--json")  # fmt: skip
        assert stopped.returncode == 0, stopped.stderr
        time.sleep(5)  # the ServerApp notices the stop

        resumed = lead.medfed("round", "resume", run, "--consortium", str(lead.consortium),
                              "--follow", "--json", timeout=600)  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr
        document = json.loads(resumed.stdout)
        assert document["status"] == "completed", document
        results = document["results"]
        assert results["run_id"] == document["flower_run_ids"][0]  # the first id, kept
        assert len(document["flower_run_ids"]) == 2
        assert results["resumed_from"] == [0]
        assert [r["round"] for r in results["per_round"]] == [1, 2]

        # Each site spent once per round, under the run's first id (its other rows are
        # the releases of its noised count and of each round's and the final model's
        # noised metrics); nothing is charged under the resumed life's Flower id.
        for site in lead.sites:
            rows = ledger_of(site.site_toml).records()
            assert [(row.run_id, row.round) for row in rows if row.run_id == results["run_id"]] == [
                (results["run_id"], 1), (results["run_id"], 2)
            ]  # fmt: skip
            assert not [row for row in rows if document["flower_run_ids"][1] in row.run_id]
        verify = lead.medfed("audit", "verify", str(chain), "--key",
                             str(folder / "coordinator-signing.pub"), "--json")  # fmt: skip
        assert json.loads(verify.stdout)["verified"] is True
        events = [json.loads(line)["event"] for line in chain.read_text().splitlines()]
        assert events.count("run.resumed") == 1 and events[-1] == "run.finished"


def test_a_lead_asks_a_question_the_officers_approved_and_verifies_its_evidence(
    tmp_path: Path, process_tag: str
) -> None:
    """`medfed budget approve` of a query file at each site, `medfed ask --follow` over the
    running consortium, then `medfed audit verify` on the query's run folder."""
    query = tmp_path / "question.toml"
    query.write_text(
        '[query]\nname = "older"\nstudy = "readmission-demo"\nepsilon = 1.0\n'
        "secure-aggregation = false\ntimeout-s = 120.0\n\n"
        '[[query.analyses]]\nkind = "count"\n\n'
        '[[query.analyses]]\nkind = "mean"\nfeature = "age"\n',
        encoding="utf-8",
    )
    with running_consortium(tmp_path, process_tag, rounds=1) as lead:
        for site in lead.sites:
            approved = lead.medfed(
                "budget", "approve", str(site.site_toml), "--study", str(query),
                "--epsilon", "1", "--officer-key", str(site.officer_key),
            )  # fmt: skip
            assert approved.returncode == 0, approved.stderr
        asked = lead.medfed("ask", str(query), "--study", str(tmp_path / "study.toml"),
                            "--consortium", str(lead.consortium), "--pki", str(lead.layout.root),
                            "--follow", "--json", timeout=600)  # fmt: skip
        assert asked.returncode == 0, asked.stderr[-3000:]
        record = json.loads(asked.stdout)
        assert record["status"] == "completed", record
        assert sorted(s["site"] for s in record["sites"]) == list(SITES)
        assert all(s["signature_checked"] for s in record["sites"])
        assert [a["kind"] for a in record["answers"]] == ["count", "mean"]
        assert record["audit_chain"]["verified"] is True
        folder = Path(record["run_folder"])
        assert (folder / "evidence.html").is_file()
        verify = lead.medfed("audit", "verify", str(folder / "audit.jsonl"), "--key",
                             str(folder / "coordinator-signing.pub"), "--json")  # fmt: skip
        assert verify.returncode == 0 and json.loads(verify.stdout)["verified"] is True
        again = lead.medfed("ask", str(query), "--study", str(tmp_path / "study.toml"),
                            "--consortium", str(lead.consortium), "--pki", str(lead.layout.root),
                            "--follow", "--json", timeout=600)  # fmt: skip
        # The approval covered the query's epsilon once: asking again is refused by both.
        assert again.returncode == 1
        refused = json.loads(again.stdout)
        assert refused["status"] == "failed" and len(refused["refused"]) == 2
        assert all("approval allows" in r["reason"] for r in refused["refused"])
