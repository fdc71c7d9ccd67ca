"""Durable file replacement: a reader sees the old file or the new one, never half of one.

`write_atomic` writes a temporary file beside the target, fsyncs it, renames it over the
target and fsyncs the folder, so the rename itself survives a power cut. On any failure
the temporary file is removed and the old file stays as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Flush `directory`'s entries (a file created or renamed in it) to disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace `path` with `data` (file mode `mode`) in one rename, durably.

    Creates the parent folder if needed. Raises `TypeError` for data that is not bytes
    and `OSError` when the folder cannot be written; the old file is untouched then.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"write_atomic({path}): expected bytes, got {type(data).__name__}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsync_directory(path.parent)


def write_text_atomic(path: Path, text: str, *, mode: int = 0o644) -> None:
    """`write_atomic` for UTF-8 text."""
    write_atomic(path, text.encode("utf-8"), mode=mode)
