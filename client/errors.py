"""The client package's exceptions."""


class ClientError(Exception):
    """Base class of every error raised by `client`."""


class RequestError(ClientError):
    """An instruction from the coordinator is malformed; the site refuses it."""


class SiteRefusal(ClientError):
    """The site declines a well-formed instruction (wrong model, budget, policy).

    Its text is for the site's own log; `public` is what the reply may carry to the
    coordinator (the text itself unless the raiser gave another): it must be composed by
    the site's code from its policy and the instruction, never from data values, patient
    ids or the site's paths."""

    def __init__(self, detail: str, *, public: str | None = None) -> None:
        super().__init__(detail)
        self.public = detail if public is None else public


class BudgetRefusal(SiteRefusal):
    """The round would exceed the study's approval or the dataset's cap: refused before
    any training step, nothing spent."""


class OutsideWindow(SiteRefusal):
    """The site is outside its training windows: it declines to train now (a normal
    refusal that names the next window, not a fault)."""


class WorkerUnavailable(ClientError):
    """The site worker does not answer on its socket (not started, crashed or restarting)."""


class WorkerFailed(ClientError):
    """The site worker hit an unexpected error while handling a request; its log has more."""


DATA_REASON = (
    "the site's data does not meet the study's contract; its operator sees which file, row"
    " and key with `medfed site check`"
)
"""What the coordinator reads for a site's data problem (the detail stays at the site)."""
SETUP_REASON = "the site's setup refuses this study; its operator sees why in the site's log"
"""What the coordinator reads for a site's configuration or records problem."""
WORKER_REASON = (
    "the site's worker is not running or does not answer (stopped or restarting); its"
    " operator sees why with `medfed site status`"
)
"""What the coordinator reads when the site's worker is away."""
INTERNAL_REASON = "the site failed on this message; its operator sees why in the site's log"
"""What the coordinator reads when the site's code failed unexpectedly."""


def public_reason(error: BaseException) -> str:
    """What a reply may say of `error` to the coordinator: a refusal's public text, an
    instruction's own fault (or the study's DP and secure-aggregation settings'), or a
    fixed sentence for anything else: data errors, the site's paths (its keys, ledger,
    audit log and certificates) and exception texts of its own layers never leave it."""
    from medfed.model.wire import WireError
    from medfed.privacy.errors import (
        AccountingError,
        BundleSignatureError,
        DpConfigError,
        PrivacyError,
        SecAggError,
    )
    from medfed.sites.errors import SiteError

    if isinstance(error, SiteRefusal):
        return error.public
    if isinstance(error, (RequestError, WireError)):
        return str(error)  # about the instruction the coordinator itself sent
    if isinstance(error, (DpConfigError, AccountingError, SecAggError, BundleSignatureError)):
        return str(error)  # about the study's DP, secure aggregation or bundle settings
    if isinstance(error, SiteError):
        return DATA_REASON
    if isinstance(error, WorkerUnavailable):
        return WORKER_REASON
    if isinstance(error, (ClientError, PrivacyError)):
        return SETUP_REASON  # its keys, ledger, audit log, approvals: paths stay here
    return INTERNAL_REASON
