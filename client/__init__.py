"""The hospital side: site.toml, the site worker and trainer, the egress guard, the warm
executor and the Flower ClientApp that reaches them.

Imports `medfed.model`, `medfed.privacy`, `medfed.sites` (and `medfed.flower`,
`medfed.common`); never `medfed.coordinator`.

The names below are the room's public API for the other rooms; each is imported from its
module when first used, so naming one costs nothing for the rest.
"""

if __name__ != "medfed.client":  # the folder is installed only as medfed.client
    raise ImportError(
        f"this folder is the package medfed.client: import medfed.client, not {__name__}"
    )

from typing import TYPE_CHECKING

from medfed.common.exports import lazy_exports

if TYPE_CHECKING:
    from medfed.client.bundle_check import UNSIGNED_WARNING as UNSIGNED_WARNING
    from medfed.client.bundle_check import bundle_gate_of as bundle_gate_of
    from medfed.client.bundle_code import MEDFED_CLIENT_APP as MEDFED_CLIENT_APP
    from medfed.client.bundle_code import installed_code_mismatch as installed_code_mismatch
    from medfed.client.config import SITE_TOML as SITE_TOML
    from medfed.client.config import SiteConfig as SiteConfig
    from medfed.client.config import SiteConfigError as SiteConfigError
    from medfed.client.config import load_site_config as load_site_config
    from medfed.client.errors import ClientError as ClientError

_EXPORTS = {
    "ClientError": "errors",
    "MEDFED_CLIENT_APP": "bundle_code",
    "SITE_TOML": "config",
    "SiteConfig": "config",
    "SiteConfigError": "config",
    "UNSIGNED_WARNING": "bundle_check",
    "bundle_gate_of": "bundle_check",
    "installed_code_mismatch": "bundle_code",
    "load_site_config": "config",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "MEDFED_CLIENT_APP",
    "SITE_TOML",
    "UNSIGNED_WARNING",
    "ClientError",
    "SiteConfig",
    "SiteConfigError",
    "bundle_gate_of",
    "installed_code_mismatch",
    "load_site_config",
]
