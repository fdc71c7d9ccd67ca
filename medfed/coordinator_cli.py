"""`medfed coordinator start | status`: the consortium's SuperLink, run from a provisioned PKI.

`start` checks the certificates' expiry, starts `flower-superlink` with TLS, SuperNode
authentication and a persistent database under the run directory, waits until it
answers over TLS, writes the `flwr` connection config, registers every provisioned
site's SuperNode key, and then supervises until interrupted; whatever it started is
stopped by PID on the way out.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medfed.common import write_atomic
from medfed.coordinator.consortium import ConsortiumConfig
from medfed.errors import MedfedError
from medfed.flower import (
    CONSORTIUM_CONNECTION,
    FLWR_HINT,
    FLWR_HOME_NAME,
    START_TIMEOUT_S,
    FlwrCommandError,
    check_flwr,
    require_supported_flwr,
    run_flwr,
    superlink_argv,
    write_connection,
)
from medfed.lifecycle import (
    REVOKED_NAME,
    is_revoked,
    record_revocation,
    registered_nodes,
    remember_node,
)
from medfed.privacy.pki import CertificateExpiry, certificate_expiry
from medfed.processes import (
    ProcessGroup,
    find_program,
    port_holders,
    port_taken,
    sessions_of,
    tagged_pids,
    tls_health_ok,
)
from medfed.provision import PkiLayout
from medfed.supervisor import pid_alive

CONNECTION = CONSORTIUM_CONNECTION
SUPERVISE_INTERVAL_S = 0.5
DATABASE_NAME = "superlink-state.db"


class CoordinatorStartError(MedfedError):
    """The SuperLink could not be started, or a site's key could not be registered."""


@dataclass(frozen=True)
class Registered:
    """A site whose SuperNode key the SuperLink now admits."""

    site_id: str
    node_id: str | None
    """None when the SuperLink's database held the key from an earlier start."""


def certificate_expiries(
    layout: PkiLayout, *, now: dt.datetime | None = None
) -> list[CertificateExpiry]:
    """The expiry of the CA's and the SuperLink's certificates."""
    return [
        certificate_expiry("CA", layout.ca_cert, now=now),
        certificate_expiry("SuperLink", layout.server_cert, now=now),
    ]


def check_certificates(layout: PkiLayout, warn: Callable[[str], None]) -> None:
    """Refuse if a certificate has expired (or expires within 0 days); warn if soon."""
    expiries = certificate_expiries(layout)
    for expiry in expiries:
        if expiry.expired:
            raise CoordinatorStartError(
                f"refusing to start: {expiry.warning}; provision a new consortium PKI"
            )
    for expiry in expiries:
        if expiry.warning is not None:
            warn(f"warning: {expiry.warning}")


def superlink_healthy(config: ConsortiumConfig, ca_cert: Path) -> bool:
    """True if the consortium's SuperLink answers health over TLS with our CA's certificate."""
    host = config.consortium.host
    if host in ("0.0.0.0", "::", "localhost"):
        host = "127.0.0.1"
    return tls_health_ok(config.consortium.port, ca_cert, host=host)


def _bind_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def write_flwr_config(config: ConsortiumConfig, layout: PkiLayout) -> Path:
    """`$FLWR_HOME/config.toml` under the run directory, naming the consortium's SuperLink."""
    address = config.consortium.address
    if config.consortium.host in ("0.0.0.0", "::"):
        address = f"127.0.0.1:{config.consortium.port}"
    return write_connection(
        config.run_dir / FLWR_HOME_NAME, name=CONNECTION, address=address, ca_cert=layout.ca_cert
    )


def _register(flwr: str, site_id: str, public_key: Path, env: dict[str, str]) -> Registered:
    try:
        output = run_flwr(
            flwr,
            ["supernode", "register", str(public_key), CONNECTION, "--name", site_id,
             "--format", "json"],
            env=env, timeout_s=120,
        )  # fmt: skip
    except FlwrCommandError as exc:
        raise CoordinatorStartError(f"registering {site_id}'s key {public_key}: {exc}") from exc
    document = output.document()
    if output.returncode != 0 or not document.get("success", True):
        if "already" in (output.stdout + output.stderr).lower():
            return Registered(site_id, None)
        raise CoordinatorStartError(
            f"registering {site_id}'s key {public_key} failed (flwr exit"
            f" {output.returncode}): {output.tail(3, 300)}"
        )
    return Registered(site_id, str(document.get("node-id", document.get("node_id", "?"))))


def start_coordinator(
    config: ConsortiumConfig,
    layout: PkiLayout,
    *,
    say: Callable[[str], None],
    warn: Callable[[str], None],
) -> None:
    """Start and supervise the SuperLink until KeyboardInterrupt; stop it on the way out."""
    require_supported_flwr()  # the ServerApp runs through medfed's Flower door
    check_certificates(layout, warn)
    for path in (layout.ca_cert, layout.server_cert, layout.server_key):
        if not path.is_file():
            raise CoordinatorStartError(f"{path} is missing; run `medfed provision` first")
    keys = layout.supernode_public_keys()
    members = {site.id for site in config.sites}
    for site_id in sorted(set(keys) - members):
        warn(f"warning: not registering {site_id}: its kit is in {layout.sites_dir}"
             f" but it is not listed in {config.source}")  # fmt: skip
    for site_id in sorted(set(keys) & members):
        if is_revoked(layout, site_id, keys[site_id]):
            warn(f"warning: not registering {site_id}: it was revoked ({REVOKED_NAME})")
            del keys[site_id]
    superlink = find_program("flower-superlink", install_hint=FLWR_HINT)
    flwr = find_program("flwr", install_hint=FLWR_HINT)
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    _reap_orphans(run_dir, warn)
    _refuse_taken_port(config)
    with ProcessGroup(log_dir=run_dir / "logs") as group:
        _remember_owner(run_dir, group.tag)
        process = group.start(
            "superlink",
            superlink_argv(
                superlink,
                ca_cert=layout.ca_cert,
                server_cert=layout.server_cert,
                server_key=layout.server_key,
                database=run_dir / DATABASE_NAME,
                host=_bind_host(config.consortium.host),
                port=config.consortium.port,
            ),
            die_with_parent=True,  # a SIGKILLed `coordinator start` leaves no SuperLink
        )
        group.wait_until_ready(
            process, lambda: superlink_healthy(config, layout.ca_cert), timeout_s=START_TIMEOUT_S
        )
        flwr_home = write_flwr_config(config, layout)
        env = {**group.env, "FLWR_HOME": str(flwr_home)}
        say(f"SuperLink serving on {config.consortium.address} (TLS, SuperNode authentication);"
            f" pid {process.pid}, log {process.log_path}")  # fmt: skip
        for site_id in sorted(set(keys) & members):
            registered = _register(flwr, site_id, keys[site_id], env)
            if registered.node_id is not None:
                remember_node(run_dir, site_id, registered.node_id)
            node = (
                "already registered" if registered.node_id is None else f"node {registered.node_id}"
            )
            say(f"registered {site_id} ({node})")
        say(f"ready: {len(set(keys) & members)} sites registered; flwr connection"
            f" '{CONNECTION}' in {flwr_home}; stop with Ctrl-C or SIGTERM")  # fmt: skip
        while True:
            group.check_alive()
            time.sleep(SUPERVISE_INTERVAL_S)


OWNER_NAME = "coordinator.owner.json"
"""`coordinator start`'s PID and its process group's tag, for the next start to reap
what a killed one left (Flower's SuperExec and ServerApp run in sessions of their own)."""


def _remember_owner(run_dir: Path, tag: str) -> None:
    document = {"pid": os.getpid(), "tag": tag}
    write_atomic(run_dir / OWNER_NAME, (json.dumps(document) + "\n").encode())


def _reap_orphans(run_dir: Path, warn: Callable[[str], None]) -> None:
    """Stop, by PID, the processes a killed `coordinator start` left behind (they carry its
    group's tag); refuse if that `coordinator start` is still running."""
    try:
        document = json.loads((run_dir / OWNER_NAME).read_text(encoding="utf-8"))
        pid, tag = int(document["pid"]), str(document["tag"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if pid != os.getpid() and pid_alive(pid):
        raise CoordinatorStartError(
            f"`coordinator start` already runs for {run_dir} (PID {pid}); stop it first"
        )
    sessions = sessions_of(tagged_pids(tag))
    orphans = list(tagged_pids(tag, sessions))
    for orphan in orphans:
        warn(f"warning: stopping PID {orphan}, left running by a coordinator that was killed")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(orphan, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while orphans and any(True for _ in tagged_pids(tag, sessions)) and time.monotonic() < deadline:
        time.sleep(0.1)


def _refuse_taken_port(config: ConsortiumConfig) -> None:
    """Never start (or report ready) while another process holds the SuperLink's port:
    its health check would answer for ours. Names the holder."""
    port = config.consortium.port
    if not port_taken(port, _bind_host(config.consortium.host)):
        return
    holders = port_holders(port)
    named = (
        "; ".join(f"PID {pid} ({command})" for pid, command in holders)
        if holders
        else "a process this user cannot see"
    )
    raise CoordinatorStartError(
        f"port {port} is already in use by {named}; stop it (or choose another port in"
        f" {config.source}) before `coordinator start`"
    )


@dataclass(frozen=True)
class CoordinatorStatus:
    """The consortium's certificates' expiry and whether its SuperLink answers."""

    address: str
    certificates: list[CertificateExpiry]
    healthy: bool
    runs: list[dict[str, object]] = field(default_factory=list)
    """Every run under the run directory: name, status, rounds (see `medfed round list`)."""

    @property
    def ok(self) -> bool:
        return self.healthy and not any(expiry.expired for expiry in self.certificates)

    def to_json(self) -> dict[str, object]:
        return {
            "address": self.address,
            "superlink_healthy": self.healthy,
            "runs": self.runs,
            "certificates": [
                {
                    "name": expiry.name,
                    "path": str(expiry.path),
                    "not_valid_after": expiry.not_valid_after.isoformat(),
                    "days_left": expiry.days_left,
                    "expired": expiry.expired,
                    "warning": expiry.warning,
                }
                for expiry in self.certificates
            ],
        }


def coordinator_status(config: ConsortiumConfig, layout: PkiLayout) -> CoordinatorStatus:
    """Read both certificates' expiry, ask the SuperLink for its health over TLS, and read
    the state of every run."""
    from medfed.runs import list_runs

    runs = []
    for run in list_runs(config):
        document = run.to_json()
        document.pop("results")
        runs.append(document)
    return CoordinatorStatus(
        config.consortium.address,
        certificate_expiries(layout),
        superlink_healthy(config, layout.ca_cert),
        runs,
    )


@dataclass(frozen=True)
class Revoked:
    """What `revoke_site` did: recorded always; unregistered when the SuperLink answered."""

    site_id: str
    revoked_at: str
    unregistered_node: str | None
    note: str

    def to_json(self) -> dict[str, object]:
        return {
            "site": self.site_id,
            "revoked_at": self.revoked_at,
            "unregistered_node": self.unregistered_node,
            "note": self.note,
        }


def revoke_site(config: ConsortiumConfig, layout: PkiLayout, site_id: str) -> Revoked:
    """Record `site_id` as revoked (no later start registers it) and unregister its
    SuperNode from the running SuperLink, which then refuses its next request."""
    entry = record_revocation(layout, site_id)
    node = registered_nodes(config.run_dir).get(site_id)
    if node is None:
        note = "no node id recorded for it: restart the SuperLink to drop its key"
        return Revoked(site_id, entry["revoked_at"], None, note)
    if not superlink_healthy(config, layout.ca_cert):
        note = "the SuperLink does not answer: its key is not registered at the next start"
        return Revoked(site_id, entry["revoked_at"], None, note)
    flwr = find_program("flwr", install_hint=FLWR_HINT)
    env = {**os.environ, "FLWR_HOME": str(write_flwr_config(config, layout))}
    try:
        check_flwr(
            flwr, ["supernode", "unregister", node, CONNECTION, "--format", "json"],
            env=env, what=f"unregistering node {node}", timeout_s=120, tail_lines=3,
        )  # fmt: skip
    except FlwrCommandError as exc:
        raise CoordinatorStartError(f"{site_id} is recorded as revoked, but {exc}") from exc
    return Revoked(site_id, entry["revoked_at"], node, "unregistered from the SuperLink")
