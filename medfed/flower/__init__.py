"""The one door to Flower: every use of flwr's internals and every patch medfed makes to
Flower lives in this package, behind a check of the installed flwr version.

- `medfed.flower.programs`: Flower's programs (SuperLink command line, `flwr` CLI runner,
  connection file, readiness signals, and the one log line read where Flower offers no
  other signal). Imports no flwr; this package re-exports it.
- `medfed.flower.runtime`: the SuperNode's Runtime API as the warm executor uses it.
- `medfed.flower.patches`: the shorter object-pull backoffs, idle polls and heartbeat.
- `medfed.flower.fab`: app bundles built as `flwr run` builds them, verified as a
  SuperNode verifies them.

Only Flower's public API (`flwr.app`, `flwr.clientapp`, `flwr.serverapp`) is used
elsewhere. The modules that touch internals call `require_supported_flwr()` first, so
any other flwr release fails with one line naming the version medfed needs. This package
imports no other medfed room (see the import-linter contracts in pyproject.toml).
"""

from medfed.flower.programs import (
    CONSORTIUM_CONNECTION,
    FLWR_HOME_NAME,
    START_TIMEOUT_S,
    SUPERNODE_CONNECTED_LINE,
    FlwrCommandError,
    FlwrOutput,
    check_flwr,
    run_flwr,
    superlink_argv,
    supernode_connected,
    supernode_unregistered,
    supernodes_online,
    write_connection,
)
from medfed.flower.version import (
    FLWR_HINT,
    SUPPORTED_FLWR,
    FlowerVersionError,
    flwr_version,
    require_supported_flwr,
)

__all__ = [
    "CONSORTIUM_CONNECTION",
    "FLWR_HINT",
    "FLWR_HOME_NAME",
    "START_TIMEOUT_S",
    "SUPERNODE_CONNECTED_LINE",
    "SUPPORTED_FLWR",
    "FlowerVersionError",
    "FlwrCommandError",
    "FlwrOutput",
    "check_flwr",
    "flwr_version",
    "require_supported_flwr",
    "run_flwr",
    "superlink_argv",
    "supernode_connected",
    "supernode_unregistered",
    "supernodes_online",
    "write_connection",
]
