"""`medfed site start` and `medfed site status`: the site operator's daemon commands.

A Typer sub-app; `medfed/cli.py` registers it as `site` (beside `site check`).
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from medfed.cli_common import guard, site_config, stderr, stdout

if TYPE_CHECKING:
    from medfed.client import SiteConfig

site_app = typer.Typer(
    help="The site operator's commands: check the site, run its daemon, see its status.",
    no_args_is_help=True,
)

SiteTomlArg = Annotated[Path, typer.Argument(help="The site's site.toml.", dir_okay=False)]


@site_app.command("start")
def site_start(site_toml: SiteTomlArg) -> None:
    """Run the site daemon: the site worker, the SuperNode (outbound TLS to the coordinator)
    and the warm task executor, restarted with backoff if they exit, until Ctrl-C or SIGTERM."""
    from medfed.supervisor import SiteDaemon

    config = guard(lambda: site_config(site_toml))
    daemon = guard(lambda: SiteDaemon(config))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if config.trusted_entities_path is None:
        from medfed.client.bundle_check import UNSIGNED_WARNING

        stderr.print(Text(f"WARNING: {UNSIGNED_WARNING}", style="bold red"), soft_wrap=True)
    stderr.print(
        Text(
            f"site {config.site.id}: daemon started; connecting to {daemon.superlink};"
            f" logs in {daemon.log_dir}"
        ),
        soft_wrap=True,
    )
    daemon.run(stop)
    stderr.print(Text(f"site {config.site.id}: stopped"), soft_wrap=True)


def _last_round(site_toml: Path) -> dict[str, Any] | None:
    from medfed.privacy.ledger import PrivacyLedger

    records = PrivacyLedger(site_config(site_toml).ledger_path).records()
    if not records:
        return None
    last = max(records, key=lambda record: record.recorded_at)
    return {"run_id": last.run_id, "round": last.round, "at": last.recorded_at.isoformat()}


def bundle_settings(config: SiteConfig) -> dict[str, Any]:
    """Which app bundles the site runs: its trusted-entities file, or unsigned ones too."""
    path = config.trusted_entities_path
    return {
        "trusted_entities": None if path is None else str(path),
        "unsigned_allowed": path is None and config.allows_unsigned_bundles,
        "approved_apps": list(config.coordinator.approved_apps if config.coordinator else ()),
    }


def clock_skew(config: SiteConfig, now: dt.datetime | None = None) -> str | None:
    """Why this machine's clock cannot be right, or None: a consortium certificate the
    site holds is not yet valid by it (TLS then fails with no clearer word)."""
    from medfed.privacy.errors import PrivacyError
    from medfed.privacy.pki import load_certificate

    now = now or dt.datetime.now(dt.UTC)
    paths = [config.site.identity_certificate]
    if config.coordinator is not None:
        paths.append(config.coordinator.root_certificates)
    for path in paths:
        resolved = config.optional_path(path)
        if resolved is None or not resolved.is_file():
            continue
        try:
            valid_from = load_certificate(resolved).not_valid_before_utc
        except (PrivacyError, ValueError):
            continue
        if now < valid_from:
            return (
                f"clock skew: {resolved} is valid from {valid_from.isoformat()}, but this"
                f" machine's clock says {now.isoformat(timespec='seconds')}; fix the clock (NTP)"
            )
    return None


UNREGISTERED = (
    "key not registered at the SuperLink: never registered, or the site was revoked (the"
    " SuperLink answers alike); ask the consortium lead (a revoked site needs a new kit)"
)


def link_state(
    config: SiteConfig, *, running: bool, connected: bool, unregistered: bool = False
) -> str:
    """The daemon's link in one phrase: connected, or the first cause found for not."""
    from medfed.client.worker_rpc import WorkerClient, worker_socket_path

    if not running:
        return "daemon not running"
    skew = clock_skew(config)
    if skew is not None:
        return skew
    if unregistered and not connected:
        return UNREGISTERED
    if not WorkerClient(worker_socket_path(config)).ping(timeout_s=2.0):
        return "worker unreachable (it does not answer on its socket; see logs/worker.log)"
    return "connected" if connected else "not connected (see logs/supernode.log)"


def site_status_document(site_toml: Path) -> dict[str, Any]:
    """What `medfed site status --json` prints: processes, connection, last round, budget."""
    from medfed.budget import budget_summary
    from medfed.supervisor import lock_holder, pid_alive, read_state

    config = site_config(site_toml)
    state = read_state(config) or {}
    running = bool(state.get("running")) and pid_alive(state.get("daemon_pid"))
    children = state.get("children", {}) if running else {}
    processes = {
        name: {**child, "alive": pid_alive(child.get("pid"))}
        for name, child in children.items()
        if isinstance(child, dict)
    }
    summary = budget_summary(config).to_json()
    connected = bool(state.get("connected")) and running
    holder = lock_holder(config)
    return {
        "link": link_state(
            config,
            running=running,
            connected=connected,
            unregistered=running and bool(state.get("unregistered")),
        ),
        "lock_holder": holder,
        "site_id": config.site.id,
        "running": running,
        "daemon_pid": state.get("daemon_pid") if running else None,
        "superlink": None if config.coordinator is None else config.coordinator.superlink,
        "connected": connected,
        "processes": processes,
        "last_round": _last_round(site_toml),
        "bundles": bundle_settings(config),
        "budget": [
            {
                key: dataset[key]
                for key in (
                    "dataset",
                    "epsilon_spent",
                    "epsilon_cap",
                    "epsilon_remaining",
                    "exceeded",
                )
            }
            for dataset in summary["datasets"]  # type: ignore[attr-defined]
        ],
        "ok": running and all(child["alive"] for child in processes.values()),
    }


@site_app.command("status")
def site_status(
    site_toml: SiteTomlArg,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
) -> None:
    """The daemon's processes, its connection to the coordinator, the last round trained
    and the budget; exit 1 if the daemon or one of its processes is not running."""

    document = guard(lambda: site_status_document(site_toml))
    if as_json:
        sys.stdout.write(json.dumps(document) + "\n")
    else:
        state = "running" if document["running"] else "NOT running"
        stdout.print(
            Text(f"site {document['site_id']}: daemon {state}; {document['link']}"
                 f" (SuperLink {document['superlink']})"),
            soft_wrap=True,
        )  # fmt: skip
        if not document["running"] and document["lock_holder"] is not None:
            stdout.print(Text(f"but PID {document['lock_holder']} holds the site's lock"))
        table = Table(title="processes")
        for column in ("process", "pid", "alive", "restarts"):
            table.add_column(column)
        for name, child in document["processes"].items():
            table.add_row(name, str(child.get("pid")), str(child["alive"]), str(child["restarts"]))
        stdout.print(table)
        last = document["last_round"]
        stdout.print(
            Text("last round: none" if last is None else
                 f"last round: run {last['run_id']} round {last['round']} at {last['at']}"),
        )  # fmt: skip
        if document["bundles"]["unsigned_allowed"]:
            warning = "WARNING: this site runs UNSIGNED app bundles (allow_unsigned_bundles = true)"
            stdout.print(Text(warning, style="bold red"))
        for digest in document["bundles"]["approved_apps"]:
            warning = f"WARNING: this site runs the app bundle {digest}, not medfed's own code"
            stdout.print(Text(warning, style="bold red"))
        for budget in document["budget"]:
            stdout.print(
                Text(f"dataset {budget['dataset'][:16]}: epsilon {budget['epsilon_spent']:.3f}"
                     f" of {budget['epsilon_cap']:g}")
            )  # fmt: skip
    if not document["ok"]:
        raise typer.Exit(1)
