"""Flower's programs as medfed drives them: the SuperLink's command line, the `flwr` CLI's
connection file, one runner for `flwr` CLI commands, and how to tell that a program is
ready, each written once.

Readiness comes from Flower's own signals where it offers them: the SuperLink answers
`GET /health` (`medfed.processes.tls_health_ok`), and `flwr supernode list --format json`
says which SuperNodes are online. A site's daemon cannot ask the SuperLink's Control API,
and Flower 1.42 has no other signal that a SuperNode authenticated: there, and only
there, its log line `SuperNode ID: ...` is read (`supernode_connected`)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 60.0
CONSORTIUM_CONNECTION = "medfed-consortium"
"""The `flwr` CLI's name for the consortium's SuperLink (in `$FLWR_HOME/config.toml`)."""
FLWR_HOME_NAME = "flwr-home"
"""The `$FLWR_HOME` folder under a consortium's run directory."""


def superlink_argv(
    program: str,
    *,
    ca_cert: Path,
    server_cert: Path,
    server_key: Path,
    database: Path,
    host: str,
    port: int,
    simulation: bool = False,
) -> list[str]:
    """`flower-superlink` with TLS, a persistent database, no run-time installs, and
    SuperNode authentication (or, for a simulation, the simulation runtime)."""
    return [
        program,
        "--ssl-ca-certfile", str(ca_cert),
        "--ssl-certfile", str(server_cert),
        "--ssl-keyfile", str(server_key),
        "--database", str(database),
        "--host", host,
        "--port", str(port),
        "--disable-runtime-dependency-installation",
        *(["--simulation"] if simulation else ["--enable-supernode-auth"]),
    ]  # fmt: skip


def write_connection(
    flwr_home: Path, *, name: str, address: str, ca_cert: Path, num_supernodes: int | None = None
) -> Path:
    """`$FLWR_HOME/config.toml` with one TLS connection `name` (the default); return FLWR_HOME."""
    lines = [
        "[superlink]",
        f'default = "{name}"',
        "",
        f"[superlink.{name}]",
        f'address = "{address}"',
        f'root-certificates = "{ca_cert.resolve()}"',
    ]
    if num_supernodes is not None:
        lines.append(f"options.num-supernodes = {num_supernodes}")
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return flwr_home


class FlwrCommandError(Exception):
    """A `flwr` CLI command could not be run, or exited non-zero; the message says which
    command and ends with the last lines it printed."""


@dataclass(frozen=True)
class FlwrOutput:
    """What one `flwr` CLI command printed, and how it exited."""

    returncode: int
    stdout: str
    stderr: str

    def tail(self, lines: int = 4, chars: int = 400) -> str:
        """The last `lines` lines of its output (stdout, then stderr), on one line."""
        text = (self.stdout + self.stderr).strip().splitlines()[-lines:]
        return " ".join(text)[:chars]

    def document(self) -> dict[str, Any]:
        """The JSON object `--format json` printed on stdout; {} if it printed none."""
        try:
            parsed = json.loads(self.stdout)
        except json.JSONDecodeError:
            return {}
        return parsed if isinstance(parsed, dict) else {}


def run_flwr(
    program: str, args: Sequence[str], *, env: Mapping[str, str], timeout_s: float = 180.0
) -> FlwrOutput:
    """Run `program args` (the `flwr` CLI) with stdin closed and its output captured.

    Raises `FlwrCommandError` when it cannot be started or runs past `timeout_s`; a
    non-zero exit is returned, for the caller to judge (see `check_flwr`).
    """
    try:
        completed = subprocess.run(
            [program, *args], env=dict(env), capture_output=True, text=True,
            timeout=timeout_s, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FlwrCommandError(f"flwr {' '.join(args[:2])}: could not be run ({exc})") from exc
    return FlwrOutput(completed.returncode, completed.stdout, completed.stderr)


def check_flwr(
    program: str,
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    what: str,
    timeout_s: float = 180.0,
    tail_lines: int = 4,
) -> str:
    """Run one `flwr` CLI command; its stdout, or `FlwrCommandError` naming `what` with
    the exit code and its last lines."""
    try:
        output = run_flwr(program, args, env=env, timeout_s=timeout_s)
    except FlwrCommandError as exc:
        raise FlwrCommandError(f"{what}: {exc}") from exc
    if output.returncode != 0:
        raise FlwrCommandError(
            f"{what} failed (flwr exit {output.returncode}): {output.tail(tail_lines)}"
        )
    return output.stdout


SUPERNODE_CONNECTED_LINE = "SuperNode ID:"
"""What flwr 1.42's SuperNode logs once the SuperLink accepted it (authenticated, TLS)."""


def supernode_connected(log_text: str) -> bool:
    """Whether a SuperNode's log says the SuperLink accepted it (see the module's note)."""
    return SUPERNODE_CONNECTED_LINE in log_text


SUPERNODE_UNREGISTERED_CODE = "[code: 2004]"
"""flwr 1.42's error when the SuperLink knows no node for the SuperNode's key
(`FLEET_NODE_ACTIVATION_FAILED`): never registered, or unregistered (a revoked site)."""


def supernode_unregistered(log_text: str) -> bool:
    """Whether a SuperNode's log says the SuperLink refused its key as unregistered; the
    SuperLink answers alike for a key never registered and for one a revocation removed."""
    return SUPERNODE_UNREGISTERED_CODE in log_text and not supernode_connected(log_text)


def supernodes_online(program: str, *, env: Mapping[str, str], connection: str) -> set[str]:
    """The node ids the SuperLink lists as online (`flwr supernode list --format json`);
    raises `FlwrCommandError` if the SuperLink cannot be asked."""
    stdout = check_flwr(
        program, ["supernode", "list", connection, "--format", "json"], env=env,
        what="listing the SuperNodes", timeout_s=60,
    )  # fmt: skip
    try:
        nodes = json.loads(stdout).get("nodes", [])
    except (json.JSONDecodeError, AttributeError) as exc:
        raise FlwrCommandError(f"flwr supernode list answered no JSON: {stdout[:200]}") from exc
    return {str(node.get("node-id")) for node in nodes if node.get("status") == "online"}
