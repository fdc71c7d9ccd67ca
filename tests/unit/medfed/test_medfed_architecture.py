"""The architecture rules are real checks: import-linter's contracts (pyproject.toml) see
the rooms through their `medfed/<room>` links and catch a deliberate violation, and no
file imports another file's private helper."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
ROOMS = ("analysis", "bench", "client", "coordinator", "model", "privacy", "sites")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _sources() -> list[Path]:
    """Every Python file of the installed package, the linked rooms included."""
    return sorted(
        path
        for path in [*(REPO / "medfed").glob("*.py"), *(REPO / "medfed").glob("*/**/*.py")]
        if "__pycache__" not in path.parts
    )


def test_the_package_covers_every_room_through_its_link() -> None:
    for room in ROOMS:
        link = REPO / "medfed" / room
        assert link.is_symlink() and link.resolve() == (REPO / room).resolve()
    files = {path.relative_to(REPO / "medfed").parts[0] for path in _sources()}
    assert set(ROOMS) <= files


def test_no_file_imports_another_files_private_name() -> None:
    offences = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("medfed")
            ):
                offences += [
                    f"{path.relative_to(REPO)}:{node.lineno}: {node.module}.{alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")
                ]
    assert offences == []


def _copy_of_the_package(root: Path) -> Path:
    for room in ("medfed", *ROOMS):
        shutil.copytree(
            REPO / room, root / room, symlinks=True,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )  # fmt: skip
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env={"PYTHONPATH": str(root)},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed")
def test_the_contracts_hold_and_catch_a_room_importing_upwards(tmp_path: Path) -> None:
    root = _copy_of_the_package(tmp_path)
    kept = _lint_imports(root)
    assert kept.returncode == 0, kept.stdout[-2000:]
    assert "Analyzed" in kept.stdout and " 0 broken" in kept.stdout

    with (root / "model" / "losses.py").open("a", encoding="utf-8") as out:
        out.write("\nfrom medfed.sites import config as _upwards  # noqa: E402\n")
    with (root / "coordinator" / "study.py").open("a", encoding="utf-8") as out:
        out.write("\nfrom medfed.client import errors as _sideways  # noqa: E402\n")
    broken = _lint_imports(root)
    assert broken.returncode == 1
    assert "medfed.model.losses -> medfed.sites.config" in broken.stdout
    assert "medfed.coordinator.study -> medfed.client.errors" in broken.stdout


@pytest.mark.slow
@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed")
def test_a_circle_between_files_is_caught(tmp_path: Path) -> None:
    root = _copy_of_the_package(tmp_path)
    with (root / "privacy" / "rdp.py").open("a", encoding="utf-8") as out:
        out.write("\nfrom medfed.privacy import accountant as _circle  # noqa: E402\n")
    broken = _lint_imports(root)
    assert broken.returncode == 1
    assert "No cycles are allowed in medfed.privacy" in broken.stdout


def test_flowers_internals_are_named_only_behind_its_door() -> None:
    # The check: grep -rn "flwr\.\(supercore\|proto\|common\.serde\|supernode\|cli\)"
    internals = re.compile(r"flwr\.(supercore|proto|common\.serde|supernode|cli)")
    door = REPO / "medfed" / "flower"
    hits = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sorted(REPO.rglob("*.py"))
        if not path.is_relative_to(door) and ".venv" not in path.parts and not path.is_symlink()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if internals.search(line)
    ]
    assert hits == []


@pytest.mark.parametrize("room", ["client", "coordinator", "model", "privacy", "sites", "bench"])
def test_a_room_does_not_import_under_its_folder_name_even_from_the_clone(room: str) -> None:
    # From the clone's root the folder is on sys.path; it still only imports as medfed.*.
    completed = subprocess.run(
        [sys.executable, "-c", f"import {room}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode != 0
    assert f"import medfed.{room}, not {room}" in completed.stderr
