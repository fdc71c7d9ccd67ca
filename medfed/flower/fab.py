# ruff: noqa: E402  (the flwr version is checked before any flwr internal is imported)
"""Flower app bundles (FABs), built as `flwr run` builds them.

`build_fab` is Flower's own deterministic builder (sorted files, a fixed zip date), so the
bundle medfed signs is byte-identical to the one `flwr run` submits.
"""

from __future__ import annotations

from pathlib import Path

from medfed.flower.version import require_supported_flwr

require_supported_flwr()

from flwr.cli.build import build_fab_from_disk
from flwr.supercore.fab import Fab

__all__ = ["Fab", "build_fab"]


def build_fab(app_dir: Path) -> bytes:
    """The FAB `flwr run app_dir` would submit, byte for byte."""
    return bytes(build_fab_from_disk(app_dir))
