"""The consortium side: the Flower ServerApp, the round loop, validation and aggregation.

Imports `medfed.model` and `medfed.privacy` (and `medfed.flower`, `medfed.common`);
never `medfed.client` or `medfed.sites`.

The names below are the room's public API for the other rooms; each is imported from its
module when first used, so naming one costs nothing for the rest.
"""

if __name__ != "medfed.coordinator":  # the folder is installed only as medfed.coordinator
    raise ImportError(
        f"this folder is the package medfed.coordinator: import medfed.coordinator, not {__name__}"
    )

from typing import TYPE_CHECKING

from medfed.common.exports import lazy_exports

if TYPE_CHECKING:
    from medfed.coordinator.consortium import ConsortiumConfig as ConsortiumConfig
    from medfed.coordinator.consortium import load_consortium as load_consortium
    from medfed.coordinator.errors import CoordinatorError as CoordinatorError
    from medfed.coordinator.results import RunResults as RunResults
    from medfed.coordinator.results import read_results as read_results
    from medfed.coordinator.study import StudySettings as StudySettings
    from medfed.coordinator.study import load_study_file as load_study_file

_EXPORTS = {
    "ConsortiumConfig": "consortium",
    "CoordinatorError": "errors",
    "RunResults": "results",
    "StudySettings": "study",
    "load_consortium": "consortium",
    "load_study_file": "study",
    "read_results": "results",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "ConsortiumConfig",
    "CoordinatorError",
    "RunResults",
    "StudySettings",
    "load_consortium",
    "load_study_file",
    "read_results",
]
