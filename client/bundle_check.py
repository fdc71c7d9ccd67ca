"""The site's check of an app bundle before its warm executor installs or runs it.

A site runs only bundles the consortium signed (`privacy.bundle_signing`): the executor
calls `BundleGate.check` with the FAB Flower delivered and the run's override config,
which carries the signature. A refused bundle is neither installed nor run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from client.errors import ClientError
from privacy.bundle_signing import APP_SIGNATURE, load_trusted_entities, verify_bundle
from privacy.errors import BundleSignatureError, KeyFileError
from privacy.signing import VerifyKey

log = logging.getLogger(__name__)


class UntrustedBundleError(ClientError):
    """The app bundle is unsigned, tampered with, or signed by a key the site does not trust."""


class BundleGate:
    """Which app bundles this site runs: those a trusted key signed (already checked ones
    are remembered by their hash)."""

    def __init__(self, trusted: Mapping[str, VerifyKey]) -> None:
        if not trusted:
            raise UntrustedBundleError("a bundle gate needs at least one trusted key")
        self._trusted = dict(trusted)
        self._verified: set[str] = set()

    @classmethod
    def load(cls, path: Path) -> BundleGate:
        """The gate of a trusted-entities file (the site kit's `trusted-entities.yaml`)."""
        try:
            return cls(load_trusted_entities(path))
        except KeyFileError as exc:
            raise UntrustedBundleError(str(exc)) from exc

    def check(self, fab_hash: str, fab: bytes, run_config: Mapping[str, object]) -> str:
        """The id of the key that signed `fab`; raise `UntrustedBundleError` if none trusted did."""
        value = run_config.get(APP_SIGNATURE, "")
        if not isinstance(value, str):
            raise UntrustedBundleError(f"run config {APP_SIGNATURE!r} is not a string")
        try:
            signer = verify_bundle(fab, value, self._trusted)
        except BundleSignatureError as exc:
            log.error("refused app bundle %s: %s", fab_hash[:12], exc)
            raise UntrustedBundleError(str(exc)) from exc
        if fab_hash not in self._verified:
            self._verified.add(fab_hash)
            log.info("app bundle %s is signed by %s", fab_hash[:12], signer)
        return signer
