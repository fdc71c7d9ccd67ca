"""The SuperLink the demo starts speaks only TLS with our CA, and admits only registered keys."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import time
from pathlib import Path

import pytest

from medfed.demo import (
    CONNECTION,
    _flwr,
    _programs,
    _start_superlink,
    _write_flwr_config,
)
from medfed.flower import SUPERNODE_CONNECTED_LINE as SUPERNODE_READY
from medfed.privacy.pki import provision_loopback
from medfed.processes import ProcessGroup, free_port, log_contains, tls_health_ok
from tests.conftest import TEST_TAG_VARIABLE

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _plain_http_status(port: int) -> int | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def test_superlink_refuses_plaintext_and_strangers_certificates(
    tmp_path: Path, process_tag: str
) -> None:
    pki = provision_loopback(tmp_path / "pki", ("hospital-1", "hospital-2"))
    other_ca = provision_loopback(tmp_path / "other", ()).ca_cert
    programs = _programs(simulation=False)
    env = {TEST_TAG_VARIABLE: process_tag}
    with ProcessGroup(log_dir=tmp_path / "logs", env={**os.environ, **env}) as group:
        port = _start_superlink(group, programs, tmp_path, pki, simulation=False)

        assert tls_health_ok(port, pki.ca_cert)
        assert not tls_health_ok(port, other_ca)
        with pytest.raises(ssl.SSLCertVerificationError):
            context = ssl.create_default_context(cafile=str(other_ca))
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1"),
            ):
                pass
        assert _plain_http_status(port) != 200

        # Only hospital-1's key is registered; hospital-2 presents a valid key of its own.
        flwr_home = tmp_path / "flwr-home"
        _write_flwr_config(flwr_home, port, pki, None)
        cli_env = {**group.env, "FLWR_HOME": str(flwr_home)}
        registered = pki.sites[0]
        _flwr(programs, ["supernode", "register", str(registered.public_key), CONNECTION],
              env=cli_env, what="registering")  # fmt: skip
        nodes = {
            keys.site_id: group.start(
                keys.site_id,
                [
                    programs.supernode,
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--root-certificates",
                    str(pki.ca_cert),
                    "--auth-supernode-private-key",
                    str(keys.private_key),
                    "--node-config",
                    f'site-id="{keys.site_id}" site-dir="{tmp_path}"',
                    "--port",
                    str(free_port()),
                ],
                env={"FLWR_HOME": str(tmp_path / keys.site_id)},
            )
            for keys in pki.sites
        }
        deadline = time.monotonic() + 60
        while not log_contains(nodes["hospital-1"], SUPERNODE_READY):
            assert time.monotonic() < deadline, nodes["hospital-1"].log_path.read_text()
            time.sleep(0.2)
        time.sleep(5)  # hospital-2 tried by now, more than once
        assert not log_contains(nodes["hospital-2"], SUPERNODE_READY)
