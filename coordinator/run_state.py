"""A run's state between rounds: how it starts, how it resumes, what each checkpoint holds.

`start_or_resume` returns the state a run continues from: a fresh one (the study's
seeded model, round 0, checkpointed at once so the run id survives a crash in round
1), or the last checkpoint of the run folder when the study says `resume`.
`checkpoint` writes the state after a round. The lineage travels in every checkpoint:
the rounds with their sites and model digests, each site's datasets and its latest
(epsilon, delta), the study's digest and the app bundle's hash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfed.coordinator.audit_chain import CoordinatorAudit
from medfed.coordinator.checkpoints import Checkpoint, CheckpointStore
from medfed.coordinator.errors import CheckpointError
from medfed.coordinator.results import RoundRecord, RunResults, results_from_json
from medfed.coordinator.strategies import Strategy
from medfed.coordinator.study import StudySettings
from medfed.model.network import arrays_sha256
from medfed.privacy.signing import JsonValue


@dataclass
class RunState:
    """What the round loop carries from one round to the next."""

    run_id: str
    round: int
    """The last round completed (0: none yet)."""
    arrays: dict[str, np.ndarray]
    rng: np.random.Generator
    results: RunResults
    lineage: dict[str, Any] = field(default_factory=dict)
    unqueryable: set[int] = field(default_factory=set)
    """Nodes that answered a status query with an error: not asked again (not checkpointed:
    a resumed run asks once more)."""


def new_lineage(study: StudySettings, run_id: str, app_sha256: str) -> dict[str, Any]:
    """The lineage of a run before its first round."""
    return {
        "run_id": run_id,
        "study": study.name,
        "study_sha256": study.sha256(),
        "app_sha256": app_sha256,
        "strategy": study.strategy,
        "delta": study.delta,
        "rounds": [],
        "sites": {},
    }


def extend_lineage(lineage: dict[str, Any], record: RoundRecord, datasets: dict[str, str]) -> None:
    """Add a completed round: who trained on which dataset, their epsilon, the new model."""
    lineage["rounds"].append(
        {"round": record.round, "sites": record.participants, "model_sha256": record.model_sha256}
    )
    for site in record.participants:
        entry = lineage["sites"].setdefault(site, {"datasets": [], "rounds": []})
        entry["rounds"].append(record.round)
        entry["epsilon"] = record.epsilon_by_site.get(site)
        entry["delta"] = lineage["delta"]
        dataset = datasets.get(site)
        if dataset is not None and dataset not in entry["datasets"]:
            entry["datasets"].append(dataset)


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return dict(rng.bit_generator.state)


def checkpoint(
    store: CheckpointStore | None,
    audit: CoordinatorAudit,
    study: StudySettings,
    state: RunState,
    strategy: Strategy,
    plan: dict[str, Any] | None,
) -> None:
    """Write the state after `state.round` and record it in the audit chain."""
    if store is None:
        return
    store.save(
        Checkpoint(
            run_id=state.run_id,
            round=state.round,
            study_sha256=study.sha256(),
            arrays=state.arrays,
            strategy_state=strategy.state_arrays(),
            state={
                "rng": _rng_state(state.rng),
                "plan": plan,
                "results": state.results.to_json(),
                "lineage": state.lineage,
            },
        )
    )
    lineage: JsonValue = state.lineage
    audit.record(
        "checkpoint.written",
        {
            "round": state.round,
            "model_sha256": arrays_sha256(state.arrays),
            "checkpoints": str(store.path),
            "lineage": lineage,
        },
    )


def start_or_resume(
    store: CheckpointStore | None,
    study: StudySettings,
    strategy: Strategy,
    initial: dict[str, np.ndarray],
    *,
    run_id: str,
    app_sha256: str,
) -> tuple[RunState, bool]:
    """The state to continue from, and whether it was resumed from a checkpoint."""
    last = None if store is None else store.load()
    if study.resume:
        if store is None:
            raise CheckpointError("resume needs the run config's run-dir")
        if last is None:
            raise CheckpointError(f"nothing to resume: {store.path} holds no checkpoint")
        if last.study_sha256 != study.sha256():
            raise CheckpointError(
                f"{store.path} is a checkpoint of another study ({last.study_sha256[:12]}),"
                f" not {study.name} ({study.sha256()[:12]})"
            )
        return _restored(last, strategy), True
    if last is not None:
        raise CheckpointError(
            f"{store.path if store else ''} already holds run {last.run_id} (round"
            f" {last.round}); resume it, or start in a new run folder"
        )
    rng = np.random.Generator(np.random.PCG64(study.seed))
    results = RunResults(
        run_id=run_id,
        status="waiting",
        num_rounds=study.num_rounds,
        strategy=study.strategy,
        delta=study.delta,
    )
    lineage = new_lineage(study, run_id, app_sha256)
    return RunState(run_id, 0, dict(initial), rng, results, lineage), False


def _restored(last: Checkpoint, strategy: Strategy) -> RunState:
    rng = np.random.Generator(np.random.PCG64())
    try:
        rng.bit_generator.state = last.state["rng"]
        results = results_from_json(last.state["results"])
        lineage = dict(last.state["lineage"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"round {last.round}'s checkpoint is incomplete: {exc}") from exc
    strategy.load_state(last.strategy_state)
    results.resumed_from.append(last.round)
    return RunState(last.run_id, last.round, last.arrays, rng, results, lineage)
