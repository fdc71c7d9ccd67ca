# ruff: noqa: E402  (the flwr version is checked before any flwr internal is imported)
"""The types of Flower's `Grid` interface that are not public API in flwr 1.42: what a
wrapper of the ServerApp's grid (`medfed.coordinator.grid_retry.RetryingGrid`) must name
to keep Flower's own signatures."""

from __future__ import annotations

from medfed.flower.version import require_supported_flwr

require_supported_flwr()

from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.run import Run

__all__ = ["NodeInfo", "Run"]
