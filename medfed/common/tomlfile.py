"""Reading medfed's TOML files (consortium.toml, study.toml, site.toml) with errors that
name the file and, for schema errors, the key: one place, so every file reads alike."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError


def read_toml(path: Path, error: type[Exception]) -> dict[str, Any]:
    """The TOML document at `path`; raise `error` naming the file if it cannot be read,
    is not UTF-8, or is not TOML."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{path}: is not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: is not valid TOML ({exc})") from exc


def first_problem(exc: ValidationError) -> str:
    """`key a.b: what is wrong` for the first problem pydantic found, and how many more."""
    first = exc.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
    return f"key {key}: {first['msg']}{more}"
