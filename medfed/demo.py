"""`medfed demo`: a real, secured federation on loopback, start to finish.

In a temporary folder it writes a synthetic consortium (one table per hospital),
provisions a CA, the SuperLink's TLS certificate and one SuperNode key pair per
site, starts a `flower-superlink` with TLS and SuperNode authentication, registers
the sites' keys, runs one site daemon (`medfed site start`: worker, SuperNode, warm
executor) per site, and runs the study with
`flwr run`, signed with an app-signing key the demo makes and its sites trust. With
`simulation`, the same app runs on Flower's simulation runtime (Ray) behind a TLS
SuperLink instead of real SuperNodes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from medfed.analysis.query import AskQuery
from medfed.app_bundle import build_app_dir, signature_run_config
from medfed.client.config import SITE_TOML
from medfed.common import write_atomic
from medfed.consortium import (
    DEMO_POLICY,
    approve,
    demo_study,
    example_names,
    write_demo_consortium,
    write_example_consortium,
)
from medfed.coordinator.results import RunResults, read_results
from medfed.coordinator.study import StudySettings
from medfed.errors import DemoFailedError, MissingDependencyError
from medfed.flower import (
    FLWR_HINT,
    START_TIMEOUT_S,
    FlowerVersionError,
    FlwrCommandError,
    check_flwr,
    require_supported_flwr,
    superlink_argv,
    supernodes_online,
    write_connection,
)
from medfed.privacy.bundle_signing import TRUSTED_ENTITIES_NAME, trusted_entities_yaml
from medfed.privacy.pki import Provisioned, provision_loopback
from medfed.privacy.signing import SigningKey
from medfed.processes import ProcessGroup, find_program, tls_health_ok
from medfed.sites.synthetic import site_ids

log = logging.getLogger(__name__)

RAY_HINT = "pip install 'flwr[simulation]==1.42.*'"
CONNECTION = "medfed-demo"
DEMO_POLL_INTERVAL_S = 0.2
"""How often the demo's busy SuperNodes ask for work (a site's default: 1 s)."""
"""What flwr 1.42's SuperNode logs once the SuperLink accepted its key over TLS."""


MAX_SITE_DAEMONS = 64
"""The most site daemons (three processes each) a demo starts on one machine."""
MAX_SIMULATED_SITES = 256
"""The most virtual sites a simulated demo runs (`medfed bench scale` goes to 200)."""


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs."""

    sites: int = 3
    rounds: int = 3
    simulation: bool = False
    local_steps: int = 30
    target_epsilon: float = 3.0
    seed: int = 7
    timeout_s: float = 900.0
    keep: bool = False
    example: str | None = None
    """An example study of `examples/consortium` (e.g. `lung`): its own sites and contract
    instead of the synthetic hospitals (`sites`, `local_steps` and `target_epsilon` are then
    the study's own)."""
    secure_aggregation: bool = True
    """Off (`--no-secure-aggregation`): the coordinator sees each site's update; for
    measuring what secure aggregation costs (`medfed bench secagg --demo-rounds`)."""

    def __post_init__(self) -> None:
        most = MAX_SIMULATED_SITES if self.simulation else MAX_SITE_DAEMONS
        if not 1 <= self.sites <= most:
            raise ValueError(f"--sites must be between 1 and {most}, got {self.sites}")
        if not 1 <= self.rounds <= 1000:
            raise ValueError(f"--rounds must be between 1 and 1000, got {self.rounds}")
        if self.example is not None and self.example not in example_names():
            raise ValueError(
                f"--example must be one of {list(example_names())}, got {self.example!r}"
            )
        if self.example is not None and self.simulation:
            raise ValueError("--example runs the sites as daemons; it cannot use --simulation")
        if self.example is not None and not self.secure_aggregation:
            raise ValueError(
                "--no-secure-aggregation applies to the synthetic hospitals only, not --example"
            )
        if not 0 < self.target_epsilon <= DEMO_POLICY.epsilon_cap:
            raise ValueError(
                f"--epsilon must be in (0, {DEMO_POLICY.epsilon_cap:g}], got {self.target_epsilon}"
            )


PLAIN_AGGREGATION_WARNING = (
    "WARNING: SECURE AGGREGATION IS OFF (--no-secure-aggregation): the coordinator sees each"
    " site's (DP-noised) update, not only their sum. Use this only to measure what secure"
    " aggregation costs."
)


def privacy_warnings(options: DemoOptions) -> list[str]:
    """The loud lines the demo prints before it starts, for settings that weaken privacy."""
    return [] if options.secure_aggregation else [PLAIN_AGGREGATION_WARNING]


def synthetic_study(options: DemoOptions) -> StudySettings:
    """The synthetic hospitals' study as `options` asks, secure aggregation included. Built
    before the sites approve it: an officer's approval binds the study's digest."""
    study = demo_study(
        rounds=options.rounds,
        sites=options.sites,
        target_epsilon=options.target_epsilon,
        seed=options.seed,
        local_steps=options.local_steps,
    )
    if options.secure_aggregation:
        return study
    return StudySettings.from_run_config({**study.to_run_config(), "secure-aggregation": False})


Progress = Callable[[RunResults], None]
APP_SIGNING_KEY_ID = "medfed-demo"
"""The id under which the demo's sites trust its app-signing key."""


@dataclass(frozen=True)
class BundleSigning:
    """The demo's app-signing key and the trusted-entities file its sites check with."""

    key: SigningKey
    trusted_entities: Path

    def run_config(self, app_dir: Path) -> str:
        """The `flwr run --run-config` argument that signs the bundle of `app_dir`."""
        return signature_run_config(app_dir, self.key, key_id=APP_SIGNING_KEY_ID)


def make_bundle_signing(folder: Path) -> BundleSigning:
    """A fresh app-signing key, and a trusted-entities file (in `folder`) trusting it."""
    key = SigningKey.generate()
    trusted = folder / TRUSTED_ENTITIES_NAME
    write_atomic(trusted, trusted_entities_yaml({APP_SIGNING_KEY_ID: key.public}).encode())
    return BundleSigning(key, trusted)


@dataclass(frozen=True)
class _Programs:
    superlink: str
    supernode: str
    flwr: str


def _programs(simulation: bool) -> _Programs:
    programs = _Programs(
        superlink=find_program("flower-superlink", install_hint=FLWR_HINT),
        supernode=find_program("flower-supernode", install_hint=FLWR_HINT),
        flwr=find_program("flwr", install_hint=FLWR_HINT),
    )
    if simulation and importlib.util.find_spec("ray") is None:
        raise MissingDependencyError(f"--simulation needs Ray; install it with: {RAY_HINT}")
    return programs


def _run_config(study: StudySettings, results_path: Path, sites_root: Path) -> dict[str, object]:
    return {
        **study.to_run_config(),
        "results-path": str(results_path),
        # The coordinator's checkpoints and audit chain, beside the results: a run folder
        # that `medfed report` renders (kept with --keep).
        "run-dir": str(results_path.parent),
        "sites-root": str(sites_root),
    }


def _write_flwr_config(
    flwr_home: Path, port: int, pki: Provisioned, num_supernodes: int | None
) -> None:
    write_connection(
        flwr_home,
        name=CONNECTION,
        address=f"127.0.0.1:{port}",
        ca_cert=pki.ca_cert,
        num_supernodes=num_supernodes,
    )


def _flwr(programs: _Programs, args: list[str], *, env: dict[str, str], what: str) -> str:
    """Run one `flwr` CLI command; its output, or a `DemoFailedError` with its last lines."""
    try:
        return check_flwr(programs.flwr, args, env=env, what=what, timeout_s=120, tail_lines=8)
    except FlwrCommandError as exc:
        raise DemoFailedError(str(exc)) from exc


def _start_superlink(
    group: ProcessGroup, programs: _Programs, work: Path, pki: Provisioned, *, simulation: bool
) -> int:
    """Start a TLS SuperLink on a free loopback port; return the port once it is healthy."""

    def argv(port: int) -> list[str]:
        return superlink_argv(
            programs.superlink,
            ca_cert=pki.ca_cert,
            server_cert=pki.server_cert,
            server_key=pki.server_key,
            database=work / "superlink-state.db",
            host="127.0.0.1",
            port=port,
            simulation=simulation,
        )

    _, port = group.start_on_free_port(
        "superlink", argv, lambda port, _: tls_health_ok(port, pki.ca_cert),
        timeout_s=START_TIMEOUT_S,
    )  # fmt: skip
    return port


def _start_site_daemons(
    group: ProcessGroup,
    programs: _Programs,
    port: int,
    pki: Provisioned,
    sites_root: Path,
    env: dict[str, str],
    *,
    trusted_entities: Path,
    approved_apps: Sequence[str] = (),
) -> None:
    """Register every site's key, run `medfed site start` for each site (worker, SuperNode
    and warm executor, as a hospital runs them, running only bundles signed by a key in
    `trusted_entities`, and other apps only in `approved_apps`), and wait until the
    SuperLink lists every site's node online."""
    import sys

    from medfed.client.config import load_site_config
    from medfed.client.worker import TORCH_THREADS_VARIABLE

    nodes: dict[str, str] = {}
    for keys in pki.sites:
        registered = _flwr(
            programs,
            ["supernode", "register", str(keys.public_key), CONNECTION, "--format", "json"],
            env=env, what=f"registering {keys.site_id}'s key with the SuperLink",
        )  # fmt: skip
        nodes[keys.site_id] = _node_id(registered, keys.site_id)
    for keys in pki.sites:
        site_toml = sites_root / keys.site_id / SITE_TOML
        with site_toml.open("a", encoding="utf-8") as out:
            out.write(
                "\n[coordinator]\n"
                f'superlink = "127.0.0.1:{port}"\n'
                f'root_certificates = "{pki.ca_cert.resolve()}"\n'
                f'auth_private_key = "{keys.private_key.resolve()}"\n'
                f"poll_interval_s = {DEMO_POLL_INTERVAL_S}\n"
                f'trusted_entities = "{trusted_entities.resolve()}"\n'
            )
            if approved_apps:
                out.write(f"approved_apps = {json.dumps(list(approved_apps))}\n")
        load_site_config(site_toml)  # a site.toml the daemon would refuse fails here, named
        group.start(
            keys.site_id,
            [sys.executable, "-m", "medfed", "site", "start", str(site_toml)],
            env={**env, TORCH_THREADS_VARIABLE: "1"},  # several sites share this machine's cores
        )
    _wait_until_online(group, programs, env, nodes, timeout_s=START_TIMEOUT_S * len(nodes))


def _node_id(registered: str, site_id: str) -> str:
    """The node id `flwr supernode register --format json` printed."""
    try:
        document = json.loads(registered)
        return str(document["node-id"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DemoFailedError(
            f"registering {site_id}'s key answered something unexpected: {registered[:200]}"
        ) from exc


def _wait_until_online(
    group: ProcessGroup,
    programs: _Programs,
    env: dict[str, str],
    nodes: dict[str, str],
    *,
    timeout_s: float,
) -> None:
    """Wait until the SuperLink lists every site's node online (Flower's own signal,
    `flwr supernode list --format json`); fail early, naming it, if a daemon exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        group.check_alive()
        try:
            online = supernodes_online(programs.flwr, env=env, connection=CONNECTION)
        except FlwrCommandError as exc:
            raise DemoFailedError(str(exc)) from exc
        waiting = sorted(site for site, node in nodes.items() if node not in online)
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise DemoFailedError(
                f"the SuperLink did not list {', '.join(waiting)} online within"
                f" {timeout_s:g} s (see each site's logs)"
            )
        time.sleep(0.5)


def _submit(
    programs: _Programs, app_dir: Path, env: dict[str, str], *, run_config: str | None
) -> str:
    """Submit `app_dir` (with `run_config` as `--run-config`, e.g. its signature); the run id."""
    overrides = [] if run_config is None else ["--run-config", run_config]
    output = _flwr(
        programs,
        ["run", str(app_dir), CONNECTION, *overrides, "--format", "json"],
        env=env,
        what="submitting the run",
    )
    try:
        document = json.loads(output)
        return str(document["run-id"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DemoFailedError(
            f"flwr run answered something unexpected: {output.strip()[:200]}"
        ) from exc


def _watch(
    group: ProcessGroup, results_path: Path, options: DemoOptions, progress: Progress
) -> RunResults:
    deadline = time.monotonic() + options.timeout_s
    last_seen = -1
    while time.monotonic() < deadline:
        group.check_alive()
        results = read_results(results_path)
        if results is not None:
            if results.rounds_completed != last_seen or results.status in ("completed", "failed"):
                last_seen = results.rounds_completed
                progress(results)
            if results.status == "completed":
                return results
            if results.status == "failed":
                raise DemoFailedError(f"the run failed: {results.error}")
        time.sleep(0.25)
    raise DemoFailedError(f"the run did not finish within {options.timeout_s:g} s")


COORDINATOR_KEY = "coordinator/coordinator-signing.key"


def _coordinator_key(work: Path) -> SigningKey:
    """The key the demo's coordinator signs round announcements with; sites pin it."""
    key = SigningKey.generate()
    key.save(work / COORDINATOR_KEY)
    return key


@dataclass(frozen=True)
class Federation:
    """A running demo federation: its SuperLink, its site daemons (unless simulated) and
    the study's signed app, ready to submit (`demo_federation`)."""

    options: DemoOptions
    group: ProcessGroup
    programs: _Programs
    env: dict[str, str]
    app_dir: Path
    signing: BundleSigning
    results_path: Path
    study: StudySettings
    work: Path

    def submit(self) -> str:
        """Submit the study as a new run (its results replace any earlier run's); the
        Flower run id."""
        self.results_path.unlink(missing_ok=True)
        run_config = self.signing.run_config(self.app_dir)
        return _submit(self.programs, self.app_dir, self.env, run_config=run_config)

    def watch(self, progress: Progress) -> RunResults:
        """Wait until the submitted run completes (`DemoFailedError` if it fails)."""
        return _watch(self.group, self.results_path, self.options, progress)

    def ask(self, query: AskQuery, *, timeout_s: float = 300.0) -> dict[str, object]:
        """Have each site's officer approve `query` (the demo plays them), submit it as a
        query run, wait for its answers and write its evidence record; the record."""
        from medfed.asks import ask_run_config, wait_for_answers, write_evidence

        approve_query_everywhere(self.work / "sites", query)
        folder = self.work / "asks" / f"{query.name}-{time.strftime('%Y%m%dT%H%M%S')}"
        folder.mkdir(parents=True, exist_ok=False)
        config = {
            **ask_run_config(self.study, query, folder),
            "site-keys-dir": str(self.work / "site-keys"),
            "coordinator-key": str(self.work / COORDINATOR_KEY),
        }
        app_dir = build_app_dir(folder / "app", config)
        _submit(self.programs, app_dir, self.env, run_config=self.signing.run_config(app_dir))
        answers = wait_for_answers(folder, timeout_s=timeout_s, alive=self.group.check_alive)
        return write_evidence(folder, answers)


def approve_query_everywhere(sites_root: Path, query: AskQuery) -> None:
    """Every demo site's officer approves `query` up to its epsilon."""
    for site_toml in sorted(sites_root.glob(f"*/{SITE_TOML}")):
        officer = SigningKey.load(site_toml.parent / "officer" / "officer.key")
        approve(site_toml, query, epsilon=query.epsilon, officer_key=officer)


def run_demo_ask(
    options: DemoOptions, query: AskQuery, *, notify: Callable[[str], None] = log.warning
) -> dict[str, object]:
    """Start the demo's federation, ask `query` of its sites instead of training, and
    return the evidence record; stop every process it started, whatever happens."""
    with demo_federation(options, notify=notify) as federation:
        if federation.study.name != query.study:
            raise DemoFailedError(
                f"the query reads study {query.study!r}; this demo's study is"
                f" {federation.study.name!r} (use --example {query.study} if it is one)"
            )
        from medfed.analysis.query import QueryError, check_against
        from medfed.model.query_names import query_names

        try:
            check_against(query, query_names(federation.study.contract))
        except QueryError as exc:
            raise DemoFailedError(str(exc)) from exc
        return federation.ask(query, timeout_s=options.timeout_s)


def run_demo(
    options: DemoOptions, progress: Progress, *, notify: Callable[[str], None] = log.warning
) -> RunResults:
    """Run the whole demo; stop every process it started, whatever happens."""
    with demo_federation(options, notify=notify) as federation:
        run_id = federation.submit()
        log.info("submitted run %s", run_id)
        return federation.watch(progress)


@contextlib.contextmanager
def demo_federation(
    options: DemoOptions, *, notify: Callable[[str], None] = log.warning
) -> Iterator[Federation]:
    """Start the demo's federation; stop every process it started when the block ends,
    whatever happens (its files are kept, and named, if the block failed or `keep`)."""
    for line in privacy_warnings(options):
        notify(line)
    programs = _programs(options.simulation)
    try:
        require_supported_flwr()
    except FlowerVersionError as exc:
        raise MissingDependencyError(str(exc)) from exc
    work = Path(tempfile.mkdtemp(prefix="medfed-demo-"))
    succeeded = False
    try:
        sites_root = work / "sites"
        site_keys = work / "site-keys"
        coordinator_key = _coordinator_key(work)
        if options.example is not None:
            study, demo_sites = write_example_consortium(
                sites_root,
                options.example,
                site_keys_dir=site_keys,
                rounds=options.rounds,
                coordinator_key=coordinator_key.public,
            )
            names = tuple(site.site_id for site in demo_sites)
        else:
            study = synthetic_study(options)
            write_demo_consortium(
                sites_root,
                study,
                n_sites=options.sites,
                seed=options.seed,
                site_keys_dir=site_keys,
                coordinator_key=coordinator_key.public,
            )
            names = site_ids(options.sites)
        pki = provision_loopback(work / "pki", names)
        flwr_home = work / "flwr-home"
        env = {"FLWR_HOME": str(flwr_home)}
        results_path = work / "run" / "results.json"
        app_dir = build_app_dir(
            work / "app",
            {
                **_run_config(study, results_path, sites_root),
                "site-keys-dir": str(site_keys),
                "coordinator-key": str(work / COORDINATOR_KEY),
            },
        )
        signing = make_bundle_signing(work / "app-signing")
        with ProcessGroup(log_dir=work / "logs") as group:
            port = _start_superlink(group, programs, work, pki, simulation=options.simulation)
            _write_flwr_config(flwr_home, port, pki, len(names) if options.simulation else None)
            full_env = {**group.env, **env}
            if not options.simulation:
                _start_site_daemons(group, programs, port, pki, sites_root, full_env,
                                    trusted_entities=signing.trusted_entities)  # fmt: skip
            yield Federation(options, group, programs, full_env, app_dir, signing, results_path,
                             study, work)  # fmt: skip
        succeeded = True
    finally:
        if succeeded and not options.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            notify(f"the demo's files and logs are kept in {work}")
