"""The coordinator package's exceptions."""


class CoordinatorError(Exception):
    """Base class of every error raised by `coordinator`."""


class StudyConfigError(CoordinatorError):
    """The study's settings are missing, mistyped or out of range; names the key."""


class RoundFailedError(CoordinatorError):
    """A round could not be completed (too few sites, too few valid replies)."""
