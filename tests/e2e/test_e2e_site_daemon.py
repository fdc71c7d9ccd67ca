"""End to end: `medfed site start` daemons (worker, SuperNode with process isolation, warm
executor) behind a real TLS SuperLink with SuperNode authentication. A run trains; a
worker killed mid-round makes its site miss that round only; every spend is recorded once;
`medfed site status` reports the daemon; SIGTERM stops every process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from medfed.app_bundle import build_app_dir
from medfed.client.config import SITE_TOML
from medfed.consortium import write_demo_consortium
from medfed.coordinator.results import RunResults
from medfed.demo import (
    DemoOptions,
    _programs,
    _run_config,
    _start_site_daemons,
    _start_superlink,
    _submit,
    _watch,
    _write_flwr_config,
    make_bundle_signing,
)
from medfed.privacy.pki import provision_loopback
from medfed.processes import ProcessGroup
from medfed.sites.synthetic import site_ids
from medfed.supervisor import read_state
from tests.conftest import TEST_TAG_VARIABLE, pids_with_env
from tests.sitekit import make_study, site_config, spend_rows

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SITES, ROUNDS, VICTIM, KILL_ROUND = 3, 3, "hospital-2", 2


def _worker_log(sites_root: Path, site: str) -> Path:
    return sites_root / site / "state" / "logs" / "worker.log"


def _kill_worker_mid_round(sites_root: Path, stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the victim's worker once it logs that it started training KILL_ROUND."""
    while not stop.is_set():
        try:
            lines = _worker_log(sites_root, VICTIM).read_text().splitlines()
        except OSError:
            lines = []
        if any("training run" in line and line.endswith(f" round {KILL_ROUND}") for line in lines):
            state = read_state(site_config(sites_root / VICTIM / SITE_TOML)) or {}
            pid = state["children"]["worker"]["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.05)


def test_daemons_train_survive_a_killed_worker_and_spend_once(
    tmp_path: Path, process_tag: str
) -> None:
    programs = _programs(False)
    study = make_study(rounds=ROUNDS, sites=SITES, target_epsilon=3.0, local_steps=10, min_sites=2)
    sites_root, site_keys = tmp_path / "sites", tmp_path / "site-keys"
    write_demo_consortium(sites_root, study, n_sites=SITES, seed=7, site_keys_dir=site_keys)
    pki = provision_loopback(tmp_path / "pki", site_ids(SITES))
    results_path = tmp_path / "results.json"
    app_dir = build_app_dir(
        tmp_path / "app",
        {**_run_config(study, results_path, sites_root), "site-keys-dir": str(site_keys)},
    )
    env = {**os.environ, TEST_TAG_VARIABLE: process_tag, "FLWR_HOME": str(tmp_path / "flwr")}
    stop, killed = threading.Event(), []
    signing = make_bundle_signing(tmp_path / "app-signing")
    with ProcessGroup(log_dir=tmp_path / "logs", env=env) as group:
        port = _start_superlink(group, programs, tmp_path, pki, simulation=False)
        _write_flwr_config(tmp_path / "flwr", port, pki, None)
        _start_site_daemons(group, programs, port, pki, sites_root, group.env,
                            trusted_entities=signing.trusted_entities)  # fmt: skip
        killer = threading.Thread(target=_kill_worker_mid_round, args=(sites_root, stop, killed))
        killer.start()
        try:
            _submit(programs, app_dir, group.env, run_config=signing.run_config(app_dir))
            results: RunResults = _watch(
                group, results_path, DemoOptions(timeout_s=600), lambda r: None
            )
        finally:
            stop.set()
            killer.join()
        status = subprocess.run(
            [sys.executable, "-m", "medfed", "site", "status", str(sites_root / VICTIM / SITE_TOML),
             "--json"], env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        daemon_pid = group.processes[-2].pid  # the victim's daemon (sites start in order)
        os.kill(daemon_pid, signal.SIGTERM)
        group.processes[-2].popen.wait(timeout=30)
        victim_state = read_state(site_config(sites_root / VICTIM / SITE_TOML))

    assert killed, "the victim's worker was never seen training the round to kill it in"
    assert results.rounds_completed == ROUNDS
    participants = {record.round: set(record.participants) for record in results.per_round}
    everyone = set(site_ids(SITES))
    assert participants[1] == everyone
    assert participants[KILL_ROUND] == everyone - {VICTIM}
    assert VICTIM in results.per_round[KILL_ROUND - 1].rejected
    assert participants[3] == everyone, "the site must rejoin the round after"
    # Spend: exactly one ledger row per round a site trained (none for the lost round).
    for site in everyone:
        rounds = sorted(row.round for row in spend_rows(sites_root / site / SITE_TOML))
        expected = [1, 3] if site == VICTIM else [1, 2, 3]
        assert rounds == expected, (site, rounds)
    # The status command saw a running daemon whose worker had been restarted once, and
    # a SuperNode that never went down.
    assert status.returncode == 0, status.stderr
    document = json.loads(status.stdout)
    assert document["running"] and document["connected"]
    assert document["processes"]["worker"]["restarts"] == 1
    assert document["processes"]["supernode"]["restarts"] == 0
    assert document["last_round"]["round"] == 3
    # SIGTERM stopped the daemon cleanly: its state says so, and its children are gone.
    assert victim_state is not None and victim_state["running"] is False
    for child in victim_state["children"].values():
        assert child["pid"] not in pids_with_env(TEST_TAG_VARIABLE, process_tag)
