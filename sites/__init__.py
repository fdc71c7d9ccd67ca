"""Site data: reading a hospital's files onto the study's contract, and synthetic consortia.

Imports `medfed.model` (the data contract) and nothing else of medfed but `medfed.common`.

The names below are the room's public API for the other rooms; each is imported from its
module when first used, so naming one costs nothing for the rest.
"""

if __name__ != "medfed.sites":  # the folder is installed only as medfed.sites
    raise ImportError(
        f"this folder is the package medfed.sites: import medfed.sites, not {__name__}"
    )

from typing import TYPE_CHECKING

from medfed.common.exports import lazy_exports

if TYPE_CHECKING:
    from medfed.sites.config import DatasetConfig as DatasetConfig
    from medfed.sites.errors import DataError as DataError
    from medfed.sites.errors import DataProblem as DataProblem
    from medfed.sites.errors import SiteError as SiteError
    from medfed.sites.manifest import SiteData as SiteData
    from medfed.sites.manifest import load_site_data as load_site_data
    from medfed.sites.synthetic import site_ids as site_ids
    from medfed.sites.synthetic import write_synthetic_consortium as write_synthetic_consortium

_EXPORTS = {
    "DataError": "errors",
    "DataProblem": "errors",
    "DatasetConfig": "config",
    "SiteData": "manifest",
    "SiteError": "errors",
    "load_site_data": "manifest",
    "site_ids": "synthetic",
    "write_synthetic_consortium": "synthetic",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "DataError",
    "DataProblem",
    "DatasetConfig",
    "SiteData",
    "SiteError",
    "load_site_data",
    "site_ids",
    "write_synthetic_consortium",
]
