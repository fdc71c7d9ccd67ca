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
