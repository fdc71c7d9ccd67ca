"""Seconds to load one site's data (read, check, join, fingerprint) per clinical format.

Writes one synthetic site per format (`sites.synthetic_multimodal`) on a clinical contract
with 8 numeric features, two coded features and a binary task, then times
`sites.manifest.load_site_data` on it. Prints one JSON document on stdout; it reports
figures and never passes or fails on them.

    .venv/bin/python bench/site_load.py [--patients 5000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medfed.model.contract import DEMO_CONTRACT, CategoricalFeature
from medfed.sites.config import DatasetConfig
from medfed.sites.manifest import load_site_data
from medfed.sites.synthetic_multimodal import write_multimodal_consortium

CONTRACT = DEMO_CONTRACT.model_copy(
    update={
        "categorical": (
            CategoricalFeature(name="diagnoses", system="icd10", vocabulary=("E11", "I10", "J45")),
            CategoricalFeature(name="drugs", system="atc", vocabulary=("A10BA02", "C09AA05")),
        )
    }
)
FORMATS: tuple[Literal["csv", "parquet", "fhir", "omop"], ...] = ("csv", "parquet", "fhir", "omop")


@dataclass(frozen=True)
class _Site:
    datasets: tuple[DatasetConfig, ...]
    source: Path
    data_dir: Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    figures: dict[str, dict[str, float | int]] = {}
    with tempfile.TemporaryDirectory() as folder:
        sites = write_multimodal_consortium(
            Path(folder),
            CONTRACT,
            n_sites=len(FORMATS),
            seed=1,
            formats=FORMATS,
            patients=(args.patients, args.patients),
        )
        for site in sites:
            config = _Site(site.datasets, site.folder / "site.toml", site.folder)
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                data = load_site_data(config, CONTRACT)
                times.append(time.perf_counter() - started)
            size = sum(p.stat().st_size for p in site.folder.rglob("*") if p.is_file())
            figures[site.clinical_format] = {
                "patients": data.manifest.patients,
                "problems": len(data.problems),
                "bytes": size,
                "median_s": round(statistics.median(times), 3),
                "patients_per_s": round(data.manifest.patients / statistics.median(times)),
            }
            print(f"{site.clinical_format}: {figures[site.clinical_format]}", file=sys.stderr)
    document = {
        "benchmark": "site_load",
        "patients_per_site": args.patients,
        "repeats": args.repeats,
        "python": platform.python_version(),
        "by_format": figures,
    }
    sys.stdout.write(json.dumps(document) + "\n")


if __name__ == "__main__":
    main()
