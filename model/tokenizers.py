"""Tokenizers: one patient's modalities as token ids and values, a batch as fixed-shape tensors.

Each modality becomes one "document" of tokens for the network:

- clinical: one token per numeric feature (its standardised value, or a learned
  "missing" token when the value is absent) and one token per code the patient has;
- omics: one token per measured gene (gene identity + transformed, standardised value);
  unmeasured genes (NaN) have no token;
- molecule: atom-level SMILES tokens (the regex of Schwaller et al., 2019);
- protein: one token per residue.

Invalid input raises `TokenizeError` naming the patient and the place (feature, token,
position). The tensor layout that `encode` produces is defined once, in `input_layout`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from medfed.model.contract import (
    Modality,
    MoleculeSpec,
    OmicsPanel,
    ProteinSpec,
    StudyContract,
    TaskSpec,
)
from medfed.model.errors import InputError, TokenizeError
from medfed.model.sample import PatientSample

PAD = 0
"""Token id 0 pads every id sequence; real tokens start at 1."""

SMILES_PATTERN = re.compile(
    r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|/|:|~|@|\?|>|\*|\$|%[0-9]{2}|[0-9])"
)
"""Atom-level SMILES tokens (Schwaller et al., "Molecular Transformer", 2019)."""

RING_CLOSURES: tuple[str, ...] = tuple(str(d) for d in range(10)) + tuple(
    f"%{n}" for n in range(10, 100)
)
"""Ring-closure tokens: always known, whatever the contract's vocabulary lists."""


class SmilesTokenizer:
    """SMILES to atom-level tokens over the contract's vocabulary (plus ring closures)."""

    def __init__(self, spec: MoleculeSpec) -> None:
        self.max_length = spec.max_length
        tokens = list(spec.vocabulary) + [t for t in RING_CLOSURES if t not in spec.vocabulary]
        self.tokens: tuple[str, ...] = tuple(tokens)
        self._ids = {token: index + 1 for index, token in enumerate(self.tokens)}

    @property
    def vocabulary_size(self) -> int:
        """Number of ids, padding included."""
        return len(self.tokens) + 1

    def tokenize(self, smiles: str, *, patient_id: str) -> list[str]:
        """Split `smiles` into known tokens; `TokenizeError` names the first bad one."""
        if not smiles:
            raise TokenizeError(patient_id, "the SMILES string is empty")
        tokens: list[str] = []
        position = 0
        for match in SMILES_PATTERN.finditer(smiles):
            if match.start() != position:
                raise TokenizeError(
                    patient_id,
                    f"SMILES character {smiles[position]!r} at position {position}"
                    " is not valid SMILES",
                )
            token = match.group(0)
            if token not in self._ids:
                raise TokenizeError(
                    patient_id,
                    f"SMILES token {token!r} at position {position}"
                    " is not in the contract's molecule vocabulary",
                )
            tokens.append(token)
            position = match.end()
        if position != len(smiles):
            raise TokenizeError(
                patient_id,
                f"SMILES character {smiles[position]!r} at position {position} is not valid SMILES",
            )
        if len(tokens) > self.max_length:
            raise TokenizeError(
                patient_id,
                f"the molecule has {len(tokens)} tokens, more than the contract's"
                f" maximum {self.max_length}",
            )
        return tokens

    def encode(self, smiles: str, *, patient_id: str) -> list[int]:
        """Token ids (1-based) of `smiles`."""
        return [self._ids[token] for token in self.tokenize(smiles, patient_id=patient_id)]

    def decode(self, ids: Sequence[int]) -> str:
        """The SMILES string of `ids`, padding skipped."""
        return "".join(self.tokens[i - 1] for i in ids if i != PAD)


class ProteinTokenizer:
    """Protein sequences, one token per residue of the contract's alphabet."""

    def __init__(self, spec: ProteinSpec) -> None:
        self.max_length = spec.max_length
        self.alphabet = spec.alphabet
        self._ids = {residue: index + 1 for index, residue in enumerate(spec.alphabet)}

    @property
    def vocabulary_size(self) -> int:
        """Number of ids, padding included."""
        return len(self.alphabet) + 1

    def encode(self, sequence: str, *, patient_id: str) -> list[int]:
        """Residue ids (1-based); `TokenizeError` names the first unknown residue."""
        if not sequence:
            raise TokenizeError(patient_id, "the protein sequence is empty")
        ids: list[int] = []
        for position, residue in enumerate(sequence):
            index = self._ids.get(residue)
            if index is None:
                raise TokenizeError(
                    patient_id,
                    f"residue {residue!r} at position {position} is not in the contract's"
                    f" protein alphabet {self.alphabet}",
                )
            ids.append(index)
        if len(ids) > self.max_length:
            raise TokenizeError(
                patient_id,
                f"the protein has {len(ids)} residues, more than the contract's"
                f" maximum {self.max_length}",
            )
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The sequence of `ids`, padding skipped."""
        return "".join(self.alphabet[i - 1] for i in ids if i != PAD)


class ClinicalTokenizer:
    """Numeric features standardised by the contract's reference; codes as combined ids.

    Code ids are 1-based over all categorical features together (feature by feature, in
    vocabulary order), so one embedding table holds every code with its feature.
    """

    def __init__(self, contract: StudyContract) -> None:
        self.numeric = contract.numeric
        self._numeric_names = {feature.name for feature in contract.numeric}
        self._code_ids: dict[str, dict[str, int]] = {}
        next_id = 1
        for feature in contract.categorical:
            self._code_ids[feature.name] = {
                code: next_id + index for index, code in enumerate(feature.vocabulary)
            }
            next_id += len(feature.vocabulary)
        self.code_vocabulary_size = next_id

    def numeric_values(
        self, values: Mapping[str, float], *, patient_id: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """(standardised values, known mask), one entry per contract feature in order."""
        unknown = sorted(set(values) - self._numeric_names)
        if unknown:
            raise TokenizeError(patient_id, f"numeric features not in the contract: {unknown}")
        standardised = np.zeros(len(self.numeric), dtype=np.float32)
        known = np.zeros(len(self.numeric), dtype=bool)
        for index, feature in enumerate(self.numeric):
            if feature.name not in values:
                continue
            value = values[feature.name]
            if not math.isfinite(value) or not feature.minimum <= value <= feature.maximum:
                raise TokenizeError(
                    patient_id,
                    f"{feature.name} = {value} {feature.unit} is outside the plausible range"
                    f" [{feature.minimum:g}, {feature.maximum:g}]",
                )
            standardised[index] = (value - feature.reference_mean) / feature.reference_scale
            known[index] = True
        return standardised, known

    def code_ids(self, codes: Mapping[str, frozenset[str]], *, patient_id: str) -> list[int]:
        """Sorted ids of every code the patient has; unknown features or codes raise."""
        ids: list[int] = []
        for name, present in codes.items():
            vocabulary = self._code_ids.get(name)
            if vocabulary is None:
                raise TokenizeError(
                    patient_id, f"categorical feature {name!r} is not in the contract"
                )
            for code in sorted(present):
                if code not in vocabulary:
                    raise TokenizeError(
                        patient_id, f"code {code!r} of {name} is not in the contract's vocabulary"
                    )
                ids.append(vocabulary[code])
        return sorted(ids)


def omics_values(
    values: np.ndarray, panel: OmicsPanel, *, patient_id: str
) -> tuple[np.ndarray, np.ndarray]:
    """(transformed and standardised values, measured mask) in panel order; NaN = unmeasured."""
    raw = np.asarray(values, dtype=np.float64)
    if raw.shape != (len(panel.genes),):
        raise TokenizeError(
            patient_id, f"omics has {raw.size} values, the panel has {len(panel.genes)} genes"
        )
    measured = ~np.isnan(raw)
    bad = measured & ~np.isfinite(raw)
    if panel.transform == "log1p":
        bad |= measured & (raw < 0)
    if bad.any():
        gene = panel.genes[int(np.argmax(bad))]
        raise TokenizeError(
            patient_id,
            f"omics value of {gene} is {raw[bad][0]}, not a finite"
            + (" non-negative" if panel.transform == "log1p" else "")
            + " number",
        )
    transformed = np.log1p(np.where(measured, raw, 0.0)) if panel.transform == "log1p" else raw
    means = np.asarray(panel.gene_means or panel.reference_mean, dtype=np.float64)
    scales = np.asarray(panel.gene_scales or panel.reference_scale, dtype=np.float64)
    standardised = (transformed - means) / scales
    return np.where(measured, standardised, 0.0).astype(np.float32), measured


@lru_cache(maxsize=8)
def tokenizers_for(
    contract: StudyContract,
) -> tuple[ClinicalTokenizer, SmilesTokenizer | None, ProteinTokenizer | None]:
    """The contract's tokenizers, built once per contract (vocabularies can be large)."""
    return (
        ClinicalTokenizer(contract),
        SmilesTokenizer(contract.molecule) if contract.molecule is not None else None,
        ProteinTokenizer(contract.protein) if contract.protein is not None else None,
    )


# --- A batch of patients as tensors -------------------------------------------------


def input_layout(contract: StudyContract) -> tuple[str, ...]:
    """Names of the network's input tensors, in order; the one definition of that order.

    Every tensor's first dimension is the patient. Present only where the contract has
    the part: `clinical.values` float32 (n, features) standardised, 0 where unknown;
    `clinical.known` bool (n, features); `clinical.codes` int64 (n, codes) code ids,
    0-padded; `omics.values` float32 (n, genes), 0 where unmeasured; `omics.known` bool
    (n, genes); `molecule.ids` int64 (n, molecule.max_length) 0-padded; `protein.ids`
    int64 (n, protein.max_length) 0-padded.
    """
    names: list[str] = []
    if contract.numeric:
        names += ["clinical.values", "clinical.known"]
    if contract.categorical:
        names.append("clinical.codes")
    if contract.omics is not None:
        names += ["omics.values", "omics.known"]
    if contract.molecule is not None:
        names.append("molecule.ids")
    if contract.protein is not None:
        names.append("protein.ids")
    return tuple(names)


def target_layout(contract: StudyContract) -> tuple[str, ...]:
    """Names of the target tensors that follow the inputs in `EncodedBatch.tensors()`.

    Per task, in contract order: `<task>.target` (binary, regression: float32 (n,);
    multiclass: int64 (n,) class index; survival: float32 (n, 2) = time, event; 0 where
    unlabelled) and `<task>.labelled` bool (n,).
    """
    return tuple(
        f"{task.name}.{part}" for task in contract.tasks for part in ("target", "labelled")
    )


def document_present(
    contract: StudyContract, inputs: Sequence[torch.Tensor]
) -> dict[Modality, torch.Tensor]:
    """Per modality, a bool (n,) tensor: does the patient have any token of it?

    A clinical document is present when any numeric value is known or any code is
    recorded; its unknown numeric features then appear as "missing" tokens.
    """
    named = dict(zip(input_layout(contract), inputs, strict=True))
    n = inputs[0].shape[0]
    present: dict[Modality, torch.Tensor] = {}
    if contract.numeric or contract.categorical:
        clinical = torch.zeros(n, dtype=torch.bool, device=inputs[0].device)
        if contract.numeric:
            clinical = clinical | named["clinical.known"].any(dim=1)
        if contract.categorical:
            clinical = clinical | (named["clinical.codes"] != PAD).any(dim=1)
        present["clinical"] = clinical
    if contract.omics is not None:
        present["omics"] = named["omics.known"].any(dim=1)
    if contract.molecule is not None:
        present["molecule"] = (named["molecule.ids"] != PAD).any(dim=1)
    if contract.protein is not None:
        present["protein"] = (named["protein.ids"] != PAD).any(dim=1)
    return present


def complete_numeric_inputs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Network inputs for a numeric-only contract whose every value is known.

    `values` (n, features) are already standardised, as the demo's site table holds them.
    """
    return values, torch.ones(values.shape, dtype=torch.bool, device=values.device)


@dataclass(frozen=True)
class EncodedBatch:
    """Patients as fixed-shape tensors: inputs in `input_layout` order, targets per task."""

    contract: StudyContract
    inputs: tuple[torch.Tensor, ...]
    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    """Task name -> (target, labelled mask)."""

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Inputs then (target, labelled) per task: what `TensorDataset` can carry."""
        flat = list(self.inputs)
        for task in self.contract.tasks:
            flat.extend(self.targets[task.name])
        return tuple(flat)

    def present(self) -> dict[Modality, torch.Tensor]:
        """Per modality, which patients have a document of it."""
        return document_present(self.contract, self.inputs)


def split_tensors(
    contract: StudyContract, tensors: Sequence[torch.Tensor]
) -> tuple[tuple[torch.Tensor, ...], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The inverse of `EncodedBatch.tensors()`: (inputs, task name -> (target, labelled))."""
    n_inputs = len(input_layout(contract))
    expected = n_inputs + 2 * len(contract.tasks)
    if len(tensors) != expected:
        raise InputError(
            f"expected {expected} tensors ({n_inputs} inputs and a target and mask for each"
            f" of {len(contract.tasks)} tasks), got {len(tensors)}"
        )
    inputs = tuple(tensors[:n_inputs])
    targets = {
        task.name: (tensors[n_inputs + 2 * i], tensors[n_inputs + 2 * i + 1])
        for i, task in enumerate(contract.tasks)
    }
    return inputs, targets


def _label(task: TaskSpec, targets: Mapping[str, float], *, patient_id: str) -> list[float] | None:
    """The task's label for one patient ([value] or [time, event]); None when unlabelled."""
    given = [field for field in task.label_fields if field in targets]
    if not given:
        return None
    if len(given) != len(task.label_fields):
        missing = sorted(set(task.label_fields) - set(given))
        raise TokenizeError(patient_id, f"task {task.name} is missing {missing}")
    values = [targets[field] for field in task.label_fields]
    for field, value in zip(task.label_fields, values, strict=True):
        if not math.isfinite(value):
            raise TokenizeError(patient_id, f"{field} = {value} is not finite")
    value = values[0]
    if task.kind == "binary" and value not in (0.0, 1.0):
        raise TokenizeError(patient_id, f"{task.target} = {value} is not 0 or 1")
    if task.kind == "multiclass" and (not value.is_integer() or not 0 <= value < task.outputs):
        raise TokenizeError(
            patient_id, f"{task.target} = {value} is not a class index below {task.outputs}"
        )
    if task.kind == "survival":
        if value < 0:
            raise TokenizeError(patient_id, f"{task.target} = {value} is a negative time")
        if values[1] not in (0.0, 1.0):
            raise TokenizeError(patient_id, f"{task.event} = {values[1]} is not 0 or 1")
    return values


def _targets(
    contract: StudyContract, samples: Sequence[PatientSample]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    fields = {field for task in contract.tasks for field in task.label_fields}
    for sample in samples:
        unknown = sorted(set(sample.targets) - fields)
        if unknown:
            raise TokenizeError(sample.patient_id, f"target fields not in the contract: {unknown}")
    result: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for task in contract.tasks:
        width = len(task.label_fields)
        values = np.zeros((len(samples), width), dtype=np.float32)
        labelled = np.zeros(len(samples), dtype=bool)
        for row, sample in enumerate(samples):
            label = _label(task, sample.targets, patient_id=sample.patient_id)
            if label is not None:
                values[row] = label
                labelled[row] = True
        target = torch.from_numpy(values if width == 2 else values[:, 0].copy())
        if task.kind == "multiclass":
            target = target.long()
        result[task.name] = (target, torch.from_numpy(labelled))
    return result


def _padded(rows: list[list[int]], width: int) -> torch.Tensor:
    ids = np.zeros((len(rows), width), dtype=np.int64)
    for row, values in enumerate(rows):
        ids[row, : len(values)] = values
    return torch.from_numpy(ids)


def _clinical_inputs(
    samples: Sequence[PatientSample], contract: StudyContract
) -> list[torch.Tensor]:
    clinical = tokenizers_for(contract)[0]
    inputs: list[torch.Tensor] = []
    if contract.numeric:
        values = np.zeros((len(samples), len(contract.numeric)), dtype=np.float32)
        known = np.zeros(values.shape, dtype=bool)
        for row, sample in enumerate(samples):
            values[row], known[row] = clinical.numeric_values(
                sample.numeric, patient_id=sample.patient_id
            )
        inputs += [torch.from_numpy(values), torch.from_numpy(known)]
    else:
        for sample in samples:
            if sample.numeric:
                raise TokenizeError(
                    sample.patient_id, "has numeric features; the contract has none"
                )
    codes = [clinical.code_ids(s.codes, patient_id=s.patient_id) for s in samples]
    if contract.categorical:
        # As wide as the most codes any patient here has (at least 1), so batches stay small.
        inputs.append(_padded(codes, max([1, *map(len, codes)])))
    return inputs


def _omics_inputs(samples: Sequence[PatientSample], contract: StudyContract) -> list[torch.Tensor]:
    if contract.omics is None:
        for sample in samples:
            if sample.omics is not None:
                raise TokenizeError(sample.patient_id, "has omics; the contract has none")
        return []
    values = np.zeros((len(samples), len(contract.omics.genes)), dtype=np.float32)
    known = np.zeros(values.shape, dtype=bool)
    for row, sample in enumerate(samples):
        if sample.omics is not None:
            values[row], known[row] = omics_values(
                sample.omics, contract.omics, patient_id=sample.patient_id
            )
    return [torch.from_numpy(values), torch.from_numpy(known)]


def _sequence_inputs(
    samples: Sequence[PatientSample],
    texts: Sequence[str | None],
    tokenizer: SmilesTokenizer | ProteinTokenizer | None,
    modality: str,
) -> list[torch.Tensor]:
    if tokenizer is None:
        for sample, text in zip(samples, texts, strict=True):
            if text is not None:
                raise TokenizeError(sample.patient_id, f"has a {modality}; the contract has none")
        return []
    rows = [
        [] if text is None else tokenizer.encode(text, patient_id=sample.patient_id)
        for sample, text in zip(samples, texts, strict=True)
    ]
    return [_padded(rows, tokenizer.max_length)]


def encode(samples: Sequence[PatientSample], contract: StudyContract) -> EncodedBatch:
    """Encode patients under `contract`; the first bad value raises `TokenizeError`."""
    _, smiles, protein = tokenizers_for(contract)
    inputs = [
        *_clinical_inputs(samples, contract),
        *_omics_inputs(samples, contract),
        *_sequence_inputs(samples, [s.smiles for s in samples], smiles, "molecule"),
        *_sequence_inputs(samples, [s.protein for s in samples], protein, "protein"),
    ]
    return EncodedBatch(contract, tuple(inputs), _targets(contract, samples))
