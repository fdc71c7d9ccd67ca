"""A room's public API, imported when first used: `from medfed.model import StudyContract`
imports `medfed.model.contract` only, so naming a room's API costs nothing for the parts
not used (the site's ClientApp never imports torch through `medfed.model`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`'s `__init__`: each name in `exports`
    (name to the submodule that defines it, relative to `package`) is imported on first
    use and kept in the package."""

    def get(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        vars(importlib.import_module(package))[name] = value
        return value

    def names() -> list[str]:
        return sorted(set(exports) | set(vars(importlib.import_module(package))))

    return get, names
