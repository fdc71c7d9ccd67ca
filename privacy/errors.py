"""The privacy package's exceptions: one base class, one subclass per kind of failure."""


class PrivacyError(Exception):
    """Base class of every error raised by `privacy`."""


class PkiError(PrivacyError):
    """A key or certificate could not be created, read or used."""


class LedgerError(PrivacyError):
    """The privacy ledger is unreadable, inconsistent or was asked something impossible."""


class DpConfigError(PrivacyError):
    """A differential-privacy setting is out of range or would weaken privacy silently."""
