"""The site's API as typed values: what the coordinator asks for and what the site answers.

The same values travel in-process (simulation, tests) and inside Flower messages;
`client.client_app` converts between the two and validates every field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal, Protocol

import numpy as np

from medfed.model.presets import PresetName


class HeldOutMetrics(Protocol):
    """Metrics of a model on the held-out patients: `model.train.EvalResult` in the worker,
    `HeldOut` where a reply was decoded off the wire (this module imports no torch, so the
    thin ClientApp can use it)."""

    @property
    def examples(self) -> int: ...
    @property
    def loss(self) -> float: ...
    @property
    def auroc(self) -> float: ...
    @property
    def accuracy(self) -> float: ...
    @property
    def c_index(self) -> float: ...
    @property
    def rmse(self) -> float: ...


@dataclass(frozen=True)
class HeldOut:
    """Held-out metrics as they arrive from the site worker."""

    examples: int
    loss: float
    auroc: float
    accuracy: float
    c_index: float = math.nan
    rmse: float = math.nan


@dataclass(frozen=True)
class TrainRequest:
    """Train the global model for some local steps under DP-SGD."""

    run_id: str
    study: str
    study_sha256: str
    round: int
    planned_rounds: int
    arrays: dict[str, np.ndarray]
    model_sha256: str
    preset: PresetName
    contract_json: str  # the study's contract, canonical JSON (decoded at the worker)
    contract_sha256: str
    local_steps: int
    learning_rate: float
    target_epsilon: float
    max_grad_norm: float
    sample_rate: float
    delta: float
    proximal_mu: float = 0.0  # FedProx's mu; 0: plain local training
    secagg: str = ""  # secure aggregation: the signed announcement and every site's keys (JSON)
    model_identity: str = ""  # `model.network.model_identity`; the site checks it when given


@dataclass(frozen=True)
class ModelCheck:
    """How a received global model does at this site: its loss on the training patients
    and its metrics on the held-out patients."""

    train_examples: int
    train_loss: float
    held_out: HeldOutMetrics
    stats: tuple[float, ...] = ()
    """The released (noised) statistics vector these figures derive from
    (`privacy.release.LAYOUT`): what the coordinator pools across sites."""


@dataclass(frozen=True)
class TrainReply:
    """The site's update, its spend, and how the model it received did here."""

    site_id: str
    arrays: dict[str, np.ndarray]
    local_loss: float
    epsilon: float
    noise_multiplier: float
    incoming: ModelCheck
    receipt_signature: str
    trained_groups: str = ""  # comma-separated parameter groups; empty: every group
    dataset_sha256: str = ""  # a site-secret HMAC of the data version (never its fingerprint)
    secagg: str = ""  # secure aggregation: sealed shares (JSON); `arrays` is then the masked one
    model_statement: str = ""  # a round announced ahead: the site's signature of its model

    @property
    def num_examples(self) -> int:
        """Patients the update was trained on: the weight of this update in FedAvg."""
        return self.incoming.train_examples


@dataclass(frozen=True)
class EvaluateRequest:
    """Evaluate the global model on the site's held-out patients."""

    run_id: str
    round: int
    arrays: dict[str, np.ndarray]
    model_sha256: str
    preset: PresetName
    contract_json: str  # the study's contract, canonical JSON (decoded at the worker)
    contract_sha256: str
    model_identity: str = ""  # `model.network.model_identity`; the site checks it when given


@dataclass(frozen=True)
class EvaluateReply:
    """How the global model does at this site."""

    site_id: str
    result: ModelCheck


@dataclass(frozen=True)
class QueryRequest:
    """The coordinator's scheduler asks how this site stands for a study (all optional:
    a query without a study still gets the window and the accelerator)."""

    study: str | None = None
    study_sha256: str | None = None
    preset: PresetName | None = None
    contract_json: str | None = None
    contract_sha256: str | None = None
    delta: float | None = None
    round_ask: PreflightAsk | None = None
    """The round the coordinator is about to plan: the site runs its pre-flight on it."""


@dataclass(frozen=True)
class PreflightAsk:
    """The round a status query describes, for the site's pre-flight (`PrivacyGate.preflight`)."""

    run_id: str
    study: str
    study_sha256: str
    round: int
    planned_rounds: int
    local_steps: int
    target_epsilon: float
    sample_rate: float
    delta: float
    max_grad_norm: float


PREFLIGHT_CODES: Final = (
    "not-approved",
    "no-budget",
    "records-unverified",
    "no-data",
    "policy",
    "outside-window",
)
"""The categories of a failed pre-flight a site reports (never its data or paths)."""


@dataclass(frozen=True)
class QueryReply:
    """What the scheduler needs to plan a round at this site.

    Times are epoch seconds; 0 stands for "none" (no end to the current window, or in a
    window now). `throughput` and `budget_left` are None when the query named no study.
    """

    site_id: str
    in_window: bool
    window_ends: float
    next_window_start: float
    accelerator: str
    throughput: float | None
    budget_left: float | None
    patients: int
    preflight: str = ""
    """"" when the site would train the round the query described (or none was), else
    one of `PREFLIGHT_CODES`."""


@dataclass(frozen=True)
class EgressRules:
    """What the site lets out of it (see `client.egress`): its id, the least number of
    patients an aggregate metric may be computed over (the policy's `min_cohort_k`), and
    its public signing key (raw Ed25519, hex): an update leaves only with the site's
    signed receipt over it, which only the worker can make."""

    site_id: str
    min_cohort_k: int
    site_key: str


SecAggStep = Literal["keys", "reveal"]


@dataclass(frozen=True)
class SecAggRequest:
    """One step of a secure-aggregation round (`privacy.secagg_protocol`); the train step
    travels as a `TrainRequest` with `secagg` set."""

    step: SecAggStep
    run_id: str
    round: int
    payload: str  # JSON


@dataclass(frozen=True)
class SecAggReply:
    """The site's answer to a keys or reveal step: JSON."""

    site_id: str
    payload: str


@dataclass(frozen=True)
class AskRequest:
    """One exchange of a query (`medfed ask`): the query, the study contract it reads,
    and at `step` > 0 the coefficients each Newton analysis is at (JSON: index -> list)."""

    run_id: str
    query_json: str
    query_sha256: str
    contract_json: str
    contract_sha256: str
    step: int
    betas_json: str = "{}"
    secagg: str = ""
    """Under secure aggregation: the signed announcement and every site's keys (JSON)."""


@dataclass(frozen=True)
class AskReply:
    """A site's noised answer to one exchange, signed (`ask_receipt_payload`)."""

    site_id: str
    step: int
    released: np.ndarray
    """The step's vector (`analysis.layout.step_layout`), every part already noised."""
    noise_multiplier: float
    """Each part's noise std over its sensitivity."""
    epsilon: float
    """What the whole query spends here, by the site's accountant."""
    dataset_sha256: str
    """A site-secret HMAC of the data version answered from."""
    receipt_signature: str
    secagg: str = ""
    """Under secure aggregation: the sealed shares; `released` is then the vector masked
    (uint32) and `receipt_signature` the site's receipt over the masked bytes."""
    approval: str = ""
    """The officer's approval the query ran under: `key id|epsilon|approved at` (empty
    where the policy requires none and none was given)."""
