"""The device registry: one shared suite over every backend; unavailable means a clear error."""

from __future__ import annotations

import importlib
import importlib.util
from importlib.machinery import ModuleSpec

import pytest
import torch

from medfed.model import devices
from medfed.model.contract import DEMO_CONTRACT
from medfed.model.devices import BACKENDS, DEVICE_KINDS, resolve_device
from medfed.model.errors import DeviceUnavailableError
from medfed.model.network import build_model
from medfed.model.tokenizers import complete_numeric_inputs

KINDS = sorted(BACKENDS)


def test_the_registry_names_every_kind() -> None:
    assert set(BACKENDS) == DEVICE_KINDS == {"cpu", "cuda", "rbln"}
    assert all(backend.kind == kind for kind, backend in BACKENDS.items())
    assert BACKENDS["cpu"].is_available()


@pytest.mark.parametrize("kind", KINDS)
def test_an_available_backend_runs_the_model(kind: str) -> None:
    if not BACKENDS[kind].is_available():  # type: ignore[index]
        pytest.skip(f"{kind}: {BACKENDS[kind].unavailable_reason()}")  # type: ignore[index]
    device = resolve_device(kind)
    assert device.type == kind
    model = build_model("tiny", contract=DEMO_CONTRACT, seed=0, device=device)
    assert all(p.device.type == kind for p in model.parameters())
    features = torch.randn(4, len(DEMO_CONTRACT.numeric), device=device)
    logits = model(*complete_numeric_inputs(features))["readmission"]
    assert logits.device.type == kind and logits.shape == (4,)
    on_cpu = build_model("tiny", contract=DEMO_CONTRACT, seed=0)
    reference = on_cpu(*complete_numeric_inputs(features.cpu()))["readmission"]
    torch.testing.assert_close(logits.cpu(), reference, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_an_unavailable_backend_is_a_clear_one_line_error(kind: str) -> None:
    backend = BACKENDS[kind]  # type: ignore[index]
    reason = backend.unavailable_reason()
    if reason is None:
        pytest.skip(f"{kind} is available here")
    with pytest.raises(DeviceUnavailableError) as error:
        resolve_device(kind)
    message = str(error.value)
    assert message == f"device {kind!r} is not available: {reason}"
    assert "\n" not in message
    assert not backend.is_available()


def test_rbln_without_its_package_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == devices.RBLN_MODULE else real_find_spec(name, *a),
    )
    with pytest.raises(DeviceUnavailableError, match="package torch-rbln is not installed"):
        resolve_device("rbln")


def test_rbln_that_fails_to_load_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec, real_import = importlib.util.find_spec, importlib.import_module

    def find_spec(name: str, *args: object) -> ModuleSpec | None:
        if name == devices.RBLN_MODULE:
            return ModuleSpec(name, None)
        return real_find_spec(name, *args)  # type: ignore[arg-type]

    def import_module(name: str, *args: object) -> object:
        if name == devices.RBLN_MODULE:
            raise ImportError("librbln.so: cannot open shared object file\nmore detail")
        return real_import(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib, "import_module", import_module)
    with pytest.raises(DeviceUnavailableError) as error:
        resolve_device("rbln")
    assert str(error.value) == (
        "device 'rbln' is not available: torch-rbln is installed but failed to load:"
        " librbln.so: cannot open shared object file"
    )


def test_cuda_on_a_cpu_build_never_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceUnavailableError, match="CPU build without CUDA"):
        resolve_device("cuda")


def test_an_unknown_kind_lists_the_known_ones() -> None:
    with pytest.raises(
        DeviceUnavailableError, match="unknown device 'tpu'; known: cpu, cuda, rbln"
    ):
        resolve_device("tpu")
