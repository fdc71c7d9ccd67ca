"""What a study's contract offers a query (`analysis.query.ContractNames`), by name."""

from __future__ import annotations

from medfed.analysis.query import ContractNames
from medfed.model.contract import StudyContract


def query_names(contract: StudyContract) -> ContractNames:
    """Numeric features with their plausible ranges, coded features, survival tasks
    (time and event fields) and binary targets (incl. survival events) of `contract`."""
    survival = {
        task.name: (task.target, task.event or "")
        for task in contract.tasks
        if task.kind == "survival"
    }
    binary = [task.target for task in contract.tasks if task.kind == "binary"]
    binary += [event for _, event in survival.values() if event]
    return ContractNames(
        numeric={f.name: (f.minimum, f.maximum) for f in contract.numeric},
        coded=[f.name for f in contract.categorical],
        survival=survival,
        binary_targets=binary,
    )
