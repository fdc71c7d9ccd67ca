"""The sites' public signing keys, as the coordinator holds them: one `<site id>.pub` each.

`medfed provision` writes each site's `site-signing.pub`; the lead gathers them into
one folder that the run config's `site-keys-dir` names.
"""

from __future__ import annotations

from pathlib import Path

from medfed.coordinator.errors import StudyConfigError
from medfed.privacy.errors import PrivacyError
from medfed.privacy.signing import VerifyKey

KEY_SUFFIX = ".pub"


def load_site_keys(folder: Path) -> dict[str, VerifyKey]:
    """Every `<site id>.pub` in `folder`; a folder without keys or a bad key file is an error
    naming it."""
    if not folder.is_dir():
        raise StudyConfigError(f"site-keys-dir {folder} is not a folder")
    keys: dict[str, VerifyKey] = {}
    for path in sorted(folder.glob(f"*{KEY_SUFFIX}")):
        try:
            keys[path.name.removesuffix(KEY_SUFFIX)] = VerifyKey.load(path)
        except PrivacyError as exc:
            raise StudyConfigError(f"site-keys-dir: {exc}") from exc
    if not keys:
        raise StudyConfigError(f"site-keys-dir {folder} holds no <site id>{KEY_SUFFIX} file")
    return keys
