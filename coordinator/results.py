"""The run's progress and results as one JSON document, rewritten atomically after each step.

The demo and `medfed round status` read it while the run goes on; a reader never sees
half a file.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from medfed.common import write_atomic

RunStatus = Literal["waiting", "running", "completed", "failed"]

FIGURES_NOTE = (
    "losses and metrics are DP-noised at each site (a Gaussian release charged to its"
    " privacy budget); over all sites they are pooled from the sites' noised sufficient"
    " statistics; patient counts are noised too"
)
"""What every figure of a run is, for whoever reads the results or the report."""


@dataclass
class RoundRecord:
    """One round: who took part, how the new global model does, and epsilon per site.

    `loss` (the new model's loss on all sites' training patients) and `metric` (its
    held-out metric, named by `metric_name`: AUROC or c-index) are reported by the
    sites when they next receive the model, so they fill in one round later (after the
    final evaluation for the last round). `local_loss` is the noised loss of the model
    each site received on its training patients (the DP-SGD batches' own loss never
    leaves a site). Every figure is DP-noised at the sites (`FIGURES_NOTE`).
    """

    round: int
    participants: list[str]
    local_loss: float | None = None
    loss: float | None = None
    metric: float | None = None
    metric_name: str = "auroc"
    epsilon_by_site: dict[str, float] = field(default_factory=dict)
    noise_by_site: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    model_sha256: str = ""
    duration_s: float = 0.0
    """From the plan to the new model (`planning_s` before it: status queries, waits)."""
    planning_s: float = 0.0
    refused: dict[str, str] = field(default_factory=dict)
    """Sites the scheduler left out of the round, and why."""
    local_steps_by_site: dict[str, int] = field(default_factory=dict)
    clipped: dict[str, float] = field(default_factory=dict)
    """Sites whose update was clipped to the norm bound, with the norm it had."""
    loss_by_site: dict[str, float] = field(default_factory=dict)
    metric_by_site: dict[str, float] = field(default_factory=dict)
    """`loss` and `metric` as each site reported them (filled in as they are)."""
    metric_ci: list[float] | None = None
    """A 95% confidence interval [low, high] of the pooled held-out AUROC, from the
    released histograms (Hanley-McNeil; sampling only, not the DP noise); None where
    there is none (a survival study, or too few patients of a class)."""
    metric_ci_by_site: dict[str, list[float]] = field(default_factory=dict)
    """The same interval of each site's own held-out AUROC, from its released vector."""


@dataclass
class RunResults:
    """Everything the coordinator reports about a run."""

    run_id: str
    status: RunStatus
    num_rounds: int
    sites: list[str] = field(default_factory=list)
    signed_updates: bool = False  # every accepted update's signed receipt was verified
    initial_loss: float | None = None
    initial_metric: float | None = None
    per_round: list[RoundRecord] = field(default_factory=list)
    error: str | None = None
    strategy: str = "fedavg"
    delta: float | None = None
    waiting_until: float | None = None
    """While waiting for enough sites to be in their windows: when (epoch s), if known."""
    resumed_from: list[int] = field(default_factory=list)
    """Rounds after whose checkpoint the run was resumed."""
    metric_name: str = "auroc"
    """The study's held-out metric (`rounds.primary_metric`): what every label shows."""
    flower_run_id: str = ""
    """The Flower run that last wrote this document: a resumed run's first report
    replaces its last life's (which `round resume --follow` must not read as its own)."""
    figures: str = FIGURES_NOTE
    """What the losses, metrics and counts are (DP-noised at the sites)."""

    @property
    def rounds_completed(self) -> int:
        return len(self.per_round)

    def to_json(self) -> dict[str, object]:
        document = asdict(self)
        document["rounds_completed"] = self.rounds_completed
        return _finite_or_none(document)  # type: ignore[return-value]


def _finite_or_none(value: object) -> object:
    """JSON has no NaN: undefined metrics are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value


def write_results(path: Path, results: RunResults) -> None:
    """Replace `path` with the current results in one rename."""
    document = json.dumps(results.to_json(), indent=1, allow_nan=False)
    write_atomic(path, document.encode("utf-8"))


def read_results(path: Path) -> RunResults | None:
    """The results last written to `path`, or None while there are none yet.

    Undefined metrics come back as None (JSON has no NaN), as `write_results` wrote them.
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return results_from_json(document)


def results_from_json(document: dict[str, Any]) -> RunResults:
    """The `RunResults` whose `to_json` gave `document`."""
    document = dict(document)
    rounds = [RoundRecord(**record) for record in document.pop("per_round")]
    document.pop("rounds_completed", None)
    return RunResults(**document, per_round=rounds)
