"""Shared fixtures: a process tag for the processes a test starts, and a ServerApp identity."""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.common.constant import SUPERLINK_NODE_ID

from medfed.flower.testing import TaskIdentity

TEST_TAG_VARIABLE = "MEDFED_TEST_TAG"


def pids_with_env(variable: str, value: str) -> list[int]:
    """Live (non-zombie) processes whose environment holds `variable=value`."""
    needle = f"{variable}={value}".encode()
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if needle in environ and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.fixture
def process_tag() -> Iterator[str]:
    """A unique tag for the environment of processes this test starts; afterwards, any
    process still carrying it is killed by PID (and the test has already failed if that
    matters to it)."""
    tag = uuid.uuid4().hex
    yield tag
    for pid in pids_with_env(TEST_TAG_VARIABLE, tag):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Act as a ServerApp process: Flower stamps run, node and task ids on every instruction
    `Message` from `TaskIdentity`, which its runtime sets before the app runs."""
    # The public setters cannot be undone by monkeypatch (the getters raise while unset).
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    yield
