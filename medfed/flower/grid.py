# ruff: noqa: E402  (the flwr version is checked before any flwr internal is imported)
"""The types of Flower's `Grid` interface that are not public API in flwr 1.42: what a
wrapper of the ServerApp's grid (`medfed.coordinator.grid_retry.RetryingGrid`) must name
to keep Flower's own signatures; and the task identity a grid run in memory (the
benchmarks' `bench.memory_grid`) must stand in for, as Flower's runtime would."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from medfed.flower.version import require_supported_flwr

require_supported_flwr()

from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["NodeInfo", "Run", "server_identity"]

_IDENTITY = ("_run_id", "_node_id", "_task_id")


@contextlib.contextmanager
def server_identity() -> Iterator[None]:
    """Act as a ServerApp process: Flower stamps run, node and task ids on every message
    from `TaskIdentity`, which its runtime sets before a ServerApp runs; the previous
    identity comes back on exit."""
    saved = {name: TaskIdentity.__dict__.get(name) for name in _IDENTITY}
    TaskIdentity._run_id = 1
    TaskIdentity._node_id = SUPERLINK_NODE_ID
    TaskIdentity._task_id = 1
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)
