"""The privacy package's exceptions: one base class, one subclass per kind of failure."""


class PrivacyError(Exception):
    """Base class of every error raised by `privacy`."""


class PkiError(PrivacyError):
    """A key or certificate could not be created, read or used."""


class LedgerError(PrivacyError):
    """The privacy ledger is unreadable, inconsistent or was asked something impossible."""


class DpConfigError(PrivacyError):
    """A differential-privacy setting is out of range or would weaken privacy silently."""


class KeyFileError(PkiError):
    """A signing or verifying key file is missing, malformed, of the wrong type or too open."""


class SigningError(PrivacyError):
    """A value cannot be signed: it has no canonical JSON form (NaN, a non-string key, ...)."""


class ApprovalError(PrivacyError):
    """An officer's approval is out of range, malformed or signed with the wrong key."""


class AuditLogError(PrivacyError):
    """The audit log cannot be read or appended to."""


class AccountingError(PrivacyError):
    """The accountant cannot compute epsilon for these events (a setting far beyond any
    meaningful guarantee, or outside what its numerics can resolve)."""


class InfeasibleBudgetError(DpConfigError):
    """No noise multiplier within bounds meets the privacy budget asked for."""


class SecAggError(PrivacyError):
    """Secure aggregation cannot proceed: a bad setting, share or key."""


class SecAggAbort(SecAggError):
    """Too few survivors or shares to unmask the round; nothing about any input is revealed."""


class UnsafeUnmaskError(SecAggError):
    """An unmasking request would reveal an input: both a site's self-mask seed and its mask key,
    or the mask key of a site whose masked update arrived."""


class BundleSignatureError(PrivacyError):
    """An app bundle is unsigned, tampered with, or signed by no key the site trusts."""
