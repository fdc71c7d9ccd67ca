"""Server strategies: FedAvg, FedProx, FedAdam and FedYogi, all modality-aware.

A model's arrays fall into parameter groups: `encoders.<modality>`, `fusion` and
`heads.<task>` (see `parameter_group`). A site reports which groups it trained (a
site without omics data does not train `encoders.omics`); each array is averaged over
the sites that trained its group, weighted by their patient counts, so a site without
a modality never dilutes that modality's encoder, and a group no site trained stays
as it was. Optionally each site's update is clipped to an L2 norm bound first.

The round loop (`coordinator.rounds`) is fixed once; a `Strategy` only says what to
add to each instruction (`instruction_config`) and how to turn validated replies into
the next global model (`aggregate`). FedAdam and FedYogi wrap the same average with a
server optimiser (Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
Algorithm 2) whose moments are named arrays, so a checkpoint holds them like the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from medfed.model import wire
from medfed.model.wire import parameter_group

StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedyogi"]
Arrays = dict[str, np.ndarray]


def parameter_groups(names: Iterable[str]) -> frozenset[str]:
    """Every group the arrays `names` fall into."""
    return frozenset(parameter_group(name) for name in names)


@dataclass(frozen=True)
class Contribution:
    """One validated update: its arrays, its weight (patients) and the groups it trained."""

    site_id: str
    arrays: Mapping[str, np.ndarray]
    weight: int
    trained_groups: frozenset[str]


@dataclass(frozen=True)
class Aggregated:
    """The next global model, and what the audit chain records about how it was made."""

    arrays: Arrays
    clipped: dict[str, float] = field(default_factory=dict)
    """Sites whose update was clipped to the norm bound, with the norm it had."""
    trained_by: dict[str, list[str]] = field(default_factory=dict)
    """Each parameter group, and the sites whose updates were averaged into it."""


def bound_update(
    global_arrays: Mapping[str, np.ndarray],
    arrays: Mapping[str, np.ndarray],
    groups: frozenset[str],
    bound: float,
) -> tuple[Arrays, float | None]:
    """`arrays` with the update (their difference from the global model, over `groups`)
    scaled to L2 norm `bound` if it was larger; the update's norm when it was clipped."""
    names = [name for name in sorted(global_arrays) if parameter_group(name) in groups]
    deltas = {
        name: arrays[name].astype(np.float64) - global_arrays[name].astype(np.float64)
        for name in names
    }
    norm = math.sqrt(sum(float(np.sum(delta * delta)) for delta in deltas.values()))
    if norm <= bound:
        return dict(arrays), None
    scale = bound / norm
    clipped = dict(arrays)
    for name, delta in deltas.items():
        clipped[name] = (global_arrays[name].astype(np.float64) + delta * scale).astype(
            global_arrays[name].dtype
        )
    return clipped, norm


def modality_average(
    global_arrays: Mapping[str, np.ndarray], contributions: Sequence[Contribution]
) -> tuple[Arrays, dict[str, list[str]]]:
    """Each array averaged over the contributions that trained its group, weighted by
    patients (float64 sums, float32 out); an array no one trained is the global one."""
    averaged: Arrays = {}
    trained_by: dict[str, list[str]] = {}
    for name in sorted(global_arrays):
        group = parameter_group(name)
        takers = [c for c in contributions if group in c.trained_groups and c.weight > 0]
        trained_by[group] = sorted(c.site_id for c in takers)
        if not takers:
            averaged[name] = np.array(global_arrays[name], copy=True)
            continue
        total = sum(c.weight for c in takers)
        accumulator = np.zeros(global_arrays[name].shape, dtype=np.float64)
        for contribution in takers:
            accumulator += contribution.arrays[name].astype(np.float64) * (
                contribution.weight / total
            )
        averaged[name] = accumulator.astype(global_arrays[name].dtype)
    return averaged, trained_by


@dataclass
class AdaptiveOptimizer:
    """FedAdam or FedYogi's server step on the pseudo-gradient (average minus global).

    m_t = b1 m + (1 - b1) d;  Adam: v_t = b2 v + (1 - b2) d^2;
    Yogi: v_t = v - (1 - b2) d^2 sign(v - d^2);  x_t = x + eta m_t / (sqrt(v_t) + tau).
    Moments start at zero. Arrays that no site trained this round are left alone, and so
    are their moments.
    """

    kind: Literal["adam", "yogi"]
    learning_rate: float
    beta1: float
    beta2: float
    tau: float
    first: Arrays = field(default_factory=dict)
    second: Arrays = field(default_factory=dict)

    def step(
        self,
        global_arrays: Mapping[str, np.ndarray],
        averaged: Mapping[str, np.ndarray],
        trained: Iterable[str],
    ) -> Arrays:
        """The next global model from the average of this round's updates."""
        result = {name: np.array(array, copy=True) for name, array in global_arrays.items()}
        for name in trained:
            x = global_arrays[name].astype(np.float64)
            delta = averaged[name].astype(np.float64) - x
            m = self.first.get(name, np.zeros_like(x)).astype(np.float64)
            v = self.second.get(name, np.zeros_like(x)).astype(np.float64)
            m = self.beta1 * m + (1 - self.beta1) * delta
            squared = delta * delta
            if self.kind == "adam":
                v = self.beta2 * v + (1 - self.beta2) * squared
            else:
                v = v - (1 - self.beta2) * squared * np.sign(v - squared)
            self.first[name], self.second[name] = m, v
            result[name] = (x + self.learning_rate * m / (np.sqrt(v) + self.tau)).astype(
                global_arrays[name].dtype
            )
        return result

    def state_arrays(self) -> Arrays:
        """The moments as named arrays (`m/<name>`, `v/<name>`), for a checkpoint."""
        state = {f"m/{name}": array for name, array in self.first.items()}
        state.update({f"v/{name}": array for name, array in self.second.items()})
        return state

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the moments `state_arrays` wrote."""
        self.first = {k[2:]: np.asarray(v, np.float64) for k, v in state.items() if k[:2] == "m/"}
        self.second = {k[2:]: np.asarray(v, np.float64) for k, v in state.items() if k[:2] == "v/"}


@dataclass
class Strategy:
    """What the fixed round loop asks of a strategy: the instruction's extra config and
    the aggregation. Build one with `make_strategy`."""

    name: StrategyName
    proximal_mu: float = 0.0
    update_norm_bound: float | None = None
    optimizer: AdaptiveOptimizer | None = None

    def instruction_config(self) -> dict[str, float | str]:
        """Extra keys for each train instruction (FedProx's mu, which the site applies)."""
        return {wire.PROXIMAL_MU: self.proximal_mu} if self.name == "fedprox" else {}

    def aggregate(
        self, global_arrays: Mapping[str, np.ndarray], contributions: Sequence[Contribution]
    ) -> Aggregated:
        """The next global model from validated contributions (at least one)."""
        if not contributions:
            raise ValueError("aggregation needs at least one update")
        clipped: dict[str, float] = {}
        bounded = []
        for contribution in contributions:
            if self.update_norm_bound is None:
                bounded.append(contribution)
                continue
            arrays, norm = bound_update(
                global_arrays,
                contribution.arrays,
                contribution.trained_groups,
                self.update_norm_bound,
            )
            if norm is not None:
                clipped[contribution.site_id] = norm
            bounded.append(
                Contribution(
                    contribution.site_id, arrays, contribution.weight, contribution.trained_groups
                )
            )
        averaged, trained_by = modality_average(global_arrays, bounded)
        if self.optimizer is not None:
            trained = [name for name in averaged if trained_by[parameter_group(name)]]
            averaged = self.optimizer.step(global_arrays, averaged, trained)
        return Aggregated(averaged, clipped, trained_by)

    def from_average(
        self,
        global_arrays: Mapping[str, np.ndarray],
        averaged: Mapping[str, np.ndarray],
        trained_by: Mapping[str, list[str]],
    ) -> Aggregated:
        """The next global model from an average made elsewhere (secure aggregation's
        unmasked sum): FedAvg and FedProx take it, FedAdam and FedYogi step towards it."""
        result = {name: np.array(array, copy=True) for name, array in averaged.items()}
        if self.optimizer is not None:
            trained = [name for name in result if trained_by.get(parameter_group(name))]
            result = self.optimizer.step(global_arrays, result, trained)
        return Aggregated(result, {}, dict(trained_by))

    def state_arrays(self) -> Arrays:
        """The server optimiser's state (empty for FedAvg and FedProx)."""
        return {} if self.optimizer is None else self.optimizer.state_arrays()

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what `state_arrays` returned."""
        if self.optimizer is not None:
            self.optimizer.load_state(state)


def make_strategy(
    name: StrategyName,
    *,
    proximal_mu: float = 0.0,
    update_norm_bound: float | None = None,
    server_learning_rate: float = 0.01,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> Strategy:
    """The strategy `name` with its parameters (an explicit mapping, no registry)."""
    optimizer = None
    if name in ("fedadam", "fedyogi"):
        optimizer = AdaptiveOptimizer(
            kind="adam" if name == "fedadam" else "yogi",
            learning_rate=server_learning_rate,
            beta1=beta1,
            beta2=beta2,
            tau=tau,
        )
    return Strategy(name, proximal_mu, update_norm_bound, optimizer)
