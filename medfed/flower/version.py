"""Which Flower medfed runs on: the internals it uses (this package) are flwr 1.42's."""

from __future__ import annotations

from importlib import metadata
from typing import Final

SUPPORTED_FLWR: Final = "1.42"
"""The flwr release line whose internals medfed's Flower door was written against."""
FLWR_HINT: Final = "pip install 'flwr==1.42.*'"


class FlowerVersionError(RuntimeError):
    """The installed flwr is missing or not the release line the door supports."""

    exit_code = 2


def flwr_version() -> str | None:
    """The installed flwr's version, or None if flwr is not installed."""
    try:
        return metadata.version("flwr")
    except metadata.PackageNotFoundError:
        return None


def require_supported_flwr(installed: str | None = None) -> str:
    """The installed flwr version; `FlowerVersionError` (one line) unless it is 1.42.x."""
    version = flwr_version() if installed is None else installed
    if version is None:
        raise FlowerVersionError(
            f"flwr is not installed; medfed needs {SUPPORTED_FLWR}.x: {FLWR_HINT}"
        )
    if version != SUPPORTED_FLWR and not version.startswith(f"{SUPPORTED_FLWR}."):
        raise FlowerVersionError(
            f"flwr {version} is installed, but medfed uses flwr {SUPPORTED_FLWR}.x internals"
            f" (its Flower door, medfed/flower): {FLWR_HINT}"
        )
    return version
