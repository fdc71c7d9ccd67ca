"""The site trainer: everything a site does for a round, callable in-process.

It loads and validates the site's data once, checks the incoming model against its
announced digest, trains with DP-SGD, and records the spend in the site's ledger
before the update is handed back. Simulation and tests call it directly; the
Flower ClientApp calls it for each message.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from client.errors import SiteRefusal
from client.protocol import (
    EvaluateReply,
    EvaluateRequest,
    ModelCheck,
    TrainReply,
    TrainRequest,
)
from model.contract import StudyContract
from model.network import (
    MedModel,
    PresetName,
    arrays_sha256,
    build_model,
    load_arrays,
    state_arrays,
)
from model.train import evaluate, train_steps
from privacy.dpsgd import DpSgdSettings, make_private
from privacy.ledger import PrivacyLedger, SpendRecord
from sites.synthetic import TABLE_NAME
from sites.tabular import SiteTable, read_site_table

log = logging.getLogger(__name__)

LEDGER_NAME = "privacy-ledger.sqlite"
STUDY_NAME = "demo"


class SiteTrainer:
    """One site's data, ledger and training logic."""

    def __init__(self, site_id: str, site_dir: Path, contract: StudyContract) -> None:
        self.site_id = site_id
        self._contract = contract
        self._table: SiteTable = read_site_table(site_dir / TABLE_NAME, contract)
        self._ledger = PrivacyLedger(site_dir / LEDGER_NAME)

    @property
    def ledger(self) -> PrivacyLedger:
        return self._ledger

    @property
    def dataset_fingerprint(self) -> str:
        return self._table.fingerprint

    def _model_for(
        self, arrays: Mapping[str, np.ndarray], digest: str, preset: PresetName, n_features: int
    ) -> MedModel:
        if n_features != len(self._contract.features):
            raise SiteRefusal(
                f"the study asks for {n_features} features; this site's contract has"
                f" {len(self._contract.features)}"
            )
        actual = arrays_sha256(arrays)
        if actual != digest:
            raise SiteRefusal(
                f"the model received does not match its announced digest ({actual[:12]} !="
                f" {digest[:12]}); refusing to train on it"
            )
        model = build_model(preset, n_features=n_features, seed=0)
        try:
            load_arrays(model, arrays)
        except ValueError as exc:
            raise SiteRefusal(
                f"the model received does not fit the study's network: {exc}"
            ) from exc
        return model

    def _eval_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.from_numpy(self._table.eval_features),
            torch.from_numpy(self._table.eval_labels),
        )

    def _train_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.from_numpy(self._table.train_features),
            torch.from_numpy(self._table.train_labels),
        )

    def _check(self, model: MedModel) -> ModelCheck:
        on_train = evaluate(model, *self._train_tensors())
        return ModelCheck(
            train_examples=on_train.examples,
            train_loss=on_train.loss,
            held_out=evaluate(model, *self._eval_tensors()),
        )

    def train(self, request: TrainRequest) -> TrainReply:
        """Train for the requested steps with DP-SGD and record the spend before replying."""
        dataset = self._table.fingerprint
        already = [
            record
            for record in self._ledger.records(dataset)
            if record.run_id == request.run_id and record.round == request.round
        ]
        if already:
            raise SiteRefusal(
                f"run {request.run_id} round {request.round} was already trained here;"
                " training it again would spend privacy twice"
            )
        model = self._model_for(
            request.arrays, request.model_sha256, request.preset, request.n_features
        )
        incoming = self._check(model)
        settings = DpSgdSettings(
            noise_multiplier=request.noise_multiplier,
            max_grad_norm=request.max_grad_norm,
            sample_rate=request.sample_rate,
        )
        train_set = TensorDataset(*self._train_tensors())
        private = make_private(
            model, train_set, settings=settings, learning_rate=request.learning_rate
        )
        with warnings.catch_warnings():
            # Opacus's hooks fire on module outputs since inputs need no gradient: expected.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            result = train_steps(
                private.model, private.optimizer, private.loader, steps=request.local_steps
            )
        recorded = self._ledger.record(
            SpendRecord(
                dataset=dataset,
                study=STUDY_NAME,
                run_id=request.run_id,
                round=request.round,
                event=private.event(result.steps),
                delta=request.delta,
            )
        )
        if not recorded:
            # Another process trained this round meanwhile and recorded it first; its
            # update is the one that may leave, this one is withheld.
            raise SiteRefusal(
                f"run {request.run_id} round {request.round} was trained here concurrently;"
                " withholding this second update so privacy is not spent twice"
            )
        epsilon = self._ledger.epsilon(dataset, delta=request.delta)
        log.info(
            "site %s round %s: %d steps, loss %.4f, epsilon %.3f",
            self.site_id,
            request.round,
            result.steps,
            result.mean_loss,
            epsilon,
        )
        return TrainReply(
            site_id=self.site_id,
            arrays=state_arrays(model),
            local_loss=result.mean_loss,
            epsilon=epsilon,
            incoming=incoming,
        )

    def evaluate(self, request: EvaluateRequest) -> EvaluateReply:
        """Evaluate the global model on this site's held-out patients."""
        model = self._model_for(
            request.arrays, request.model_sha256, request.preset, request.n_features
        )
        return EvaluateReply(site_id=self.site_id, result=self._check(model))
