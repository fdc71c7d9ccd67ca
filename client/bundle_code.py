"""The code a site runs is the code in the signed bundle, byte for byte.

The warm executor runs ClientApp tasks in a process that has already imported the site's
installed medfed, so a bundle whose ClientApp is medfed's (`medfed.client.client_app:app`)
runs the site's installed copy of medfed, not the files inside the bundle. A signature
over the bundle therefore says something about what runs only if the two are the same
code. Before such a bundle is loaded, `installed_code_mismatch` compares them:

- every `medfed/**.py` file in the bundle must be installed here with the same bytes;
- every installed `.py` file of the rooms the site runs (`RUNTIME_ROOMS`) and of any
  other room the bundle ships must be in the bundle (installed code nobody signed into
  the bundle would run too);
- a bundle whose ClientApp is medfed's but that carries no medfed code (a repository
  built with `flwr run .`, whose rooms sit at the top level) is refused.

Any difference refuses the bundle with the first file that differs. A bundle whose
ClientApp is not medfed's would run from its own files, so it is not compared here: the
executor refuses it unless the site approved that exact bundle (`client_app_of`).
"""

from __future__ import annotations

import importlib.util
import io
import tomllib
import zipfile
from pathlib import Path, PurePosixPath

RUNTIME_ROOMS = ("common", "flower", "client", "model", "privacy", "sites", "analysis")
"""The rooms a site's executor and ClientApp import: each must ship in a medfed bundle."""
PACKAGE = "medfed"
MEDFED_CLIENT_APP = "medfed.client.client_app:app"
"""medfed's own ClientApp: the one app a site runs without approving its bundle by hash."""


def installed_medfed() -> Path:
    """The folder of the installed `medfed` package (what this process imports)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("medfed is not importable in this process")
    return Path(next(iter(spec.submodule_search_locations)))


def _client_app_ref(bundle: zipfile.ZipFile) -> str:
    try:
        document = tomllib.loads(bundle.read("pyproject.toml").decode("utf-8"))
        return str(document["tool"]["flwr"]["app"]["components"]["clientapp"])
    except (KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError, TypeError):
        return ""


def client_app_of(fab: bytes) -> str:
    """The ClientApp the bundle `fab` names in its pyproject ("" if it names none)."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
            return _client_app_ref(bundle)
    except (zipfile.BadZipFile, KeyError):
        return ""


def _parts(name: str) -> tuple[str, ...]:
    return PurePosixPath(name).parts


def _installed_files(root: Path, room: str) -> set[str]:
    folder = root / room
    return {
        f"{PACKAGE}/{room}/{path.relative_to(folder).as_posix()}"
        for path in folder.rglob("*.py")
        if "__pycache__" not in path.parts
    }


def installed_code_mismatch(fab: bytes, installed: Path | None = None) -> str | None:
    """Why the installed medfed (under `installed`, default: this process's) is not the
    code inside the bundle `fab`; None when it is (or the ClientApp is not medfed's)."""
    root = installed_medfed() if installed is None else installed
    try:
        bundle = zipfile.ZipFile(io.BytesIO(fab))
    except zipfile.BadZipFile:
        return "the app bundle is not a zip archive"
    with bundle:
        client_app = _client_app_ref(bundle)
        if not client_app.startswith(f"{PACKAGE}."):
            return None
        shipped = {
            name
            for name in bundle.namelist()
            if name.startswith(f"{PACKAGE}/") and name.endswith(".py")
        }
        if not shipped:
            return (
                f"its ClientApp is medfed's ({client_app}) but it carries no medfed/ code, so"
                " this site would run its installed medfed, which is not what was signed"
            )
        rooms = {
            PurePosixPath(name).parts[1] for name in shipped if len(PurePosixPath(name).parts) > 2
        }
        for room in RUNTIME_ROOMS:
            if room not in rooms:
                return f"it does not carry medfed/{room}/, which this site would run unsigned"
        for name in sorted(shipped):
            path = root.joinpath(*_parts(name)[1:])
            if not path.is_file():
                return f"its {name} is not installed here (installed medfed differs)"
            if path.read_bytes() != bundle.read(name):
                return (
                    f"its {name} differs from the installed {PACKAGE} this site runs: the"
                    " consortium shipped other code than this site would run"
                )
        for room in sorted(rooms):
            unsigned = sorted(_installed_files(root, room) - shipped)
            if unsigned:
                return f"the installed {unsigned[0]} is not in the bundle, so it would run unsigned"
    return None
