"""`medfed model export | score`: a run's final model leaves as npz weights (no pickle),
its contract and a model card; a site scores its own patients with it, and the metric
it prints is sklearn's on the scores it wrote."""

from __future__ import annotations

import csv
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from medfed.app_bundle import build_app_dir
from medfed.cli import app
from medfed.coordinator.results import write_results
from medfed.model.contract import DEMO_CONTRACT
from medfed.model_export import ModelExportError, export_model, load_model
from medfed.run_report import RESULTS_NAME
from medfed.runs import _run_config
from tests.fakesites import FakeGrid, consortium, run, study
from tests.sitekit import make_study, write_sites

runner = CliRunner()


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, FakeGrid]]:
    """A finished 2-round run over fake sites, laid out as `medfed round start` does
    (once for the module: the tests only read it)."""
    folder = tmp_path_factory.mktemp("runs") / "resume-1"
    folder.mkdir(parents=True)
    settings = study(folder, num_server_rounds=2)
    build_app_dir(folder / "app", _run_config(settings, folder, resume=False))
    grid = FakeGrid(consortium())
    with pytest.MonkeyPatch.context() as patch:  # as the `server_identity` fixture does
        patch.setattr(TaskIdentity, "_run_id", 1)
        patch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
        patch.setattr(TaskIdentity, "_task_id", 1)
        run(grid, settings, report=lambda results: write_results(folder / RESULTS_NAME, results))
    yield folder, grid


def test_the_export_holds_the_final_weights_without_pickle(
    run_folder: tuple[Path, FakeGrid], tmp_path: Path
) -> None:
    folder, grid = run_folder
    result = runner.invoke(
        app, ["model", "export", str(folder), "--out", str(tmp_path / "model"), "--json"]
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "model"
    assert sorted(p.name for p in out.iterdir()) == [
        "MODEL_CARD.md", "contract.json", "model.json", "model.npz",
    ]  # fmt: skip
    # The weights read back with numpy alone, pickle refused, equal the final model sent.
    with zipfile.ZipFile(out / "model.npz") as archive:
        assert all(name.endswith(".npy") for name in archive.namelist())
    with np.load(out / "model.npz", allow_pickle=False) as weights:
        final = grid.final_model()
        assert sorted(weights.files) == sorted(final)
        for name, array in final.items():
            np.testing.assert_array_equal(weights[name], array)
    description = json.loads((out / "model.json").read_text())
    assert description["rounds"] == 2 and description["preset"] == "tiny"
    assert description["metric_name"] == "auroc"
    assert description["contract_sha256"] == DEMO_CONTRACT.sha256()
    card = (out / "MODEL_CARD.md").read_text()
    assert "AUROC" in card and "hospital-2" in card and "secure aggregation OFF" in card


def test_a_tampered_export_is_refused(run_folder: tuple[Path, FakeGrid], tmp_path: Path) -> None:
    folder, _ = run_folder
    out = export_model(folder, tmp_path / "model")
    with np.load(out / "model.npz", allow_pickle=False) as weights:
        arrays = {name: weights[name] for name in weights.files}
    first = sorted(arrays)[0]
    arrays[first] = arrays[first] + np.float32(0.5)
    np.savez(out / "model.npz", allow_pickle=False, **arrays)  # type: ignore[arg-type]
    with pytest.raises(ModelExportError, match="the weights do not match their SHA-256"):
        load_model(out)


def test_exporting_into_a_full_folder_is_refused(
    run_folder: tuple[Path, FakeGrid], tmp_path: Path
) -> None:
    folder, _ = run_folder
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "other").write_text("x")
    result = runner.invoke(app, ["model", "export", str(folder), "--out", str(tmp_path / "model")])
    assert result.exit_code == 1
    assert "exists and is not empty" in result.output


def test_a_site_scores_its_patients_locally(
    run_folder: tuple[Path, FakeGrid], tmp_path: Path
) -> None:
    folder, _ = run_folder
    model = export_model(folder, tmp_path / "model")
    (site,) = write_sites(tmp_path / "sites", make_study(sites=1), n_sites=1)
    scores = tmp_path / "scores.csv"

    result = runner.invoke(
        app, ["model", "score", str(model), str(site.site_toml), "--out", str(scores), "--json"]
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)

    with (site.site_toml.parent / "patients.csv").open(newline="") as handle:
        labels = {row["patient_id"]: int(row["readmitted_30d"]) for row in csv.DictReader(handle)}
    with scores.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["patient_id"] for row in rows] == sorted(labels)
    probabilities = [float(row["readmission_probability"]) for row in rows]
    assert all(0.0 < p < 1.0 for p in probabilities)
    truth = [labels[row["patient_id"]] for row in rows]
    assert document["patients"] == len(rows)
    assert document["metrics"]["readmission"]["auroc"] == pytest.approx(
        roc_auc_score(truth, probabilities), abs=1e-4
    )
