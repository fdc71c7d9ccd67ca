"""The app bundle the demo ships is the repository's Flower app, and Flower accepts it."""

from __future__ import annotations

import io
import tomllib
import zipfile
from pathlib import Path

import pytest

from medfed.app_bundle import APP_PACKAGES, CLIENT_APP, SERVER_APP, build_app_dir
from medfed.flower.fab import build_fab

REPO = Path(__file__).resolve().parents[3]


def test_the_bundle_names_the_same_components_as_the_repository() -> None:
    app = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": SERVER_APP, "clientapp": CLIENT_APP}
    rooms = [
        pattern.removeprefix("medfed/").split("/")[0]
        for pattern in app["fab-include"]
        if pattern.endswith("**/*.py")
    ]
    assert sorted(rooms) == sorted(APP_PACKAGES)


# Flower's FAB builder uses a pathspec pattern class that pathspec now deprecates.
@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")
def test_flower_builds_a_fab_of_the_packages_and_the_run_config(tmp_path: Path) -> None:
    app_dir = build_app_dir(
        tmp_path / "app", {"num-server-rounds": 2, "results-path": 'a "quoted" path', "delta": 1e-5}
    )
    fab = zipfile.ZipFile(io.BytesIO(build_fab(app_dir)))
    names = fab.namelist()
    for package in APP_PACKAGES:
        assert f"medfed/{package}/__init__.py" in names
    assert "medfed/client/client_app.py" in names and "medfed/coordinator/server_app.py" in names
    assert not any("__pycache__" in name for name in names)
    config = tomllib.loads(fab.read("pyproject.toml").decode())["tool"]["flwr"]["app"]["config"]
    assert config == {"num-server-rounds": 2, "results-path": 'a "quoted" path', "delta": 1e-5}
