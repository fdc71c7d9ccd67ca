"""Molecules (SMILES in `.smi` files) and protein sequences (FASTA), checked per token.

A SMILES string is split into atom-level tokens; every token must be one the contract's
vocabulary knows (ring-closure digits always are), brackets and ring closures must pair
up, and it must fit `max_length`. This checks syntax and vocabulary, not chemistry
(valences are not checked: that would need RDKit). A protein's residues must be in the
contract's alphabet.
"""

from __future__ import annotations

import re
from pathlib import Path

from medfed.model.contract import MoleculeSpec, ProteinSpec, StudyContract
from medfed.sites.config import DatasetConfig
from medfed.sites.connectors.tables import dataset_texts
from medfed.sites.records import DatasetRead, RecordBuilder, Where

SMILES_TOKEN = re.compile(
    r"(\[[^\[\]]+\]|Br|Cl|%\d{2}|[BCNOPSFIbcnops]|[0-9]|[=#\-/\\:().+~@?*$>])"
)
_RING = re.compile(r"^(%\d{2}|\d)$")


def smiles_tokens(smiles: str) -> list[str] | int:
    """The atom-level tokens of `smiles`, or the 0-based position of the first character
    that starts no token."""
    tokens: list[str] = []
    position = 0
    for match in SMILES_TOKEN.finditer(smiles):
        if match.start() != position:
            return position
        tokens.append(match.group())
        position = match.end()
    return tokens if position == len(smiles) else position


def check_smiles(smiles: str, spec: MoleculeSpec) -> str | None:
    """What is wrong with `smiles` for this contract, or None if nothing is."""
    if not smiles:
        return "SMILES is empty"
    tokens = smiles_tokens(smiles)
    if isinstance(tokens, int):
        return f"SMILES {smiles!r} has an invalid character {smiles[tokens]!r} at {tokens + 1}"
    known = set(spec.vocabulary)
    unknown = [t for t in tokens if not _RING.match(t) and t not in known]
    if unknown:
        return f"SMILES {smiles!r} has token {unknown[0]!r}, which the contract's vocabulary lacks"
    depth = 0
    for token in tokens:
        depth += {"(": 1, ")": -1}.get(token, 0)
        if depth < 0:
            return f"SMILES {smiles!r} closes a branch it never opened"
    if depth:
        return f"SMILES {smiles!r} leaves a branch open"
    open_rings = {t for t in tokens if _RING.match(t) and tokens.count(t) % 2}
    if open_rings:
        return f"SMILES {smiles!r} leaves ring {sorted(open_rings)[0]} unclosed"
    if len(tokens) > spec.max_length:
        return f"SMILES has {len(tokens)} tokens, more than the contract's {spec.max_length}"
    return None


def is_smi_file(path: Path) -> bool:
    """Whether `path` names a `.smi` file (one `SMILES<space>ID` per line), not a table."""
    return path.suffix.lower() in (".smi", ".smiles")


def check_protein(sequence: str, spec: ProteinSpec) -> tuple[int, str] | None:
    """(0-based position, message) of the first problem in `sequence`, or None."""
    if not sequence:
        return 0, "sequence is empty"
    alphabet = set(spec.alphabet)
    for position, residue in enumerate(sequence):
        if residue not in alphabet:
            return position, f"residue {residue!r} is not in the alphabet {spec.alphabet}"
    if len(sequence) > spec.max_length:
        return (
            0,
            f"sequence has {len(sequence)} residues, more than the contract's {spec.max_length}",
        )
    return None


def read_smi(dataset: DatasetConfig, contract: StudyContract, base: Path) -> DatasetRead:
    """Read `.smi` files (`SMILES<space>ID` per line). A SMILES dataset in a table (CSV,
    Parquet) is read by `read_tabular` instead (`medfed.sites.connectors.read_smiles`)."""
    builder = RecordBuilder(contract, dataset, one_row_per_patient=True)
    if contract.molecule is None:
        builder.problem(Where(f"dataset {dataset.name}"), "the study contract has no molecules")
        return builder.result()
    for path, text in dataset_texts(dataset.paths, base, dataset.encoding, builder.problems):
        for line, content in enumerate(text.splitlines(), start=1):
            fields = content.split()
            if not fields or content.startswith("#"):
                continue
            if len(fields) < 2:
                builder.problem(Where(str(path), line), "needs a SMILES and a patient id")
                continue
            smiles, patient_id = fields[0], fields[1]
            problem = check_smiles(smiles, contract.molecule)
            if problem is not None:
                builder.problem(Where(str(path), line, "smiles"), problem)
                continue
            record = builder.record(patient_id)
            if record.smiles not in (None, smiles):
                builder.problem(Where(str(path), line), f"patient {patient_id!r} repeats")
                continue
            record.smiles = smiles
    return builder.result()


def read_fasta(dataset: DatasetConfig, contract: StudyContract, base: Path) -> DatasetRead:
    """Read FASTA files: `>PATIENT_ID key=value ...` headers; targets from the key=values."""
    builder = RecordBuilder(contract, dataset, one_row_per_patient=True)
    builder.check_mapping(Where(f"dataset {dataset.name}"))
    if contract.protein is None:
        builder.problem(Where(f"dataset {dataset.name}"), "the study contract has no proteins")
        return builder.result()
    for path, text in dataset_texts(dataset.paths, base, dataset.encoding, builder.problems):
        _read_fasta_text(str(path), text, contract.protein, builder)
    return builder.result()


def _read_fasta_text(name: str, text: str, spec: ProteinSpec, builder: RecordBuilder) -> None:
    entries: list[tuple[int, str, list[tuple[int, str]]]] = []
    for line, content in enumerate(text.splitlines(), start=1):
        stripped = content.strip()
        if not stripped or stripped.startswith(";"):
            continue
        if stripped.startswith(">"):
            entries.append((line, stripped[1:], []))
        elif not entries:
            builder.problem(Where(name, line), "sequence before any '>' header")
            return
        else:
            entries[-1][2].append((line, stripped))
    if not entries:
        builder.problem(Where(name), "holds no FASTA records")
    for line, header, lines in entries:
        fields = header.split()
        if not fields:
            builder.problem(Where(name, line), "header names no patient id")
            continue
        patient_id = fields[0]
        sequence = "".join(part for _, part in lines).upper()
        problem = check_protein(sequence, spec)
        if problem is not None:
            where_line, column = _locate(lines, problem[0], line)
            builder.problem(Where(name, where_line, f"residue {column}"), problem[1])
            continue
        record = builder.record(patient_id)
        if record.protein is not None:
            builder.problem(Where(name, line), f"patient {patient_id!r} repeats")
            continue
        record.protein = sequence
        values = dict(field.split("=", 1) for field in fields[1:] if "=" in field)
        for target, source in builder.target_sources().items():
            builder.add_target(
                patient_id, target, values.get(source.column or target), Where(name, line, target)
            )


def _locate(lines: list[tuple[int, str]], position: int, header_line: int) -> tuple[int, int]:
    """The file line and 1-based column of residue `position` of a multi-line sequence."""
    for line, part in lines:
        if position < len(part):
            return line, position + 1
        position -= len(part)
    return header_line, 1
