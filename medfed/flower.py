"""What the demo and `medfed coordinator start` both need to drive Flower's own programs:
the SuperLink's command line and the `flwr` CLI's connection file, written once."""

from __future__ import annotations

from pathlib import Path

FLWR_HINT = "pip install 'flwr==1.42.*'"
START_TIMEOUT_S = 60.0


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
