"""The site trainer: everything a site does for a round, callable in-process.

It loads and validates the site's data once, checks the incoming model against its
announced digest, asks the privacy gate for the round's noise and permission, trains
with DP-SGD, and records the signed spend before the update is handed back.
Simulation and tests call it directly; the Flower ClientApp calls it for each message.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import TensorDataset

from client.config import SiteConfig
from client.errors import SiteRefusal
from client.privacy_gate import PrivacyGate
from client.protocol import (
    EvaluateReply,
    EvaluateRequest,
    ModelCheck,
    TrainReply,
    TrainRequest,
)
from client.site_samples import site_table_samples
from model.contract import StudyContract, TaskSpec
from model.errors import ModelError
from model.losses import SURVIVAL_DP_CAVEAT
from model.network import (
    MedModel,
    PresetName,
    arrays_sha256,
    build_model,
    load_arrays,
    state_arrays,
)
from model.tokenizers import encode
from model.train import EvalResult, TaskMetrics, binary_result, evaluate, train_steps
from privacy.dpsgd import DEFAULT_GRAD_SAMPLE_MODE, DpSgdSettings, GradSampleMode, make_private
from privacy.ledger import PrivacyLedger
from privacy.receipts import UpdateReceipt
from sites.synthetic import TABLE_NAME
from sites.tabular import SiteTable, read_site_table

log = logging.getLogger(__name__)


def _reported_task(contract: StudyContract) -> TaskSpec:
    """The task whose metrics a site reports in `ModelCheck`: the first binary task (the
    coordinator ranks models by its AUROC), else the first task (loss only)."""
    binary = [task for task in contract.tasks if task.kind == "binary"]
    return binary[0] if binary else contract.tasks[0]


def _encoded(
    table: SiteTable, contract: StudyContract
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The table's (training, held-out) patients as `EncodedBatch.tensors()`."""
    train, held_out = site_table_samples(table, contract)
    try:
        return encode(train, contract).tensors(), encode(held_out, contract).tensors()
    except ModelError as exc:
        raise SiteRefusal(f"the site's data does not fit the study's contract: {exc}") from exc


class SiteTrainer:
    """One site's data, ledger, privacy gate and training logic."""

    def __init__(
        self,
        config: SiteConfig,
        contract: StudyContract,
        *,
        grad_sample_mode: GradSampleMode = DEFAULT_GRAD_SAMPLE_MODE,
    ) -> None:
        self.site_id = config.site.id
        self._config = config
        self._contract = contract
        self._grad_sample_mode: GradSampleMode = grad_sample_mode
        self._reported_task = _reported_task(contract)
        self._table: SiteTable = read_site_table(config.data_dir / TABLE_NAME, contract)
        # Encoded once at start-up and kept warm: every round trains on these tensors.
        self._train, self._eval = _encoded(self._table, contract)
        if any(task.kind == "survival" for task in contract.tasks):
            log.warning("site %s: WARNING: %s", self.site_id, SURVIVAL_DP_CAVEAT)
        self._ledger = PrivacyLedger(config.ledger_path)
        self._gate = PrivacyGate(config, self._ledger)

    @property
    def ledger(self) -> PrivacyLedger:
        return self._ledger

    @property
    def dataset_fingerprint(self) -> str:
        return self._table.fingerprint

    @property
    def patients(self) -> int:
        """Training patients: the site's aggregation weight, reported to the scheduler."""
        return len(self._table.train_labels)

    def _model_for(
        self, arrays: Mapping[str, np.ndarray], digest: str, preset: PresetName, n_features: int
    ) -> MedModel:
        if n_features != len(self._contract.numeric):
            raise SiteRefusal(
                f"the study asks for {n_features} features; this site's contract has"
                f" {len(self._contract.numeric)}"
            )
        actual = arrays_sha256(arrays)
        if actual != digest:
            raise SiteRefusal(
                f"the model received does not match its announced digest ({actual[:12]} !="
                f" {digest[:12]}); refusing to train on it"
            )
        model = build_model(preset, contract=self._contract, seed=0)
        try:
            load_arrays(model, arrays)
        except ValueError as exc:
            raise SiteRefusal(
                f"the model received does not fit the study's network: {exc}"
            ) from exc
        return model

    def _reported(self, metrics: dict[str, TaskMetrics]) -> EvalResult:
        """The reported task's metrics as the `EvalResult` the coordinator reads."""
        task = metrics[self._reported_task.name]
        if self._reported_task.kind == "binary":
            return binary_result(task)
        return EvalResult(
            examples=int(task["examples"]), loss=task["loss"], auroc=math.nan, accuracy=math.nan
        )

    def _check(self, model: MedModel) -> ModelCheck:
        """How `model` does here. Held-out metrics over fewer patients than the policy's
        minimum cohort are withheld (reported as 0 patients, undefined values)."""
        on_train = self._reported(evaluate(model, self._train, self._contract))
        held_out = self._reported(evaluate(model, self._eval, self._contract))
        if held_out.examples < self._config.privacy.min_cohort_k:
            held_out = EvalResult(examples=0, loss=math.nan, auroc=math.nan, accuracy=math.nan)
        return ModelCheck(
            train_examples=self.train_patients, train_loss=on_train.loss, held_out=held_out
        )

    @property
    def train_patients(self) -> int:
        """Training patients: DP-SGD's population and this site's FedAvg weight."""
        return int(self._train[0].shape[0])

    def train(self, request: TrainRequest) -> TrainReply:
        """Pre-flight, train with DP-SGD, and record the spend before replying.

        A round that the policy or budget forbids is refused before any training step.
        """
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
        train_set = TensorDataset(*self._train)
        plan = self._gate.plan(request, dataset=dataset, patients=len(train_set))
        incoming = self._check(model)
        settings = DpSgdSettings(
            noise_multiplier=plan.event.noise_multiplier,
            max_grad_norm=request.max_grad_norm,
            sample_rate=request.sample_rate,
        )
        private = make_private(
            model,
            train_set,
            settings=settings,
            learning_rate=request.learning_rate,
            grad_sample_mode=self._grad_sample_mode,
        )
        if private.event(request.local_steps) != plan.event:
            raise SiteRefusal("the training would not match the planned privacy event")
        with warnings.catch_warnings():
            # Opacus's hooks fire on module outputs since inputs need no gradient: expected.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            # Opacus's functorch mode asks for a float32 autocast, which CPU autocast ignores.
            warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype")
            result = train_steps(
                private.model,
                private.optimizer,
                private.loader,
                steps=request.local_steps,
                contract=self._contract,
                reduce_loss=private.reduce_loss,
            )
        if not self._gate.record(request, plan, dataset=dataset):
            # Another process trained this round meanwhile and recorded it first; its
            # update is the one that may leave, this one is withheld.
            raise SiteRefusal(
                f"run {request.run_id} round {request.round} was trained here concurrently;"
                " withholding this second update so privacy is not spent twice"
            )
        epsilon = self._gate.dataset_epsilon(dataset, delta=request.delta)
        log.info(
            "site %s round %s: %d steps, noise %.3f, loss %.4f, epsilon %.3f",
            self.site_id,
            request.round,
            result.steps,
            plan.event.noise_multiplier,
            result.mean_loss,
            epsilon,
        )
        arrays = state_arrays(model)
        receipt = UpdateReceipt(
            run_id=request.run_id,
            study_sha256=request.study_sha256,
            round=request.round,
            model_sha256=request.model_sha256,
            update_sha256=arrays_sha256(arrays),
            site_id=self.site_id,
        )
        return TrainReply(
            site_id=self.site_id,
            arrays=arrays,
            receipt_signature=self._gate.sign_receipt(receipt),
            local_loss=result.mean_loss,
            epsilon=epsilon,
            noise_multiplier=plan.event.noise_multiplier,
            incoming=incoming,
        )

    def evaluate(self, request: EvaluateRequest) -> EvaluateReply:
        """Evaluate the global model on this site's held-out patients.

        A site with fewer training patients than the policy's minimum cohort reports
        nothing: even a loss over so few patients says too much about each of them.
        """
        minimum = self._config.privacy.min_cohort_k
        if self.train_patients < minimum:
            raise SiteRefusal(
                f"the dataset has {self.train_patients} training patients, fewer than"
                f" the site's minimum cohort {minimum}; no metric is reported"
            )
        model = self._model_for(
            request.arrays, request.model_sha256, request.preset, request.n_features
        )
        return EvaluateReply(site_id=self.site_id, result=self._check(model))
