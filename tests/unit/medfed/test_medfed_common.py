"""The shared helpers of `medfed.common`: durable atomic writes and TOML reading."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

import medfed.common.files as files
from medfed.common import first_problem, read_toml, write_atomic, write_text_atomic


def test_write_atomic_replaces_and_sets_mode(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "secret.key"
    write_atomic(target, b"first", mode=0o600)
    write_atomic(target, b"second", mode=0o600)
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [path.name for path in target.parent.iterdir()] == ["secret.key"]


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "cert.pem"
    write_atomic(target, b"old")
    with pytest.raises(TypeError, match="expected bytes"):
        write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [path.name for path in tmp_path.iterdir()] == ["cert.pem"]


def test_a_failed_rename_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.mkdir()  # a folder where the file should go: the rename fails
    with pytest.raises(OSError):
        write_text_atomic(target, "{}")
    assert [path.name for path in tmp_path.iterdir()] == ["state.json"]
    assert target.is_dir()


def test_the_file_then_its_folder_are_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    write_atomic(tmp_path / "a.bin", b"x")
    assert synced == ["file", "folder"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'a = "unterminated', "is not valid TOML"),
        (b"\xff\xfe not text", "is not UTF-8 text"),
    ],
)
def test_read_toml_names_the_file(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "study.toml"
    path.write_bytes(content)
    with pytest.raises(LookupError, match=rf"^{path}: {expected}"):
        read_toml(path, LookupError)


def test_read_toml_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LookupError, match="cannot be read"):
        read_toml(tmp_path / "absent.toml", LookupError)
    (tmp_path / "ok.toml").write_text('[site]\nid = "h1"\n', encoding="utf-8")
    assert read_toml(tmp_path / "ok.toml", LookupError) == {"site": {"id": "h1"}}


class _Site(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    port: int


def test_first_problem_names_the_key_and_counts_the_rest() -> None:
    with pytest.raises(ValidationError) as caught:
        _Site.model_validate({"id": 3, "port": "x", "extra": 1})
    message = first_problem(caught.value)
    assert message.startswith("key id: ")
    assert message.endswith("(and 2 more problems)")


def test_site_names_sort_as_people_read_them() -> None:
    from medfed.common import natural_key

    names = ["hospital-10", "hospital-2", "site-b", "hospital-1", "hospital-1a", "site-a"]
    assert sorted(names, key=natural_key) == [
        "hospital-1",
        "hospital-1a",
        "hospital-2",
        "hospital-10",
        "site-a",
        "site-b",
    ]
