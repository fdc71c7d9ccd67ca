# ruff: noqa: E402  (the flwr version is checked before any flwr internal is imported)
"""Flower internals that medfed's tests use as references or must set up, through the
door: Flower's own FAB verification (what a SuperNode started with `--trusted-entities`
runs), its message object trees, the task identity its runtimes stamp on messages, and
the modules the SuperNode patches change. medfed's own code does not use this module.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from medfed.flower.version import require_supported_flwr

require_supported_flwr()

import flwr.supercore.heartbeat as heartbeat_module
import flwr.supercore.inflatable.inflatable_utils as inflatable_utils
import flwr.supernode.fleet_http_connection as fleet_connection_module
import flwr.supernode.start_client_internal as supernode_internal_module
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.cli.flower_supernode import _validate_public_keys_ed25519
from flwr.supernode.start_client_internal import _verify_fab

supernode_cli_module = importlib.import_module("flwr.supernode.cli.flower_supernode")

__all__ = [
    "Fab",
    "Run",
    "TaskIdentity",
    "fleet_connection_module",
    "flower_check_trusted_keys",
    "flower_verify_fab",
    "get_all_nested_objects",
    "heartbeat_module",
    "inflatable_utils",
    "supernode_cli_module",
    "supernode_internal_module",
]


def flower_verify_fab(fab: Fab, trusted: Mapping[str, str]) -> bool:
    """Whether Flower's SuperNode accepts `fab`'s verification under `trusted` (key id to
    OpenSSH public key line)."""
    return bool(_verify_fab(fab, dict(trusted)))


def flower_check_trusted_keys(trusted: Mapping[str, str]) -> None:
    """Flower's own check of a SuperNode's trusted entities (raises if it refuses them)."""
    _validate_public_keys_ed25519(dict(trusted))
