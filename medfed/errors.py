"""Errors the CLI shows as one line (never a traceback), with the exit code they mean."""


class MedfedError(Exception):
    """An error the user can act on; `exit_code` 1 means the checked thing is wrong."""

    exit_code = 1


class MissingDependencyError(MedfedError):
    """A program or package medfed needs is not installed; the message says what to install."""


class ProcessDiedError(MedfedError):
    """A process that medfed started exited before its work was done."""


class DemoFailedError(MedfedError):
    """The demo's federation did not complete."""
