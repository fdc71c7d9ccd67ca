"""The Flower app bundle that the coordinator ships: medfed's packages and a pyproject.

The repository's own pyproject.toml is a Flower app as well; this builds the same
app from the installed packages, so the demo works from any install, editable or not.
"""

from __future__ import annotations

import importlib
import shutil
import time
from pathlib import Path

from medfed.client import MEDFED_CLIENT_APP
from medfed.privacy import APP_SIGNATURE, SigningKey, sign_bundle

APP_PACKAGES = (
    "common",
    "flower",
    "client",
    "coordinator",
    "model",
    "privacy",
    "sites",
    "analysis",
)
SERVER_APP = "medfed.coordinator.server_app:app"
CLIENT_APP = MEDFED_CLIENT_APP

_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "medfed-app"
version = "0.1.0"
description = "medfed's coordinator and site apps"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "medfed"

[tool.flwr.app.components]
serverapp = "{server}"
clientapp = "{client}"

[tool.flwr.app.config]
{config}
"""


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def build_app_dir(dest: Path, run_config_defaults: dict[str, object]) -> Path:
    """Write the app (medfed's `__init__.py`, `medfed/<room>/` .py files, a pyproject.toml)
    under `dest`; return it. A site runs its installed medfed, so it refuses a bundle whose
    medfed files are not byte for byte its own (`medfed.client.bundle_code`)."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest / "medfed"
    root.mkdir(exist_ok=True)
    # The package's own __init__ (a site compares every shipped file with what it runs).
    shutil.copyfile(Path(importlib.import_module("medfed").__file__ or ""), root / "__init__.py")
    for package in APP_PACKAGES:
        source = Path(importlib.import_module(f"medfed.{package}").__file__ or "").parent
        shutil.copytree(
            source,
            root / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            dirs_exist_ok=True,
        )
    config = "\n".join(
        f'"{key}" = {_toml_value(value)}' for key, value in run_config_defaults.items()
    )
    (dest / "pyproject.toml").write_text(
        _PYPROJECT.format(server=SERVER_APP, client=CLIENT_APP, config=config), encoding="utf-8"
    )
    return dest


def sign_app(app_dir: Path, key: SigningKey, *, key_id: str, signed_at: int) -> str:
    """The `app-signature` run-config value for the bundle `flwr run app_dir` will submit.

    Flower builds FABs deterministically (sorted files, a fixed zip date), so the bundle
    built here is byte-identical to the one `flwr run` sends, and a site checks the
    signature against the bytes Flower delivers it.
    """
    from medfed.flower.fab import build_fab

    return sign_bundle(build_fab(app_dir), key, key_id=key_id, signed_at=signed_at)


def signature_run_config(
    app_dir: Path, key: SigningKey, *, key_id: str, signed_at: int | None = None
) -> str:
    """The `flwr run --run-config` argument that carries `app_dir`'s bundle signature
    (`app-signature="..."`; Flower fuses it over the bundle's empty default). Sign the
    folder as it will be submitted: a file added after signing changes the bundle."""
    moment = int(time.time()) if signed_at is None else signed_at
    return f'{APP_SIGNATURE}="{sign_app(app_dir, key, key_id=key_id, signed_at=moment)}"'
