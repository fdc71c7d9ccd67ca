"""The client package's exceptions."""


class ClientError(Exception):
    """Base class of every error raised by `client`."""


class RequestError(ClientError):
    """An instruction from the coordinator is malformed; the site refuses it."""


class SiteRefusal(ClientError):
    """The site declines a well-formed instruction (wrong model, budget, policy)."""


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
