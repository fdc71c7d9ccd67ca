"""Each room's public API (`__all__`): every name resolves to what its module defines,
lazily, so a room's API never imports what the caller does not use."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

ROOMS = ("client", "coordinator", "model", "privacy", "sites")


@pytest.mark.parametrize("room", ROOMS)
def test_every_public_name_is_the_object_its_module_defines(room: str) -> None:
    package = importlib.import_module(f"medfed.{room}")
    exports = vars(package)["_EXPORTS"]
    assert sorted(package.__all__) == sorted(exports)
    for name, module in exports.items():
        defined = getattr(importlib.import_module(f"medfed.{room}.{module}"), name)
        assert getattr(package, name) is defined
    assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError, match=f"'medfed.{room}' has no attribute 'nothing'"):
        package.nothing  # noqa: B018


def test_naming_the_apis_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import medfed.client, medfed.coordinator, medfed.model, medfed.privacy, medfed.sites\n"
        "from medfed.client import ClientError\n"
        "from medfed.model import StudyContract, DEVICE_KINDS, wire\n"
        "from medfed.privacy import SigningKey, APP_SIGNATURE\n"
        "from medfed.sites import SiteError\n"
        "from medfed.coordinator import CoordinatorError\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
