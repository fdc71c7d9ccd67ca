"""The accelerators a site can train on, behind one small explicit registry.

`resolve_device(kind)` returns the torch device or raises `DeviceUnavailableError` with
one line saying why; it never falls back to another device, so a site that asked for
an accelerator never silently trains on its CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from medfed.model.device_kinds import DEVICE_KINDS, DeviceKind
from medfed.model.errors import DeviceUnavailableError

RBLN_PACKAGE = "torch-rbln"
RBLN_MODULE = "torch_rbln"


@dataclass(frozen=True)
class Backend:
    """One kind of device: how to tell whether it is usable here and which device it is."""

    kind: DeviceKind
    description: str
    probe: Callable[[], str | None]
    """Returns None when usable, else a one-line reason."""

    def unavailable_reason(self) -> str | None:
        """Why the device cannot be used here; None when it can."""
        return self.probe()

    def is_available(self) -> bool:
        return self.unavailable_reason() is None

    def device(self) -> torch.device:
        """The torch device (the first one of its kind); raises when unavailable."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise DeviceUnavailableError(f"device {self.kind!r} is not available: {reason}")
        return torch.device(self.kind) if self.kind == "cpu" else torch.device(self.kind, 0)


def _cpu_probe() -> str | None:
    return None


def _cuda_probe() -> str | None:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU build without CUDA"
    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        return "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)"
    return None


def _rbln_probe() -> str | None:
    if importlib.util.find_spec(RBLN_MODULE) is None:
        return f"the Rebellions package {RBLN_PACKAGE} is not installed"
    try:
        importlib.import_module(RBLN_MODULE)
    except Exception as exc:  # an extension module can fail to load in many ways
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"{RBLN_PACKAGE} is installed but failed to load: {first_line}"
    rbln = getattr(torch, "rbln", None)
    if rbln is None or not rbln.is_available() or rbln.device_count() < 1:
        return f"{RBLN_PACKAGE} is loaded but sees no RBLN NPU (driver, runtime, RBLN_DEVICES)"
    return None


BACKENDS: Mapping[DeviceKind, Backend] = {
    "cpu": Backend("cpu", "the host's CPU", _cpu_probe),
    "cuda": Backend("cuda", "an NVIDIA GPU through CUDA", _cuda_probe),
    "rbln": Backend("rbln", f"a Rebellions NPU through {RBLN_PACKAGE}", _rbln_probe),
}


def resolve_device(kind: str) -> torch.device:
    """The torch device for `kind`; `DeviceUnavailableError` in one line, never a fallback."""
    if kind not in BACKENDS:
        raise DeviceUnavailableError(
            f"unknown device {kind!r}; known: {', '.join(sorted(DEVICE_KINDS))}"
        )
    return BACKENDS[kind].device()  # type: ignore[index]
