"""A run's final model as files a lead can hand out, and a site's local scoring with it.

`export_model` writes, from a run folder: the weights (`model.npz`, or
`model.safetensors` when that package is installed; never pickle), `contract.json` (the
study's data contract, canonical JSON), `model.json` (what the model is: preset,
digests of weights and contract, the study, rounds, metrics and epsilon per site) and
`MODEL_CARD.md` (the same for a reader). `score_site` loads such a folder, checks the
weights and contract against their digests, reads the site's own data for the
contract and writes a score per patient to a local file: nothing leaves the site.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medfed.errors import MedfedError
from medfed.model.contract import StudyContract

WeightsFormat = Literal["npz", "safetensors"]
MODEL_JSON = "model.json"
CONTRACT_JSON = "contract.json"
MODEL_CARD = "MODEL_CARD.md"
FORMAT = "medfed-model/1"


class ModelExportError(MedfedError):
    """A model cannot be exported, read or scored; the message names the file and why."""


@dataclass(frozen=True)
class ExportedModel:
    """A model folder as read back: its description, contract and weights."""

    folder: Path
    description: dict[str, Any]
    contract: StudyContract
    arrays: dict[str, np.ndarray]

    @property
    def preset(self) -> str:
        return str(self.description["preset"])


def _write_weights(folder: Path, arrays: Mapping[str, np.ndarray], fmt: WeightsFormat) -> str:
    named = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    if fmt == "safetensors":
        try:
            from safetensors.numpy import save_file
        except ImportError as exc:
            raise ModelExportError(
                "--format safetensors needs the safetensors package (pip install safetensors);"
                " npz needs nothing"
            ) from exc
        save_file(named, str(folder / "model.safetensors"))
        return "model.safetensors"
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **named)
    (folder / "model.npz").write_bytes(buffer.getvalue())
    return "model.npz"


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            return dict(load_file(str(path)))
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except ImportError as exc:
        raise ModelExportError(
            f"{path}: reading safetensors needs the safetensors package"
        ) from exc
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelExportError(f"{path}: the weights cannot be read ({exc})") from exc


def run_description(folder: Path) -> tuple[dict[str, Any], StudyContract, dict[str, np.ndarray]]:
    """From a run folder: what its final model is, the study's contract, the weights."""
    from medfed.coordinator.checkpoints import CHECKPOINTS_NAME, CheckpointStore
    from medfed.coordinator.errors import CoordinatorError
    from medfed.coordinator.results import read_results
    from medfed.model.network import arrays_sha256, model_identity
    from medfed.run_report import RESULTS_NAME, metric_name_of
    from medfed.runs import study_of

    study = study_of(folder)
    try:
        last = CheckpointStore(folder / CHECKPOINTS_NAME).load()
    except CoordinatorError as exc:
        raise ModelExportError(f"{folder}: {exc}") from exc
    if last is None:
        raise ModelExportError(f"{folder}: the run has no checkpoint (no model yet)")
    results = read_results(folder / RESULTS_NAME)
    records = [] if results is None else results.per_round
    final = records[-1] if records else None
    description: dict[str, Any] = {
        "format": FORMAT,
        "model_identity": model_identity(study.preset, study.contract),
        "preset": study.preset,
        "contract_sha256": study.contract.sha256(),
        "model_sha256": arrays_sha256(last.arrays),
        "run": folder.name,
        "run_id": last.run_id,
        "study": study.name,
        "study_sha256": study.sha256(),
        "rounds": last.round,
        "planned_rounds": study.num_rounds,
        "run_status": None if results is None else results.status,
        "strategy": study.strategy,
        "secure_aggregation": study.secure_aggregation,
        "target_epsilon": study.target_epsilon,
        "delta": study.delta,
        "metric_name": "auroc" if results is None else metric_name_of(results),
        "held_out_metric": None if final is None else final.metric,
        "held_out_metric_by_site": {} if final is None else final.metric_by_site,
        "epsilon_by_site": {} if final is None else final.epsilon_by_site,
        "sites": [] if results is None else results.sites,
    }
    return description, study.contract, last.arrays


def export_model(
    folder: Path, out: Path, *, fmt: WeightsFormat = "npz", now: dt.datetime | None = None
) -> Path:
    """Write the final model of the run in `folder` to the new folder `out`."""
    description, contract, arrays = run_description(folder)
    if out.exists() and any(out.iterdir()):
        raise ModelExportError(f"{out} exists and is not empty; name a new folder")
    out.mkdir(parents=True, exist_ok=True)
    description["weights"] = _write_weights(out, arrays, fmt)
    description["exported_at"] = (now or dt.datetime.now(dt.UTC)).isoformat()
    (out / CONTRACT_JSON).write_text(contract.canonical_json(), encoding="utf-8")
    (out / MODEL_JSON).write_text(json.dumps(description, indent=1), encoding="utf-8")
    (out / MODEL_CARD).write_text(model_card(description, contract), encoding="utf-8")
    return out


def model_card(description: Mapping[str, Any], contract: StudyContract) -> str:
    """The model card: what the model is, how it was trained, how it did, what it needs."""
    from medfed.run_report import METRIC_LABELS

    label = METRIC_LABELS.get(str(description["metric_name"]), str(description["metric_name"]))
    metric = description["held_out_metric"]
    by_site = description["held_out_metric_by_site"]
    epsilons = description["epsilon_by_site"]
    lines = [
        f"# Model card: {description['study']} ({description['run']})",
        "",
        f"- model: {description['model_identity']} (preset {description['preset']})",
        f"- weights: `{description.get('weights', '')}`, SHA-256 {description['model_sha256']}",
        f"- data contract: `{CONTRACT_JSON}`, SHA-256 {description['contract_sha256']}",
        f"- trained: {description['rounds']} of {description['planned_rounds']} rounds"
        f" ({description['run_status']}), strategy {description['strategy']}, secure"
        f" aggregation {'on' if description['secure_aggregation'] else 'OFF'}",
        f"- privacy: DP-SGD at every site, target epsilon {description['target_epsilon']:g}"
        f" at delta {description['delta']:g} per site and study",
        f"- sites: {', '.join(description['sites']) or 'none reported'}",
        "",
        "## Held-out performance",
        "",
        f"{label} over all sites' held-out patients (patient-weighted mean of the sites'):"
        f" {'not reported' if metric is None else f'{metric:.3f}'}",
        "",
        "| site | " + label + " | epsilon spent (this study) |",
        "| --- | --- | --- |",
        *(
            f"| {site} | {_shown(by_site.get(site))} | {_shown(epsilons.get(site))} |"
            for site in sorted({*by_site, *epsilons})
        ),
        "",
        "## What it needs",
        "",
        "Inputs as the contract defines them (units, ranges, vocabularies):",
        *(f"- {f.name} ({f.unit}, {f.minimum:g} to {f.maximum:g})" for f in contract.numeric),
        *(f"- {f.name} ({f.system}, {len(f.vocabulary)} codes)" for f in contract.categorical),
        *(f"- task {t.name}: {t.kind} of {', '.join(t.label_fields)}" for t in contract.tasks),
        "",
        "## Limits",
        "",
        "Metrics are on each site's held-out patients; a site below its `min_cohort_k`"
        " reports none. The model was trained with differential privacy; it is a research"
        " model, not a medical device. Score patients with `medfed model score`, at the"
        " site that holds them.",
        "",
    ]
    return "\n".join(lines)


def _shown(value: object) -> str:
    return "" if not isinstance(value, int | float) else f"{value:.3f}"


def load_model(folder: Path) -> ExportedModel:
    """An exported model, its weights and contract checked against their digests; or,
    given a run folder, its final model."""
    from medfed.model.network import arrays_sha256

    if not (folder / MODEL_JSON).is_file():
        if (folder / "checkpoints.db").is_file():
            description, contract, arrays = run_description(folder)
            return ExportedModel(folder, description, contract, arrays)
        raise ModelExportError(f"{folder}: neither an exported model ({MODEL_JSON}) nor a run")
    try:
        description = json.loads((folder / MODEL_JSON).read_text(encoding="utf-8"))
        contract = StudyContract.model_validate_json(
            (folder / CONTRACT_JSON).read_text(encoding="utf-8")
        )
        weights = folder / str(description["weights"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelExportError(f"{folder}: not a readable exported model ({exc})") from exc
    if description.get("format") != FORMAT:
        raise ModelExportError(f"{folder / MODEL_JSON}: format {description.get('format')!r}")
    if contract.sha256() != description.get("contract_sha256"):
        raise ModelExportError(f"{folder / CONTRACT_JSON}: does not match its SHA-256")
    arrays = _read_weights(weights)
    if arrays_sha256(arrays) != description.get("model_sha256"):
        raise ModelExportError(f"{weights}: the weights do not match their SHA-256")
    return ExportedModel(folder, description, contract, arrays)


@dataclass(frozen=True)
class Scored:
    """A site's scoring: patients scored, where the scores went, metrics per task."""

    patients: int
    out: Path
    metrics: dict[str, dict[str, float]]

    def to_json(self) -> dict[str, object]:
        """JSON has no NaN: an undefined metric (no labelled patients) is null."""
        metrics = {
            task: {name: value if np.isfinite(value) else None for name, value in values.items()}
            for task, values in self.metrics.items()
        }
        return {"patients": self.patients, "out": str(self.out), "metrics": metrics}


def score_site(model_folder: Path, site_toml: Path, out: Path) -> Scored:
    """Score every patient of the site in `site_toml` with the model; write one CSV row
    per patient to `out` (patient id, then each task's score) and return the metrics
    over the patients that have labels. The data must be clean (every problem named)."""
    import torch

    from medfed.client.config import load_site_config
    from medfed.model.network import build_model, load_arrays
    from medfed.model.tokenizers import encode
    from medfed.model.train import evaluate, predict
    from medfed.sites.manifest import load_site_data

    model_files = load_model(model_folder)
    contract = model_files.contract
    data = load_site_data(load_site_config(site_toml), contract).require_clean()
    model = build_model(model_files.preset, contract=contract, seed=0)  # type: ignore[arg-type]
    load_arrays(model, model_files.arrays)
    encoded = encode(data.samples, contract)
    outputs = predict(model, encoded.inputs)
    metrics = evaluate(model, encoded.tensors(), contract)
    columns: list[str] = ["patient_id"]
    values: list[torch.Tensor] = []
    for task in contract.tasks:
        output = outputs[task.name].reshape(len(encoded), -1)
        if task.kind == "binary":
            columns.append(f"{task.name}_probability")
            values.append(torch.sigmoid(output))
        elif task.kind == "multiclass":
            columns += [f"{task.name}_p_{name}" for name in task.classes]
            values.append(torch.softmax(output, dim=1))
        else:
            columns.append(f"{task.name}_risk" if task.kind == "survival" else task.name)
            values.append(output)
    table = torch.cat(values, dim=1).numpy() if values else np.zeros((len(encoded), 0))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for sample, row in zip(data.samples, table, strict=True):
        writer.writerow([sample.patient_id, *(f"{float(v):.6g}" for v in row)])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(buffer.getvalue(), encoding="utf-8")
    return Scored(len(data.samples), out, metrics)
