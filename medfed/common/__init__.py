"""Helpers every room shares: durable file writes and TOML reading.

The lowest layer of medfed: it imports no other medfed package, so model, privacy,
sites, client, coordinator and the CLI may all use it (see the import-linter contracts
in pyproject.toml).
"""

from medfed.common.files import fsync_directory, write_atomic, write_text_atomic
from medfed.common.names import natural_key
from medfed.common.tomlfile import first_problem, read_toml

__all__ = [
    "first_problem",
    "fsync_directory",
    "natural_key",
    "read_toml",
    "write_atomic",
    "write_text_atomic",
]
