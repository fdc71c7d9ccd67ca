"""The kinds of accelerator a site may name (`site.toml`'s `accelerator`), defined once.

Kept free of torch so that configuration parsing and the egress guard can name them
without importing it; `medfed.model.devices` maps each kind to its torch backend.
"""

from __future__ import annotations

from typing import Literal, get_args

DeviceKind = Literal["cpu", "cuda", "rbln"]
DEVICE_KINDS: frozenset[str] = frozenset(get_args(DeviceKind))

__all__ = ["DEVICE_KINDS", "DeviceKind"]
