"""The tabular presets' parts (`linear`, `mlp`) and the survival head every preset uses.

A Cox, logistic or ridge model is a linear head on standardised features; for a cohort
of a few hundred patients that is the model to federate, not a transformer. Each
modality becomes a fixed feature vector without parameters (`modality_features`):

- clinical: the standardised numeric values (0, the reference mean, where unknown), a
  missing indicator per feature, and one 0/1 column per code of the vocabularies;
- omics: the standardised gene values (0 where unmeasured) and an "omics absent" flag;
- molecule / protein: each token's share of the sequence (a bag of tokens) and the
  sequence's length over the contract's maximum.

`linear` puts each task's head straight on the concatenated vector; `mlp` projects each
modality to `hidden` units (`encoders.<modality>`), sums, applies a GELU, then the heads.
Only `nn.Linear` and `nn.Embedding` hold parameters, as Opacus needs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional

from medfed.model.contract import Modality, StudyContract, TaskSpec
from medfed.model.tokenizers import PAD, tokenizers_for

HAZARD_BASELINE_INIT = -2.0
"""Initial baseline log-odds of each interval's hazard (about 12%): a neutral start
declared here, not estimated from any site's data."""


def _bag(ids: torch.Tensor, vocabulary: int, max_length: int) -> torch.Tensor:
    """Each token's share of the sequence (padding left out) and the relative length."""
    counts = functional.one_hot(ids, vocabulary).sum(dim=1)[:, 1:].to(torch.float32)
    length = (ids != PAD).sum(dim=1, keepdim=True).to(torch.float32)
    return torch.cat([counts / length.clamp(min=1.0), length / max_length], dim=1)


def modality_width(modality: Modality, contract: StudyContract) -> int:
    """How many features `modality_features` gives the modality."""
    clinical, smiles, protein = tokenizers_for(contract)
    if modality == "clinical":
        codes = clinical.code_vocabulary_size - 1 if contract.categorical else 0
        return 2 * len(contract.numeric) + codes
    if modality == "omics" and contract.omics is not None:
        return len(contract.omics.genes) + 1
    if modality == "molecule" and smiles is not None:
        return smiles.vocabulary_size
    if modality == "protein" and protein is not None:
        return protein.vocabulary_size
    raise ValueError(f"the contract has no {modality}")


def modality_features(
    modality: Modality, contract: StudyContract, named: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """The modality's fixed feature vector (n, `modality_width`), without parameters."""
    clinical, smiles, protein = tokenizers_for(contract)
    if modality == "clinical":
        parts: list[torch.Tensor] = []
        if contract.numeric:
            known = named["clinical.known"]
            parts += [named["clinical.values"] * known, (~known).to(torch.float32)]
        if contract.categorical:
            codes = functional.one_hot(named["clinical.codes"], clinical.code_vocabulary_size)
            parts.append(codes.amax(dim=1)[:, 1:].to(torch.float32))
        return torch.cat(parts, dim=1)
    if modality == "omics":
        known = named["omics.known"]
        absent = (~known.any(dim=1, keepdim=True)).to(torch.float32)
        return torch.cat([named["omics.values"] * known, absent], dim=1)
    if modality == "molecule" and smiles is not None:
        return _bag(named["molecule.ids"], smiles.vocabulary_size, smiles.max_length)
    if modality == "protein" and protein is not None:
        return _bag(named["protein.ids"], protein.vocabulary_size, protein.max_length)
    raise ValueError(f"the contract has no {modality}")


class HazardHead(nn.Module):
    """A discrete-time proportional hazard: one risk score plus a baseline per interval.

    Output (n, intervals): logit h_k(x) = baseline_k + risk(x). The baseline is an
    embedding over interval ids (a layer Opacus computes per-sample gradients for).
    """

    def __init__(self, width: int, intervals: int) -> None:
        super().__init__()
        self.risk = nn.Linear(width, 1, bias=False)
        self.baseline = nn.Embedding(intervals, 1)
        nn.init.constant_(self.baseline.weight, HAZARD_BASELINE_INIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        intervals = self.baseline.num_embeddings
        # Contiguous ids: Opacus's ghost-clipping sampler views them.
        ids = torch.arange(intervals, device=x.device).expand(x.shape[0], intervals).contiguous()
        logits: torch.Tensor = self.risk(x) + self.baseline(ids).squeeze(-1)
        return logits


def task_head(task: TaskSpec, width: int) -> nn.Module:
    """The head of one task: a hazard head for a discrete-hazard survival task, else a
    linear layer with the task's outputs."""
    if task.discrete_hazard:
        return HazardHead(width, task.intervals)
    return nn.Linear(width, task.outputs)


def zero_heads(heads: nn.ModuleDict) -> None:
    """Start a linear model at zero (as Cox and logistic fits do), baselines kept."""
    for head in heads.values():
        for name, parameter in head.named_parameters():
            if not name.startswith("baseline"):
                nn.init.zeros_(parameter)


def tabular_width(contract: StudyContract, hidden: int) -> int:
    """The width the heads read: `hidden` (mlp), else every modality's features (linear)."""
    return hidden or sum(modality_width(m, contract) for m in contract.modalities)


def tabular_encoders(contract: StudyContract, hidden: int) -> nn.ModuleDict:
    """`mlp`: per modality a linear projection to `hidden` units; `linear` (0): none."""
    if not hidden:
        return nn.ModuleDict()
    return nn.ModuleDict(
        {m: nn.Linear(modality_width(m, contract), hidden) for m in contract.modalities}
    )


def tabular_pooled(
    contract: StudyContract, encoders: nn.ModuleDict, named: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """What the heads read: the concatenated features (linear), or the GELU of the sum of
    each modality's projection (mlp)."""
    features = [modality_features(m, contract, named) for m in contract.modalities]
    if not len(encoders):
        return torch.cat(features, dim=1)
    projected = [encoders[m](x) for m, x in zip(contract.modalities, features, strict=True)]
    return functional.gelu(torch.stack(projected).sum(dim=0))
