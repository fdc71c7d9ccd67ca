"""Ready demo sites for tests of the site and the round loop.

`write_sites` writes, for each hospital, what a provisioned site has: its patient table,
its signing key, its officer's public key, `site.toml` (the demo policy) and the officer's
signed approval of the study. The helpers below read those files back the way another
process would (a fresh ledger connection, the table parsed on its own), so tests compare
the site's replies against what is on disk, never against the site's own objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, RecordDict

from medfed.client.config import SiteConfig, load_site_config, render_site_toml
from medfed.client.protocol import EvaluateRequest, TrainRequest
from medfed.consortium import DEMO_POLICY, DemoSite, demo_study, write_demo_consortium
from medfed.coordinator.study import StudySettings
from medfed.model.contract import DEMO_CONTRACT as CONTRACT
from medfed.model.network import arrays_sha256, build_model, state_arrays
from medfed.privacy.ledger import PrivacyLedger, RecordedSpend
from medfed.privacy.signing import SigningKey, VerifyKey
from medfed.sites.synthetic import TABLE_NAME
from tests.reference_table import SiteTable, read_site_table

DELTA = 1e-5
POLICY = DEMO_POLICY
"""The policy `write_sites` gives every site: min noise 0.5, max clip 10, cap 10, ..."""

Arrays = dict[str, np.ndarray]


def make_study(
    *,
    name: str = "readmission-demo",
    rounds: int = 3,
    sites: int = 3,
    target_epsilon: float = 2.0,
    local_steps: int = 5,
    seed: int = 7,
    **changes: Any,
) -> StudySettings:
    """A demo study; `changes` are run-config keys with `_` for `-` (`min_sites=2`)."""
    values = {
        **demo_study(
            rounds=rounds,
            sites=sites,
            target_epsilon=target_epsilon,
            seed=seed,
            local_steps=local_steps,
        ).to_run_config(),
        "study-name": name,
        **{key.replace("_", "-"): value for key, value in changes.items()},
    }
    return StudySettings.from_run_config(values)


def write_sites(
    root: Path, study: StudySettings, *, n_sites: int = 1, seed: int = 3
) -> tuple[DemoSite, ...]:
    """`n_sites` demo hospitals under `root/hospital-<i>/`, each with `study` approved at
    its target epsilon."""
    return write_demo_consortium(root, study, n_sites=n_sites, seed=seed)


def site_config(site_toml: Path) -> SiteConfig:
    return load_site_config(site_toml)


def table_of(site_toml: Path) -> SiteTable:
    """The site's table parsed on its own: the reference for what the site trained on."""
    return read_site_table(site_config(site_toml).data_dir / TABLE_NAME, CONTRACT)


def fingerprint_of(site_toml: Path) -> str:
    """The manifest fingerprint of the site's data, read on its own (`sites.manifest`, the
    reader `medfed site check` uses): what the site's ledger keys its spend on."""
    from medfed.sites.manifest import load_site_data

    return load_site_data(site_config(site_toml), CONTRACT).manifest.fingerprint


def table_path(site_toml: Path) -> Path:
    return site_config(site_toml).data_dir / TABLE_NAME


def ledger_of(site_toml: Path) -> PrivacyLedger:
    """The site's ledger as another process sees it: a fresh connection to the file."""
    return PrivacyLedger(site_config(site_toml).ledger_path)


def spend_rows(site_toml: Path) -> list[RecordedSpend]:
    return ledger_of(site_toml).records()


def officer_of(site: DemoSite) -> SigningKey:
    return SigningKey.load(site.officer_key)


def site_public_key(site_toml: Path) -> VerifyKey:
    return SigningKey.load(site_config(site_toml).signing_key_path).public


def rewrite_policy(site_toml: Path, **changes: Any) -> SiteConfig:
    """Rewrite `[privacy]` of `site_toml` with `changes`; return the file read back."""
    config = site_config(site_toml)
    privacy = config.privacy.model_copy(update=changes)
    site_toml.write_text(
        render_site_toml(config.model_copy(update={"privacy": privacy})), encoding="utf-8"
    )
    return site_config(site_toml)


def global_arrays(seed: int = 7) -> Arrays:
    return state_arrays(build_model("tiny", contract=CONTRACT, seed=seed))


def train_request(
    study: StudySettings,
    round_number: int = 1,
    *,
    run_id: str = "run-1",
    arrays: Arrays | None = None,
    **changes: Any,
) -> TrainRequest:
    """The instruction the coordinator sends for `round_number` of `study`."""
    arrays = global_arrays() if arrays is None else arrays
    fields: dict[str, Any] = {
        "run_id": run_id,
        "study": study.name,
        "study_sha256": study.sha256(),
        "round": round_number,
        "planned_rounds": study.num_rounds,
        "arrays": arrays,
        "model_sha256": arrays_sha256(arrays),
        "preset": study.preset,
        "contract_json": CONTRACT.canonical_json(),
        "contract_sha256": CONTRACT.sha256(),
        "local_steps": study.local_steps,
        "learning_rate": study.learning_rate,
        "target_epsilon": study.target_epsilon,
        "max_grad_norm": study.max_grad_norm,
        "sample_rate": study.sample_rate,
        "delta": study.delta,
    }
    return TrainRequest(**{**fields, **changes})


def evaluate_request(
    arrays: Arrays, *, run_id: str = "run-1", round_number: int = 1
) -> EvaluateRequest:
    return EvaluateRequest(
        run_id=run_id,
        round=round_number,
        arrays=arrays,
        model_sha256=arrays_sha256(arrays),
        preset="tiny",
        contract_json=CONTRACT.canonical_json(),
        contract_sha256=CONTRACT.sha256(),
    )


def node_context(
    node_id: int, node_config: Mapping[str, Any], run_config: Mapping[str, Any] | None = None
) -> Context:
    """A ClientApp's context on SuperNode `node_id`."""
    return Context(
        run_id=1,
        node_id=node_id,
        node_config=dict(node_config),
        state=RecordDict(),
        run_config=dict(run_config or {}),
    )


def break_table(path: Path, line: int, column: str, cell: str) -> None:
    """Write `cell` into `column` of the file's row `line` (the header is row 1)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    cells = lines[line - 1].split(",")
    cells[header.index(column)] = cell
    lines[line - 1] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
