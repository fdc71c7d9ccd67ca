"""Naming an unknown key in a configuration file, with the key that was probably meant.

The three TOML files (site.toml, consortium.toml, study.toml) are strict pydantic models:
a typo such as `local-stepz` is an unknown key *and* leaves `local-steps` missing.
`unknown_key_problem` reports the typo first, with the nearest allowed key at the same
place ("unknown key local-stepz; did you mean local-steps?").
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence

from pydantic import BaseModel, ValidationError


def unknown_key_problem(model: type[BaseModel], exc: ValidationError) -> str | None:
    """`unknown key a.b.x; did you mean a.b.y?` for the first unknown key pydantic found,
    or None if none was unknown."""
    for error in exc.errors():
        if error["type"] != "extra_forbidden":
            continue
        loc = error["loc"]
        key, parents = str(loc[-1]), loc[:-1]
        where = ".".join(str(part) for part in parents)
        named = f"{where}.{key}" if where else key
        close = difflib.get_close_matches(key, _keys_at(model, parents), n=1, cutoff=0.6)
        hint = f"; did you mean {f'{where}.{close[0]}' if where else close[0]}?" if close else ""
        return f"unknown key {named}{hint}"
    return None


def _keys_at(model: type[BaseModel], path: Sequence[int | str]) -> list[str]:
    """The keys a table at `path` (as in pydantic's `loc`) may hold."""
    current: object = model
    for part in path:
        found = _model_in(current)
        if found is None:
            return []
        if isinstance(part, int):
            current = found
            continue
        field = next((f for name, f in found.model_fields.items() if part in (name, f.alias)), None)
        if field is None:
            return []
        current = field.annotation
    found = _model_in(current)
    if found is None:
        return []
    return [field.alias or name for name, field in found.model_fields.items()]


def _model_in(annotation: object) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (itself, or inside Optional/tuple/list)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is None and not isinstance(annotation, types.UnionType):
        return None
    for argument in typing.get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None
