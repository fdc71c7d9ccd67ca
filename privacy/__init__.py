"""Privacy and security: DP-SGD, the accountant and ledger, the policy, secure
aggregation, signatures, audit logs, signed app bundles and the consortium's PKI.

Imports no other medfed room (only `medfed.common`).

The names below are the room's public API for the other rooms; each is imported from its
module when first used, so naming one costs nothing for the rest.
"""

if __name__ != "medfed.privacy":  # the folder is installed only as medfed.privacy
    raise ImportError(
        f"this folder is the package medfed.privacy: import medfed.privacy, not {__name__}"
    )

from typing import TYPE_CHECKING

from medfed.common.exports import lazy_exports

if TYPE_CHECKING:
    from medfed.privacy.accountant import epsilon_of as epsilon_of
    from medfed.privacy.audit import AuditLog as AuditLog
    from medfed.privacy.audit import verify_audit_log as verify_audit_log
    from medfed.privacy.bundle_signing import APP_SIGNATURE as APP_SIGNATURE
    from medfed.privacy.bundle_signing import sign_bundle as sign_bundle
    from medfed.privacy.bundle_signing import verify_bundle as verify_bundle
    from medfed.privacy.dpsgd import DpSgdSettings as DpSgdSettings
    from medfed.privacy.dpsgd import make_private as make_private
    from medfed.privacy.errors import PrivacyError as PrivacyError
    from medfed.privacy.identity import issue_identity_certificate as issue_identity_certificate
    from medfed.privacy.ledger import PrivacyLedger as PrivacyLedger
    from medfed.privacy.pki import create_ca as create_ca
    from medfed.privacy.policy import PrivacyPolicy as PrivacyPolicy
    from medfed.privacy.receipts import UpdateReceipt as UpdateReceipt
    from medfed.privacy.signing import SigningKey as SigningKey
    from medfed.privacy.signing import VerifyKey as VerifyKey

_EXPORTS = {
    "APP_SIGNATURE": "bundle_signing",
    "AuditLog": "audit",
    "DpSgdSettings": "dpsgd",
    "PrivacyError": "errors",
    "PrivacyLedger": "ledger",
    "PrivacyPolicy": "policy",
    "SigningKey": "signing",
    "UpdateReceipt": "receipts",
    "VerifyKey": "signing",
    "create_ca": "pki",
    "epsilon_of": "accountant",
    "issue_identity_certificate": "identity",
    "make_private": "dpsgd",
    "sign_bundle": "bundle_signing",
    "verify_audit_log": "audit",
    "verify_bundle": "bundle_signing",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "APP_SIGNATURE",
    "AuditLog",
    "DpSgdSettings",
    "PrivacyError",
    "PrivacyLedger",
    "PrivacyPolicy",
    "SigningKey",
    "UpdateReceipt",
    "VerifyKey",
    "create_ca",
    "epsilon_of",
    "issue_identity_certificate",
    "make_private",
    "sign_bundle",
    "verify_audit_log",
    "verify_bundle",
]
