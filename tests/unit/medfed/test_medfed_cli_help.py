"""Every command's `--help` works and runs nothing: the `medfed` tree walked from the
Typer app, and the benchmark modules started as `python -m medfed.bench.X --help`."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from medfed.cli import app

REPO = Path(__file__).resolve().parents[3]


def _commands(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))


COMMANDS = sorted(_commands(typer.main.get_command(app)))


def test_the_tree_has_every_documented_command() -> None:
    names = {" ".join(path) for path in COMMANDS}
    for documented in ("demo", "provision", "coordinator start", "site check", "site start",
                       "round start", "budget show", "audit verify", "report", "bench round",
                       "bench dp"):  # fmt: skip
        assert documented in names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "medfed")
def test_help_of_every_command(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert f"medfed {' '.join(path)}".strip() in " ".join(result.output.split())


def _bench_modules_with_a_main() -> list[str]:
    """The bench modules that do something when run (`if __name__ == "__main__":`)."""
    names = []
    for path in sorted((REPO / "bench").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
               for node in tree.body):  # fmt: skip
            names.append(path.stem)
    return names


BENCH_MODULES = _bench_modules_with_a_main()


def test_the_benchmarks_with_a_command_line_are_found() -> None:
    assert {"dp", "round_time", "site_load", "dp_audit"} <= set(BENCH_MODULES)


@pytest.mark.slow
@pytest.mark.parametrize("module", BENCH_MODULES)
def test_help_of_every_bench_module_starts_no_benchmark(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", f"medfed.bench.{module}", "--help"],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:"), done.stdout[:200]
    assert "{" not in done.stdout.split("usage:")[0]  # no JSON report came before the usage
