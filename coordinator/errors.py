"""The coordinator package's exceptions."""


class CoordinatorError(Exception):
    """Base class of every error raised by `coordinator`."""


class StudyConfigError(CoordinatorError):
    """The study's settings are missing, mistyped or out of range; names the key."""


class RoundFailedError(CoordinatorError):
    """A round could not be completed (too few sites, too few valid replies)."""


class CheckpointError(CoordinatorError):
    """A checkpoint cannot be written or read back, or belongs to another run or study."""


class AuditChainError(CoordinatorError):
    """The coordinator's audit chain or its signing key cannot be used."""
