"""The site's check of an app bundle before its warm executor installs or runs it.

A site runs only bundles the consortium signed (`privacy.bundle_signing`): the executor
calls `BundleGate.check` with the FAB Flower delivered and the run's override config
(`flwr run --run-config`), which carries the signature. A refused bundle is neither
installed nor run; the task is answered with an error reply (`ERROR_CODE_BUNDLE_REFUSED`)
and the refusal is written to the site's audit log (`BUNDLE_REFUSED`).

Which keys a site trusts is site.toml's `[coordinator] trusted_entities`; a site that
names none does not start, unless it sets `allow_unsigned_bundles = true`, which is
warned loudly at every start and every task (`bundle_gate_of`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path

from medfed.client.config import SiteConfig, SiteConfigError
from medfed.client.errors import ClientError
from medfed.privacy.bundle_signing import APP_SIGNATURE, load_trusted_entities, verify_bundle
from medfed.privacy.errors import BundleSignatureError, KeyFileError
from medfed.privacy.signing import VerifyKey

log = logging.getLogger(__name__)

ERROR_CODE_BUNDLE_REFUSED = 4004
"""The error code of a reply in which the site refuses to run the task's app bundle."""
BUNDLE_REFUSED = "bundle.refused"
"""The audit event of a refused bundle: details `fab_hash`, `run_id` and `reason`."""
UNSIGNED_WARNING = (
    "UNSIGNED APP BUNDLES ALLOWED: site.toml sets allow_unsigned_bundles = true, so this"
    " site runs whatever code the coordinator (or anyone who can submit a run) sends;"
    " name [coordinator] trusted_entities instead"
)


class UntrustedBundleError(ClientError):
    """The app bundle is unsigned, tampered with, or signed by a key the site does not trust."""


class BundleGate:
    """Which app bundles this site runs: those a trusted key signed. A verified (bundle
    SHA-256, signature) pair is remembered, so a run's later tasks are not checked again."""

    def __init__(self, trusted: Mapping[str, VerifyKey]) -> None:
        if not trusted:
            raise UntrustedBundleError("a bundle gate needs at least one trusted key")
        self._trusted = dict(trusted)
        self._verified: dict[tuple[str, str], str] = {}

    @classmethod
    def load(cls, path: Path) -> BundleGate:
        """The gate of a trusted-entities file (the site kit's `trusted-entities.yaml`)."""
        try:
            return cls(load_trusted_entities(path))
        except KeyFileError as exc:
            raise UntrustedBundleError(str(exc)) from exc

    @property
    def trusted_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._trusted))

    def check(self, fab_hash: str, fab: bytes, run_config: Mapping[str, object]) -> str:
        """The id of the key that signed `fab`; raise `UntrustedBundleError` if none trusted
        did. `fab_hash` is what Flower calls the bundle (for the log); the cache is keyed
        on the SHA-256 of the bytes themselves."""
        value = run_config.get(APP_SIGNATURE, "")
        if not isinstance(value, str):
            raise UntrustedBundleError(f"run config {APP_SIGNATURE!r} is not a string")
        key = (hashlib.sha256(fab).hexdigest(), value)
        signer = self._verified.get(key)
        if signer is not None:
            return signer
        try:
            signer = verify_bundle(fab, value, self._trusted)
        except BundleSignatureError as exc:
            log.error("refused app bundle %s: %s", fab_hash[:12], exc)
            raise UntrustedBundleError(str(exc)) from exc
        self._verified[key] = signer
        log.info("app bundle %s is signed by %s", fab_hash[:12], signer)
        return signer


def bundle_gate_of(config: SiteConfig) -> BundleGate | None:
    """The site's gate from `[coordinator] trusted_entities`, or None when the site allows
    unsigned bundles (warned loudly here). A site that names no trusted entities and does
    not allow unsigned bundles is refused (`SiteConfigError` naming the file and key); a
    trusted-entities file that does not parse raises `UntrustedBundleError` naming it."""
    path = config.trusted_entities_path
    if path is not None:
        return BundleGate.load(path)
    if config.allows_unsigned_bundles:
        log.warning(UNSIGNED_WARNING)
        return None
    raise SiteConfigError(
        f"{config.source}: key coordinator.trusted_entities: not set, so this site cannot"
        " check the app bundles it is sent; point it at the kit's trusted-entities.yaml"
        " (or, for development only, set allow_unsigned_bundles = true)"
    )
