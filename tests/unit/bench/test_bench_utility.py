"""`medfed bench utility` on one study, one seed, two rounds: the JSON's structure, and its
classical references against lifelines fitted here on a design matrix built here (from
the sites' samples and the contract's reference scaling, not the benchmark's features)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index
from typer.testing import CliRunner

from medfed.bench.utility import PLAIN_ROUNDS
from medfed.cli import app
from medfed.client.config import load_site_config
from medfed.coordinator.study import load_study_file
from medfed.sites.manifest import load_site_data

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "consortium"
runner = CliRunner()


def _frame(samples: list, study_toml: Path) -> pd.DataFrame:  # type: ignore[type-arg]
    contract = load_study_file(study_toml).contract
    rows = []
    for sample in samples:
        row: dict[str, float] = {}
        for feature in contract.numeric:
            value = sample.numeric.get(feature.name)
            if value is None:
                row[feature.name], row[f"{feature.name}_missing"] = 0.0, 1.0
            else:
                standardised = (value - feature.reference_mean) / feature.reference_scale
                row[feature.name], row[f"{feature.name}_missing"] = standardised, 0.0
        row["T"] = sample.targets["time_days"]
        row["E"] = sample.targets["died"]
        rows.append(row)
    return pd.DataFrame(rows)


def _lifelines_c_index(train: pd.DataFrame, test: pd.DataFrame) -> float:
    covariates = [c for c in train.columns if c not in ("T", "E") and train[c].std() > 1e-9]
    fitter = CoxPHFitter(penalizer=0.1).fit(train[[*covariates, "T", "E"]], "T", "E")
    risk = fitter.predict_partial_hazard(test[covariates])
    return float(concordance_index(test["T"], -risk, test["E"]))


@pytest.mark.slow
def test_one_study_one_seed_gives_every_arm_and_lifelines_references(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "bench", "utility", "--study", "lung", "--seeds", "1", "--epsilon", "8,inf",
            "--rounds", "2", "--json", "--out", str(tmp_path),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    lung = document["studies"]["lung"]
    assert document["config"]["epsilons"] == ["8", "inf"]
    assert lung["metric"] == "c_index" and lung["higher_is_better"] is True
    sites = sorted(lung["patients"]["train"])
    assert sites == ["lung-csv", "lung-fhir", "lung-omop", "lung-parquet"]
    # The initial model and each round: 2 with DP; at least PLAIN_ROUNDS without.
    for arm, rounds in (("8", 2), ("inf", max(2, PLAIN_ROUNDS))):
        entry = lung["federated"][arm]
        assert len(entry["curve_mean"]) == rounds + 1
        assert entry["values"] == [entry["curve_mean"][-1]]
        assert 0.0 <= entry["mean"] <= 1.0
    assert 0 < lung["federated"]["8"]["epsilon_spent"] <= 8.0
    assert sorted(lung["sites_alone"]["medfed"]) == sites
    assert (tmp_path / "utility.json").is_file() and (tmp_path / "utility-lung.png").is_file()

    # The classical numbers, fitted here with lifelines on independently built features.
    study_toml = EXAMPLES / "studies" / "lung.toml"
    contract = load_study_file(study_toml).contract
    data = {
        site: load_site_data(load_site_config(EXAMPLES / site / "site.toml"), contract)
        for site in sites
    }
    held = _frame([s for d in data.values() for s in d.held_out], study_toml)
    pooled = _frame([s for d in data.values() for s in d.train], study_toml)
    assert lung["patients"]["held_out"] == len(held)
    assert lung["pooled"]["classical"]["mean"] == pytest.approx(
        _lifelines_c_index(pooled, held), abs=1e-6
    )
    alone = lung["sites_alone"]["classical"]["lung-parquet"]["mean"]
    site_frame = _frame(list(data["lung-parquet"].train), study_toml)
    assert alone == pytest.approx(_lifelines_c_index(site_frame, held), abs=1e-6)
    finite = [
        v["mean"] for v in lung["sites_alone"]["classical"].values() if math.isfinite(v["mean"])
    ]
    assert lung["sites_alone"]["classical_mean"]["mean"] == pytest.approx(np.mean(finite))


def test_a_diverged_seed_is_counted_apart_and_the_others_summarised() -> None:
    from medfed.bench.utility import curve_summary

    result = curve_summary([[0.5, 0.6, 0.7], [0.5, math.nan, math.nan], [0.5, 0.62, 0.66]])
    assert result["diverged"] == 1
    assert result["mean"] == pytest.approx(0.68)
    assert result["curve_mean"] == pytest.approx([0.5, 0.61, 0.68])


def test_the_no_dp_arm_clips_the_batch_gradient_to_the_studys_norm() -> None:
    import torch

    from medfed.bench.utility import _ClippedSGD

    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = _ClippedSGD([weight], lr=0.5, max_norm=1.0)
    weight.grad = torch.tensor([3.0, 4.0])  # norm 5: clipped to norm 1
    optimizer.step()
    assert weight.detach().tolist() == pytest.approx([-0.3, -0.4])


def _study(metric: str, pooled: tuple[float, float], alone: float, fed: dict[str, float]) -> dict:
    def entry(value: float) -> dict[str, float]:
        return {"mean": value}

    return {
        "metric": metric,
        "pooled": {"classical": entry(pooled[0]), "medfed": entry(pooled[1])},
        "sites_alone": {"classical_mean": entry(alone), "medfed_mean": entry(alone)},
        "federated": {eps: entry(value) for eps, value in fed.items()},
    }


def test_targets_read_rmse_as_lower_is_better_and_dp_targets_only_where_the_issue_sets_them() -> (
    None
):
    from medfed.bench.utility_report import targets

    document = {
        "studies": {
            # RMSE: 2.0 is better than the classical 2.4 (met), 0.5 worse than medfed's 1.5
            "freesolv": _study("rmse", (2.4, 1.5), 2.5, {"inf": 2.0, "3": 3.0}),
            "lung": _study("c_index", (0.66, 0.65), 0.62, {"inf": 0.655, "3": 0.60}),
        }
    }
    lines = targets(document)
    assert "- freesolv: no DP within 0.02 of pooled classical: met (2.000 vs 2.400)" in lines
    assert "- freesolv: no DP within 0.01 of pooled medfed: NOT met (2.000 vs 1.500)" in lines
    assert not any(line.startswith("- freesolv: ε=") for line in lines)
    assert "- lung: no DP within 0.01 of pooled medfed: met (0.655 vs 0.650)" in lines
    assert "- lung: ε=3 within 0.03 of pooled: NOT met (0.600 vs 0.660)" in lines
    assert "- lung: ε=3 better than sites alone: NOT met (0.600 vs 0.620)" in lines
