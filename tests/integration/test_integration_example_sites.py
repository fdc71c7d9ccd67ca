"""The example consortium: `medfed site check` passes on every example site and fails, with
precise messages, on corrupted copies. Values are compared with the shipped files read
independently (the csv module), not with the connectors' own output."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import app
from medfed.client.config import load_site_config
from medfed.common import read_toml
from medfed.model.contract import StudyContract
from medfed.privacy.signing import SigningKey
from medfed.sites.manifest import load_site_data

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "consortium"
SITES = sorted(path.parent.name for path in EXAMPLES.glob("*/site.toml"))
runner = CliRunner()


def _copy(site: str, tmp_path: Path) -> Path:
    """The example site in a scratch folder, with example keys (the repository ships none)."""
    folder = tmp_path / site
    shutil.copytree(EXAMPLES / site, folder, ignore=shutil.ignore_patterns("keys"))
    (folder / "keys").mkdir()
    key = SigningKey.generate()
    key.save(folder / "keys" / "site-signing.key")
    key.public.save(folder / "keys" / "officer.pub")
    return folder


def _check(folder: Path) -> tuple[int, dict[str, object]]:
    study = EXAMPLES / "studies" / f"{folder.name.split('-')[0]}.toml"
    result = runner.invoke(
        app, ["site", "check", str(folder / "site.toml"), "--study", str(study), "--json"]
    )
    return result.exit_code, json.loads(result.stdout)


def test_there_are_sites_in_every_format() -> None:
    formats = set()
    for site in SITES:
        formats |= {d.format for d in load_site_config(EXAMPLES / site / "site.toml").datasets}
    assert formats == {"csv", "parquet", "fhir", "omop", "smiles", "fasta", "omics"}


@pytest.mark.parametrize("site", SITES)
def test_every_example_site_passes(tmp_path: Path, site: str) -> None:
    code, document = _check(_copy(site, tmp_path))
    assert code == 0, document["problems"]
    manifest = document["manifest"]
    assert isinstance(manifest, dict) and manifest["patients"] > 0


def test_the_csv_site_converts_pounds_to_kilograms(tmp_path: Path) -> None:
    folder = _copy("lung-csv", tmp_path)
    with (folder / "data" / "lung.csv").open(newline="") as handle:
        rows = {row["patient_id"]: row for row in csv.DictReader(handle)}
    contract = StudyContract.from_toml_table(
        read_toml(EXAMPLES / "studies" / "lung.toml", ValueError)["contract"]
    )
    data = load_site_data(load_site_config(folder / "site.toml"), contract)
    assert data.problems == ()
    assert {s.patient_id for s in data.samples} == set(rows)
    for sample in data.samples:
        row = rows[sample.patient_id]
        if row["wt.loss"]:
            assert sample.numeric["weight_loss"] == pytest.approx(
                float(row["wt.loss"]) * 0.45359237
            )
        assert sample.targets == {"time_days": float(row["time"]), "died": float(row["status"])}


def _edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new, count), encoding="utf-8")


def _lines_with(path: Path, needle: str) -> int:
    return next(
        n for n, line in enumerate(path.read_text().splitlines(), start=1) if needle in line
    )


CORRUPTIONS: dict[str, tuple[str, Callable[[Path], tuple[str, int | None, str | None, str]]]] = {}


def corruption(
    site: str,
) -> Callable[[Callable[[Path], tuple[str, int | None, str | None, str]]], None]:
    def register(func: Callable[[Path], tuple[str, int | None, str | None, str]]) -> None:
        CORRUPTIONS[func.__name__] = (site, func)

    return register


@corruption("lung-csv")
def negative_age(folder: Path) -> tuple[str, int | None, str | None, str]:
    path = folder / "data" / "lung.csv"
    line = 3
    rows = path.read_text().splitlines()
    cells = rows[line - 1].split(",")
    cells[3] = "-" + cells[3]
    rows[line - 1] = ",".join(cells)
    path.write_text("\n".join(rows) + "\n")
    return "lung.csv", line, "age", "is outside the plausible range [18, 100]"


@corruption("lung-csv")
def semicolons(folder: Path) -> tuple[str, int | None, str | None, str]:
    path = folder / "data" / "lung.csv"
    path.write_text(path.read_text().replace(",", ";"))
    return "lung.csv", 1, "patient_id", "the header looks ';'-separated"


@corruption("lung-fhir")
def invalid_fhir(folder: Path) -> tuple[str, int | None, str | None, str]:
    path = folder / "data" / "lung.ndjson"
    line = _lines_with(path, '"id": "lung-004-n0"')
    _edit(path, '"id": "lung-004-n0", "status": "final"', '"id": "lung-004-n0", "status": 7')
    return "lung.ndjson", line, "Observation/lung-004-n0", "invalid FHIR Observation: status"


@corruption("lung-omop")
def text_in_omop_value(folder: Path) -> tuple[str, int | None, str | None, str]:
    path = folder / "data" / "lung" / "measurement.csv"
    _edit(path, "lung-005,0,30525-0,74,a", "lung-005,0,30525-0,seventy-four,a")
    return "measurement.csv", 2, "value_as_number", "'seventy-four' is not a number"


@corruption("breast-b")
def gene_missing(folder: Path) -> tuple[str, int | None, str | None, str]:
    path = folder / "data" / "expression.tsv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(line for line in lines if not line.startswith("X200965_s_at")) + "\n")
    return "expression.tsv", 1, None, "gene panel mismatch: 1 of the panel's 76 genes"


@corruption("breast-a")
def unknown_grade(folder: Path) -> tuple[str, int | None, str | None, str]:
    import pyarrow.parquet as pq

    path = folder / "data" / "clinical.parquet"
    table = pq.read_table(path).to_pylist()
    table[4]["grade"] = "grade 5"
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(table), path)
    return "clinical.parquet", 6, "grade", "code 'grade 5' is not in the local vocabulary of grade"


@corruption("freesolv-b")
def bad_smiles(folder: Path) -> tuple[str, int | None, str | None, str]:
    path = folder / "data" / "molecules.csv"
    _edit(path, "mol-003;CCc1cnccn1;", "mol-003;CCc1cnccn;")
    return "molecules.csv", 3, "smiles", "leaves ring 1 unclosed"


@corruption("amp-a")
def bad_residue(folder: Path) -> tuple[str, int | None, str | None, str]:
    path = folder / "data" / "peptides.fasta"
    _edit(path, "GLWSKIKEVGKEAAKAAAKAAGKAALGAVSEAV", "GLWSKIKEVGKEAAKAAAKAAGKAALGAVSEAVJ")
    return "peptides.fasta", 2, "residue 34", "residue 'J' is not in the alphabet"


@corruption("amp-b")
def unknown_key(folder: Path) -> tuple[str, int | None, str | None, str]:
    _edit(folder / "site.toml", 'format = "fasta"', 'format = "fasta"\nalphabet = "ACGT"')
    return "site.toml", None, None, "key datasets.0.alphabet: Extra inputs are not permitted"


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupted_copies_fail_naming_where(tmp_path: Path, name: str) -> None:
    site, corrupt = CORRUPTIONS[name]
    folder = _copy(site, tmp_path)
    file, row, column, message = corrupt(folder)
    study = EXAMPLES / "studies" / f"{site.split('-')[0]}.toml"
    result = runner.invoke(
        app, ["site", "check", str(folder / "site.toml"), "--study", str(study), "--json"]
    )
    assert result.exit_code == 1
    if file == "site.toml":  # a config error: one line on stderr, nothing on stdout
        assert message in result.stderr and result.stdout == ""
        return
    problems = json.loads(result.stdout)["problems"]
    assert any(
        Path(p["file"]).name == file
        and p["row"] == row
        and p["column"] == column
        and message in p["message"]
        for p in problems
    ), problems


@pytest.mark.parametrize("site", SITES)
def test_every_example_site_encodes_into_the_models_tensors(tmp_path: Path, site: str) -> None:
    """What a site check passes, the model's tokenizers take whole (one row per patient)."""
    from medfed.model.tokenizers import encode

    study = EXAMPLES / "studies" / f"{site.split('-')[0]}.toml"
    contract = StudyContract.from_toml_table(read_toml(study, ValueError)["contract"])
    data = load_site_data(load_site_config(_copy(site, tmp_path) / "site.toml"), contract)
    batch = encode(data.samples, contract)
    assert len(batch) == len(data.samples)


@pytest.mark.slow  # a fresh interpreter imports medfed: 5-30 s on a shared machine
def test_the_console_script_fails_in_one_line_without_a_traceback(tmp_path: Path) -> None:
    """The real `python -m medfed` process, on a copy whose table is gone."""
    import subprocess
    import sys

    folder = _copy("lung-csv", tmp_path)
    (folder / "data" / "lung.csv").unlink()
    study = EXAMPLES / "studies" / "lung.toml"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "medfed",
            "site",
            "check",
            str(folder / "site.toml"),
            "--study",
            str(study),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert f"problem: {folder / 'data' / 'lung.csv'}: cannot be read" in done.stdout.replace(
        "\n", ""
    )
