"""The soak run of RELIABILITY.md, end to end, with secure aggregation on (the default).

Three `medfed site start` daemons (worker, SuperNode, warm executor) behind a real TLS
SuperLink that `medfed coordinator start` runs from a provisioned PKI; `medfed round start`
submits a study of many short rounds. While it runs, a seeded random schedule injects one
fault at a time: a site crashes mid-training (its daemon and every child SIGKILLed, then
started again), a site's worker is SIGKILLed in the middle of a secure round (its daemon
restarts it), and the coordinator crashes mid-round (the SuperLink, its ServerApp and
`coordinator start` SIGKILLed; then started again and the run continued with
`medfed round resume`). Bounded in time; every process is stopped by PID afterwards.

Afterwards, against what is on disk and not the run's own summary: the final checkpoint
loads into the study's network and is the model the signed audit chain finished with;
every site's ledger verifies and its epsilon (recomputed with dp-accounting) never
decreases; every site's audit log and the coordinator's chain verify; each site spent
once per (run, round) it trained, for every round it took part in and only rounds it was
selected for; no round lists a site twice.

`MEDFED_SOAK_SEED` replays a schedule.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.client.config import SiteConfig
from medfed.client.worker import TORCH_THREADS_VARIABLE
from medfed.consortium import DemoSite, write_demo_consortium
from medfed.coordinator.checkpoints import CheckpointStore
from medfed.coordinator.consortium import load_consortium
from medfed.coordinator.results import RunResults, read_results
from medfed.model.contract import DEMO_CONTRACT
from medfed.model.network import arrays_sha256, build_model
from medfed.privacy.audit import AuditLog, verify_audit_log
from medfed.privacy.bundle_signing import TRUSTED_ENTITIES_NAME
from medfed.privacy.signing import SigningKey
from medfed.processes import ProcessGroup, free_port, tail
from medfed.provision import PkiLayout, provision
from medfed.supervisor import read_state
from tests.conftest import TEST_TAG_VARIABLE, pids_with_env
from tests.references import dp_accounting_epsilon
from tests.sitekit import ledger_of, make_study, site_config, site_public_key

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SITES = ("hospital-1", "hospital-2", "hospital-3")
ROUNDS = 8
SOAK_BUDGET_S = 210.0
"""From the first submission to the run's end, faults and recovery included."""
SEED = int(os.environ.get("MEDFED_SOAK_SEED", "20261130"))
FAULTS = ("site_crash", "worker_kill", "coordinator_crash")
TRAINING = re.compile(r"training run \S+ round (\d+)$")


@dataclass(frozen=True)
class Fault:
    kind: str
    round: int
    site: str
    delay_s: float
    """Seconds between seeing the round under way and the kill (or, for a crashed site,
    between the kill and its restart)."""


def schedule(rng: random.Random) -> list[Fault]:
    """One fault of each kind, in a random order, on random rounds at least two apart
    (the run recovers from one before the next) and before the last round (a site must
    be seen to rejoin), on random sites, after random delays."""
    kinds = list(FAULTS)
    rng.shuffle(kinds)
    spaced = [
        rounds
        for rounds in (
            (a, b, c)
            for a in range(2, ROUNDS)
            for b in range(a + 2, ROUNDS)
            for c in range(b + 2, ROUNDS)  # a round after the last fault: rejoining shows
        )
    ]
    rounds = rng.choice(spaced)
    return [
        Fault(kind, number, rng.choice(SITES), round(rng.uniform(0.2, 2.0), 2))
        for kind, number in zip(kinds, rounds, strict=True)
    ]


def _study_toml(path: Path, values: dict[str, object]) -> None:
    lines = ["[study]"]
    for key, value in values.items():
        text = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
        lines.append(f'"{key}" = {text}')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Soak:
    """The running consortium: its files, processes and the clock of the soak."""

    root: Path
    tag: str
    port: int
    consortium: Path
    layout: PkiLayout
    sites: dict[str, DemoSite]
    group: ProcessGroup
    deadline: float
    coordinator: subprocess.Popen[bytes] | None = None
    coordinator_starts: int = 0
    site_starts: dict[str, int] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)
    run: str = ""
    folder: Path = Path()
    log: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, TEST_TAG_VARIABLE: self.tag, "PYTHONUNBUFFERED": "1"}

    def note(self, what: str) -> None:
        self.log.append(f"{time.monotonic() - self.t0:7.1f} s  {what}")

    def wait(self, what: str, check: Callable[[], bool]) -> None:
        """Poll `check` until true; past the soak's deadline, fail naming what it awaited,
        the faults so far and the run's state."""
        while not check():
            if time.monotonic() > self.deadline:
                results = read_results(self.folder / "results.json") if self.run else None
                state = None if results is None else (results.status, results.rounds_completed)
                pytest.fail(
                    f"the soak overran its {SOAK_BUDGET_S:g} s waiting for {what} (seed {SEED});"
                    f" run state {state}; events:\n" + "\n".join(self.log)
                )
            self._check_run()
            time.sleep(0.1)

    def _check_run(self) -> None:
        results = self.results()
        if results is not None and results.status == "failed":
            pytest.fail(f"the run failed (seed {SEED}): {results.error}; events:\n"
                        + "\n".join(self.log))  # fmt: skip

    def results(self) -> RunResults | None:
        return read_results(self.folder / "results.json") if self.run else None

    def medfed(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "medfed", *args], env=self.env, capture_output=True,
            text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    # The coordinator.

    def start_coordinator(self) -> None:
        self.coordinator_starts += 1
        out_path = self.root / f"coordinator-{self.coordinator_starts}.out"
        with open(out_path, "wb") as out:
            self.coordinator = subprocess.Popen(
                [sys.executable, "-m", "medfed", "coordinator", "start", str(self.consortium),
                 "--pki", str(self.layout.root)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                start_new_session=True,
            )  # fmt: skip
        ready = f"ready: {len(SITES)} sites".encode()
        self.wait(f"coordinator start #{self.coordinator_starts} to be ready ({out_path})",
                  lambda: ready in out_path.read_bytes())  # fmt: skip
        self.note(f"coordinator started (pid {self.coordinator.pid})")

    def coordinator_pids(self) -> list[int]:
        """`coordinator start`, its SuperLink and any ServerApp: the coordinator's side."""
        tagged = pids_with_env(TEST_TAG_VARIABLE, self.tag)
        found = [
            pid
            for pid in tagged
            if "flower-superlink" in _cmdline(pid) or "flwr-serverapp" in _cmdline(pid)
        ]
        assert self.coordinator is not None
        return [self.coordinator.pid, *found]

    def crash_coordinator(self) -> None:
        pids = self.coordinator_pids()
        _kill(pids)
        assert self.coordinator is not None
        self.coordinator.wait(timeout=30)
        self.wait(
            "the coordinator's processes to die",
            lambda: not set(pids) & set(pids_with_env(TEST_TAG_VARIABLE, self.tag)),
        )
        self.note(f"SIGKILLed the coordinator, SuperLink and ServerApp {pids}")

    def stop_coordinator(self) -> None:
        if self.coordinator is not None and self.coordinator.poll() is None:
            self.coordinator.send_signal(signal.SIGTERM)
            try:
                self.coordinator.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill(self.coordinator_pids())

    # The sites.

    def config(self, site: str) -> SiteConfig:
        return site_config(self.sites[site].site_toml)

    def start_site(self, site: str) -> None:
        self.site_starts[site] = self.site_starts.get(site, 0) + 1
        daemon = self.group.start(
            f"{site}-{self.site_starts[site]}",
            [sys.executable, "-m", "medfed", "site", "start", str(self.sites[site].site_toml)],
            env={TORCH_THREADS_VARIABLE: "1"},  # the sites share two cores
        )
        config = self.config(site)

        def connected() -> bool:
            state = read_state(config) or {}
            return state.get("daemon_pid") == daemon.pid and bool(state.get("connected"))

        self.wait(f"{site}'s daemon to connect ({daemon.log_path})", connected)
        self.note(f"{site}'s daemon started (pid {daemon.pid}) and connected")

    def crash_site(self, site: str) -> None:
        """SIGKILL the site's daemon alone (its children get no signal from us): they must
        die with it, or the restarted daemon would run beside them."""
        state = read_state(self.config(site)) or {}
        daemon = int(state["daemon_pid"])
        children = [int(child["pid"]) for child in state["children"].values() if child["alive"]]
        _kill([daemon])
        deadline = time.monotonic() + 10
        while set(children) & set(pids_with_env(TEST_TAG_VARIABLE, self.tag)):
            assert time.monotonic() < deadline, (
                f"{site}'s children {children} outlived its SIGKILLed daemon {daemon}"
            )
            time.sleep(0.1)
        self.note(f"SIGKILLed {site}'s daemon {daemon}; its children {children} died with it")

    def stop_sites(self) -> None:
        """SIGTERM every site daemon and give each the time to stop its children."""
        for process in self.group.processes:
            if not process.died():
                process.popen.send_signal(signal.SIGTERM)
        for process in self.group.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=30)

    def kill_worker(self, site: str) -> None:
        state = read_state(self.config(site)) or {}
        pid = int(state["children"]["worker"]["pid"])
        _kill([pid])
        self.note(f"SIGKILLed {site}'s worker (pid {pid})")

    def trained_round(self, site: str) -> int:
        """The last round the site's current worker logged that it started training."""
        try:
            lines = (self.config(site).state_dir / "logs" / "worker.log").read_text().splitlines()
        except OSError:
            return 0
        rounds = [int(m.group(1)) for line in lines if (m := TRAINING.search(line))]
        return max(rounds, default=0)

    def planned_round(self) -> int:
        """The last round the coordinator's audit chain says was planned."""
        rounds = [
            int(entry["details"]["round"])
            for entry in _chain_lines(self.folder / "audit.jsonl")
            if entry.get("event") == "round.planned"
        ]
        return max(rounds, default=0)


def _chain_lines(path: Path) -> Iterator[dict[str, object]]:
    """The chain's complete lines as JSON (a line being written is skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            document = json.loads(line)
            if isinstance(document, dict):
                yield document


def _write_consortium(root: Path, port: int) -> tuple[Path, PkiLayout, dict[str, DemoSite]]:
    """consortium.toml, its PKI, demo sites wired to it (data, approval of the study, the
    coordinator's pinned key, the kit's TLS and SuperNode keys, the consortium's trusted
    app-signing key), and study.toml."""
    consortium = root / "consortium.toml"
    consortium.write_text(
        f'[consortium]\nname = "soak"\naddress = "127.0.0.1:{port}"\nrun_dir = "run"\n'
        + "".join(f'\n[[sites]]\nid = "{site}"\n' for site in SITES),
        encoding="utf-8",
    )
    layout = PkiLayout(root / "pki")
    provision(load_consortium(consortium), layout.root)
    study = make_study(
        name="soak", rounds=ROUNDS, sites=len(SITES), target_epsilon=4.0, local_steps=3,
        min_sites=2, round_timeout_s=20.0, seed=11,
    )  # fmt: skip
    coordinator_key = SigningKey.load(layout.coordinator_key).public
    demo_sites = write_demo_consortium(
        root / "sites", study, n_sites=len(SITES), seed=7, coordinator_key=coordinator_key
    )
    for site in demo_sites:
        kit = layout.site_dir(site.site_id)
        # The lead checks updates with the keys the sites sign with (the demo's).
        shutil.copyfile(site.site_toml.parent / "keys" / "site-signing.pub",
                        kit / "site-signing.pub")  # fmt: skip
        with site.site_toml.open("a", encoding="utf-8") as out:
            out.write(
                "\n[coordinator]\n"
                f'superlink = "127.0.0.1:{port}"\n'
                f'root_certificates = "{(kit / "ca.pem").resolve()}"\n'
                f'auth_private_key = "{(kit / "supernode.key").resolve()}"\n'
                "poll_interval_s = 0.2\n"
                f'trusted_entities = "{(kit / TRUSTED_ENTITIES_NAME).resolve()}"\n'
            )
    plumbing = ("results-path", "sites-root", "site-keys-dir", "run-dir", "resume", "contract",
                "coordinator-key", "app-signature")  # fmt: skip
    _study_toml(root / "study.toml",
                {k: v for k, v in study.to_run_config().items() if k not in plumbing})  # fmt: skip
    return consortium, layout, {site.site_id: site for site in demo_sites}


def _inject(soak: Soak, fault: Fault) -> None:
    """Wait until `fault`'s round is under way where it strikes, then strike and recover."""
    if fault.kind == "coordinator_crash":
        soak.wait(f"round {fault.round} to be planned", lambda: soak.planned_round() >= fault.round)
        time.sleep(fault.delay_s)
        soak.crash_coordinator()
        soak.start_coordinator()
        resumed = soak.medfed("round", "resume", soak.run, "--consortium", str(soak.consortium),
                              "--json")  # fmt: skip
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        soak.note(
            f"resumed {soak.run} as Flower run {json.loads(resumed.stdout)['flower_run_ids']}"
        )
        return
    soak.wait(f"{fault.site} to train round {fault.round}",
              lambda: soak.trained_round(fault.site) >= fault.round)  # fmt: skip
    if fault.kind == "worker_kill":
        time.sleep(fault.delay_s / 2)  # inside the secure round: before, during or after masking
        soak.kill_worker(fault.site)
        return
    soak.crash_site(fault.site)
    time.sleep(fault.delay_s)
    soak.start_site(fault.site)


def test_soak_many_secure_rounds_with_random_kills_and_restarts(
    tmp_path: Path, process_tag: str
) -> None:
    faults = schedule(random.Random(SEED))
    port = free_port()
    consortium, layout, sites = _write_consortium(tmp_path, port)
    env = {**os.environ, TEST_TAG_VARIABLE: process_tag}
    with ProcessGroup(log_dir=tmp_path / "logs", env=env) as group:
        soak = Soak(tmp_path, process_tag, port, consortium, layout, sites, group,
                    deadline=time.monotonic() + SOAK_BUDGET_S + 60)  # + setup  # fmt: skip
        soak.faults = faults
        soak.note(f"seed {SEED}; faults {faults}")
        try:
            soak.start_coordinator()
            for site in SITES:
                soak.start_site(site)
            soak.deadline = time.monotonic() + SOAK_BUDGET_S
            started = soak.medfed("round", "start", str(tmp_path / "study.toml"), "--consortium",
                                  str(consortium), "--pki", str(layout.root), "--json")  # fmt: skip
            assert started.returncode == 0, started.stdout + started.stderr
            document = json.loads(started.stdout)
            soak.run, soak.folder = str(document["run"]), Path(str(document["folder"]))
            soak.note(f"submitted {soak.run}")
            for fault in faults:
                _inject(soak, fault)
            soak.wait(
                "the run to complete",
                lambda: (r := soak.results()) is not None and r.status == "completed",
            )
            soak.note("the run completed")
        except BaseException:
            for path in sorted((tmp_path / "logs").glob("*.log")):
                print(f"--- {path.name}\n{tail(path, 30)}", file=sys.stderr)
            for site in SITES:
                logs = soak.config(site).state_dir / "logs"
                for name in ("worker.log", "executor.log", "supernode.log"):
                    print(f"--- {site} {name}\n{tail(logs / name, 30)}", file=sys.stderr)
            print("\n".join(soak.log), file=sys.stderr)
            raise
        finally:
            soak.stop_sites()
            soak.stop_coordinator()
    deadline = time.monotonic() + 15
    while pids_with_env(TEST_TAG_VARIABLE, process_tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pids_with_env(TEST_TAG_VARIABLE, process_tag) == [], "processes outlived the soak"
    print("\n".join(soak.log), file=sys.stderr)
    _check_after_the_soak(soak)


def _check_after_the_soak(soak: Soak) -> None:
    chain_path = soak.folder / "audit.jsonl"
    coordinator_key = soak.folder / "coordinator-signing.pub"
    verified = soak.medfed("audit", "verify", str(chain_path), "--key", str(coordinator_key),
                           "--json")  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["verified"] is True
    chain = AuditLog(chain_path, None).entries()
    events = [entry.event for entry in chain]
    assert events[-1] == "run.finished"
    assert events.count("run.resumed") == 1, "the coordinator crash was followed by one resume"

    # The final model: the last checkpoint, read on its own, is round ROUNDS's, is the model
    # the chain finished with, and loads into the study's network.
    final = CheckpointStore(soak.folder / "checkpoints.db").load()
    assert final is not None and final.round == ROUNDS
    (finished,) = [entry for entry in chain if entry.event == "run.finished"]
    assert finished.details["model_sha256"] == arrays_sha256(final.arrays)
    assert all(np.isfinite(array).all() for array in final.arrays.values())
    network = build_model("tiny", contract=DEMO_CONTRACT, seed=0)
    network.load_state_dict({name: torch.from_numpy(a) for name, a in final.arrays.items()})
    run_id = final.run_id

    # Who took part in each round, by the last aggregation the signed chain holds for it
    # (a coordinator killed after aggregating and before checkpointing aggregates again).
    participants: dict[int, list[str]] = {}
    selected: dict[int, set[str]] = {}
    for entry in chain:
        details = entry.details
        if entry.event == "round.aggregated":
            participants[int(str(details["round"]))] = [str(s) for s in details["participants"]]  # type: ignore[union-attr]
        if entry.event == "site.selected":
            selected.setdefault(int(str(details["round"])), set()).add(str(details["site"]))
    assert sorted(participants) == list(range(1, ROUNDS + 1))
    for number, sites in participants.items():
        assert len(sites) == len(set(sites)), f"round {number} lists a site twice: {sites}"
        assert len(sites) >= 2, (number, sites)
    results = soak.results()
    assert results is not None and results.status == "completed"
    assert [r.round for r in results.per_round] == list(range(1, ROUNDS + 1))
    assert {r.round: r.participants for r in results.per_round} == participants

    # A site whose worker was killed is back for a later round. (A crashed site's restart
    # was seen to reconnect, in `start_site`; the run may end before it is planned again:
    # the SuperLink holds its killed SuperNode online for up to two heartbeats.)
    for fault in soak.faults:
        if fault.kind == "worker_kill":
            later = [
                n for n, sites in participants.items() if n > fault.round and fault.site in sites
            ]
            assert later, f"{fault.site} never took part again after {fault}"

    for site in SITES:
        _check_site(soak, site, run_id, participants, selected)


def _check_site(
    soak: Soak,
    site: str,
    run_id: str,
    participants: dict[int, list[str]],
    selected: dict[int, set[str]],
) -> None:
    site_toml = soak.sites[site].site_toml
    config = site_config(site_toml)
    public = site_public_key(site_toml)
    ledger = ledger_of(site_toml)
    verification = ledger.verify(public)
    assert verification.ok, (site, verification.bad)
    rows = ledger.records()
    assert verification.rows_checked == len(rows)
    every = [(row.run_id, row.round) for row in rows]
    assert len(every) == len(set(every)), f"{site} spent twice for one release: {every}"
    # The run's training rounds, each round's metrics release, evaluations of the run,
    # and the site's noised patient count: nothing else is charged.
    others = {row.run_id for row in rows} - {run_id, f"{run_id}/metrics", f"{run_id}/evaluate"}
    assert all(other.startswith("count:") for other in others), (site, others)
    spent = [(row.run_id, row.round) for row in rows if row.run_id == run_id]
    metrics = {row.round for row in rows if row.run_id == f"{run_id}/metrics"}
    rounds = {number for _, number in spent}
    assert metrics == rounds, f"{site}: metrics released for {metrics}, trained {rounds}"
    took_part = {number for number, sites in participants.items() if site in sites}
    assert took_part <= rounds, f"{site} took part in {took_part - rounds} without a spend"
    was_selected = {number for number, sites in selected.items() if site in sites}
    assert rounds <= was_selected, f"{site} spent for {rounds - was_selected}, never selected"
    # Epsilon after each spend, by dp-accounting: it never decreases.
    epsilons = [
        dp_accounting_epsilon([row.event for row in rows[: i + 1]], rows[0].delta)
        for i in range(len(rows))
    ]
    assert epsilons == sorted(epsilons), (site, epsilons)

    site_log = verify_audit_log(config.audit_path, public)
    assert site_log.ok, (site, site_log)
    cli = soak.medfed("audit", "verify", str(config.audit_path), "--key",
                      str(site_toml.parent / "keys" / "site-signing.pub"), "--json")  # fmt: skip
    assert cli.returncode == 0 and json.loads(cli.stdout)["verified"] is True, cli.stdout
