"""Flower's app classes, imported through the door so that every `flwr.cli*` name in
medfed's code sits in this package (`flwr.clientapp` is Flower's public API)."""

from __future__ import annotations

from flwr.clientapp import ClientApp

__all__ = ["ClientApp"]
