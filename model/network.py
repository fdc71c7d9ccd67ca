"""The multiscale fusion network: modality encoders, a document-aware fusion transformer, heads.

Each modality's encoder turns its input tensors into a "document" of tokens plus a
learned modality embedding. A fusion transformer reads every document and a fusion
token: its lower layers attend only within a document (block-diagonal mask), its upper
layers across all documents (full mask over present tokens). The fusion token feeds one
head per task. A modality a patient lacks contributes absent tokens, masked out of
every attention, never zeros.

Parameters are named by group (`encoders.<modality>.*`, `fusion.*`, `heads.<task>.*`)
so that aggregation can work per group. Only layers that Opacus computes per-sample
gradients for are used (`nn.Linear`, `nn.Embedding`, `nn.LayerNorm`; attention is
built from linear projections and an explicit masked softmax; no BatchNorm).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from medfed.model.contract import Modality, StudyContract
from medfed.model.errors import InputError
from medfed.model.presets import Preset, PresetName, preset_named
from medfed.model.tabular import (
    tabular_encoders,
    tabular_pooled,
    tabular_width,
    task_head,
    zero_heads,
)
from medfed.model.tokenizers import PAD, input_layout, tokenizers_for
from medfed.model.wire import arrays_sha256 as arrays_sha256  # its home is torch-free
from medfed.model.wire import parameter_group as parameter_group  # the same

__all__ = [
    "ARCHITECTURE",
    "MedModel",
    "PresetName",
    "arrays_sha256",
    "build_model",
    "load_arrays",
    "model_identity",
    "state_arrays",
]

ARCHITECTURE = "medfed-fusion-1"
"""Names this network's design; it changes whenever the same preset would build other arrays."""

Tokens = tuple[torch.Tensor, torch.Tensor]
"""A document: token vectors (n, length, hidden) and which tokens are present (n, length)."""


def _positions(n: int, length: int, device: torch.device) -> torch.Tensor:
    # Contiguous, not an expanded view: Opacus's ghost-clipping norm sampler for
    # embeddings takes a `.view` of the ids and fails on a stride-0 tensor.
    return torch.arange(length, device=device).expand(n, length).contiguous()


class ClinicalEncoder(nn.Module):
    """Numeric features as feature + value * scale tokens (or a learned missing token per
    feature when unknown), and one embedded token per recorded code."""

    def __init__(self, contract: StudyContract, hidden: int) -> None:
        super().__init__()
        features = len(contract.numeric)
        self.has_numeric = features > 0
        self.has_codes = bool(contract.categorical)
        if self.has_numeric:
            self.feature = nn.Embedding(features, hidden)
            self.scale = nn.Embedding(features, hidden)
            self.missing = nn.Embedding(features, hidden)
        if self.has_codes:
            self.codes = nn.Embedding(tokenizers_for(contract)[0].code_vocabulary_size, hidden)
        self.modality = nn.Embedding(1, hidden)

    def forward(self, named: Mapping[str, torch.Tensor]) -> Tokens:
        parts: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        codes_present = named["clinical.codes"] != PAD if self.has_codes else None
        if self.has_numeric:
            values, known = named["clinical.values"], named["clinical.known"]
            ids = _positions(values.shape[0], values.shape[1], values.device)
            measured = self.feature(ids) + values.unsqueeze(-1) * self.scale(ids)
            parts.append(torch.where(known.unsqueeze(-1), measured, self.missing(ids)))
            document = known.any(dim=1)
            if codes_present is not None:
                document = document | codes_present.any(dim=1)
            masks.append(document.unsqueeze(1).expand_as(known))
        if codes_present is not None:
            parts.append(self.codes(named["clinical.codes"]))
            masks.append(codes_present)
        tokens = torch.cat(parts, dim=1)
        modality = self.modality(torch.zeros_like(tokens[..., 0], dtype=torch.long))
        return tokens + modality, torch.cat(masks, dim=1)


class OmicsEncoder(nn.Module):
    """One token per measured gene: gene-identity embedding plus a projection of its value."""

    def __init__(self, genes: int, hidden: int) -> None:
        super().__init__()
        self.gene = nn.Embedding(genes, hidden)
        self.value = nn.Linear(1, hidden)
        self.modality = nn.Embedding(1, hidden)

    def forward(self, named: Mapping[str, torch.Tensor]) -> Tokens:
        values, known = named["omics.values"], named["omics.known"]
        ids = _positions(values.shape[0], values.shape[1], values.device)
        tokens = self.gene(ids) + self.value(values.unsqueeze(-1))
        return tokens + self.modality(torch.zeros_like(ids)), known


class SequenceEncoder(nn.Module):
    """Token ids (SMILES atoms or residues) as token plus position embeddings."""

    def __init__(self, key: str, vocabulary: int, max_length: int, hidden: int) -> None:
        super().__init__()
        self.key = key
        self.token = nn.Embedding(vocabulary, hidden)
        self.position = nn.Embedding(max_length, hidden)
        self.modality = nn.Embedding(1, hidden)

    def forward(self, named: Mapping[str, torch.Tensor]) -> Tokens:
        ids = named[self.key]
        positions = _positions(ids.shape[0], ids.shape[1], ids.device)
        tokens = self.token(ids) + self.position(positions)
        return tokens + self.modality(torch.zeros_like(ids)), ids != PAD


class Attention(nn.Module):
    """Multi-head self-attention from linear projections and an explicit masked softmax.

    `allowed[b, i, j]` says whether token i of patient b may attend to token j. Every row
    must allow at least one token (the caller always allows a token itself), so the
    softmax never runs over nothing.
    """

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, length, hidden = x.shape
        return x.view(n, length, self.heads, hidden // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        n, length, hidden = x.shape
        query, key, value = (
            self._split(self.query(x)),
            self._split(self.key(x)),
            self._split(self.value(x)),
        )
        scores = query @ key.transpose(-1, -2) / math.sqrt(hidden // self.heads)
        scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        context = torch.softmax(scores, dim=-1) @ value
        merged: torch.Tensor = self.out(context.transpose(1, 2).reshape(n, length, hidden))
        return merged


class FusionBlock(nn.Module):
    """A pre-norm transformer block: masked attention, then a GELU feed-forward layer."""

    def __init__(self, hidden: int, heads: int, ffn_multiplier: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden)
        self.attention = Attention(hidden, heads)
        self.ffn_norm = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, ffn_multiplier * hidden),
            nn.GELU(),
            nn.Linear(ffn_multiplier * hidden, hidden),
        )

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), allowed)
        out: torch.Tensor = x + self.ffn(self.ffn_norm(x))
        return out


class Fusion(nn.Module):
    """The fusion token, lower (within-document) and upper (cross-document) blocks."""

    def __init__(self, preset: Preset) -> None:
        super().__init__()
        h = preset.hidden
        self.token = nn.Embedding(1, h)
        self.lower = nn.ModuleList(
            FusionBlock(h, preset.heads, preset.ffn_multiplier) for _ in range(preset.lower_layers)
        )
        self.upper = nn.ModuleList(
            FusionBlock(h, preset.heads, preset.ffn_multiplier) for _ in range(preset.upper_layers)
        )
        self.norm = nn.LayerNorm(h)

    def forward(self, documents: list[Tokens]) -> torch.Tensor:
        """The fusion token's final vector (n, hidden) after reading every document."""
        n = documents[0][0].shape[0] if documents else 0
        device = self.token.weight.device
        fusion_token = self.token(torch.zeros(n, 1, dtype=torch.long, device=device))
        always = torch.ones(n, 1, dtype=torch.bool, device=device)
        x = torch.cat([fusion_token, *(tokens for tokens, _ in documents)], dim=1)
        present = torch.cat([always, *(mask for _, mask in documents)], dim=1)
        lengths = [1, *(tokens.shape[1] for tokens, _ in documents)]
        document = torch.repeat_interleave(
            torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device)
        )
        itself = torch.eye(x.shape[1], dtype=torch.bool, device=device)
        across = present.unsqueeze(1) | itself
        within = (present.unsqueeze(1) & (document.unsqueeze(0) == document.unsqueeze(1))) | itself
        for block in self.lower:
            x = block(x, within)
        for block in self.upper:
            x = block(x, across)
        pooled: torch.Tensor = self.norm(x[:, 0])
        return pooled


def _encoder(modality: Modality, contract: StudyContract, hidden: int) -> nn.Module:
    """The encoder of one of the contract's modalities."""
    _, smiles, protein = tokenizers_for(contract)
    if modality == "omics" and contract.omics is not None:
        return OmicsEncoder(len(contract.omics.genes), hidden)
    if modality == "molecule" and smiles is not None:
        return SequenceEncoder("molecule.ids", smiles.vocabulary_size, smiles.max_length, hidden)
    if modality == "protein" and protein is not None:
        return SequenceEncoder("protein.ids", protein.vocabulary_size, protein.max_length, hidden)
    return ClinicalEncoder(contract, hidden)


class MedModel(nn.Module):
    """Encoders for the contract's modalities, the fusion transformer and one head per task.

    The preset's architecture picks the body: the fusion transformer, or the tabular
    `linear` / `mlp` (see `model.tabular`); the heads are alike. `forward(*inputs)` takes
    the tensors of `model.tokenizers.input_layout(contract)` (as `EncodedBatch.inputs`
    holds them) and returns each task's outputs by task name: shape (n,) for binary (a
    logit), regression and Cox survival (a log-risk), (n, classes) for multiclass
    (logits), (n, intervals) for discrete-hazard survival (hazard logits; a task with
    one interval gives (n,)).
    """

    def __init__(self, contract: StudyContract, preset: Preset) -> None:
        super().__init__()
        self.contract = contract
        self.preset = preset
        self._layout = input_layout(contract)
        self._fused = preset.architecture == "fusion"
        h = preset.hidden
        if self._fused:
            encoders: dict[str, nn.Module] = {
                m: _encoder(m, contract, h) for m in contract.modalities
            }
            self.encoders = nn.ModuleDict(encoders)
            self.fusion: Fusion | None = Fusion(preset)
            width = h
        else:
            self.encoders = tabular_encoders(contract, h)
            self.fusion = None
            width = tabular_width(contract, h)
        self.heads = nn.ModuleDict({task.name: task_head(task, width) for task in contract.tasks})
        if preset.architecture == "linear":
            zero_heads(self.heads)

    def forward(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if len(inputs) != len(self._layout):
            raise InputError(
                f"the network takes {len(self._layout)} tensors {list(self._layout)},"
                f" got {len(inputs)}"
            )
        named = dict(zip(self._layout, inputs, strict=True))
        if self.fusion is not None:
            pooled = self.fusion([encoder(named) for encoder in self.encoders.values()])
        else:
            pooled = tabular_pooled(self.contract, self.encoders, named)
        outputs: dict[str, torch.Tensor] = {}
        for task in self.contract.tasks:
            out: torch.Tensor = self.heads[task.name](pooled)
            outputs[task.name] = out if task.outputs > 1 else out.squeeze(-1)
        return outputs


def model_identity(preset: PresetName, contract: StudyContract) -> str:
    """What a model is: architecture, preset and the contract's digest (not its weights)."""
    return f"{ARCHITECTURE}/{preset}/{contract.sha256()}"


def build_model(
    preset: PresetName,
    *,
    contract: StudyContract,
    seed: int,
    device: torch.device | None = None,
) -> MedModel:
    """Build a freshly initialised model; the same seed gives the same weights on any device.

    The weights are drawn on the CPU and then moved, so a CUDA or NPU site starts from the
    same arrays; `torch.device("meta")` builds shapes only (no memory), for counting.
    """
    sizes = preset_named(preset)
    if device is not None and device.type == "meta":
        with torch.device("meta"):
            return MedModel(contract, sizes)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = MedModel(contract, sizes)
    finally:
        torch.random.set_rng_state(generator_state)
    return model if device is None else model.to(device)


def state_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters as float32 numpy arrays, keyed by parameter name."""
    return {
        name: tensor.detach().cpu().numpy().astype(np.float32, copy=True)
        for name, tensor in model.state_dict().items()
    }


def load_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load arrays into the model after checking names, shapes and dtypes exactly."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise ValueError(f"parameter names differ: missing {missing}, unexpected {unexpected}")
    for name, tensor in expected.items():
        array = arrays[name]
        if array.dtype != np.float32:
            raise ValueError(f"parameter {name}: dtype {array.dtype}, expected float32")
        if tuple(array.shape) != tuple(tensor.shape):
            raise ValueError(
                f"parameter {name}: shape {tuple(array.shape)}, expected {tuple(tensor.shape)}"
            )
        if not np.isfinite(array).all():
            raise ValueError(f"parameter {name}: contains NaN or Inf")
    model.load_state_dict({name: torch.from_numpy(np.array(arrays[name])) for name in expected})
