"""The site trainer: everything a site does for a round, callable in-process.

It loads the site's datasets for the study's contract once (refusing data with any
problem), checks the incoming model against its announced digest, asks the privacy gate
for the round's noise and permission, trains with DP-SGD only the parameter groups its
data can teach, and records the signed spend before the update is handed back.
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

from medfed.client.config import SiteConfig
from medfed.client.errors import SiteRefusal
from medfed.client.privacy_gate import PrivacyGate
from medfed.client.protocol import (
    EvaluateReply,
    EvaluateRequest,
    HeldOut,
    ModelCheck,
    TrainReply,
    TrainRequest,
)
from medfed.model.contract import StudyContract, TaskSpec
from medfed.model.devices import resolve_device
from medfed.model.errors import DeviceUnavailableError, ModelError
from medfed.model.losses import SURVIVAL_DP_CAVEAT
from medfed.model.network import (
    MedModel,
    PresetName,
    arrays_sha256,
    build_model,
    load_arrays,
    model_identity,
    parameter_group,
    state_arrays,
)
from medfed.model.tokenizers import encode
from medfed.model.train import TaskMetrics, evaluate, train_steps
from medfed.privacy.dpsgd import (
    DEFAULT_GRAD_SAMPLE_MODE,
    DpSgdSettings,
    GradSampleMode,
    make_private,
)
from medfed.privacy.ledger import PrivacyLedger
from medfed.privacy.receipts import UpdateReceipt
from medfed.sites.errors import DataError, SiteError
from medfed.sites.manifest import SiteData, load_site_data, modalities_of

log = logging.getLogger(__name__)

Tensors = tuple[torch.Tensor, ...]


def _reported_task(contract: StudyContract) -> TaskSpec:
    """The task whose loss a site reports in `ModelCheck`: the first binary task (the
    coordinator ranks models by its AUROC), else the first task."""
    binary = [task for task in contract.tasks if task.kind == "binary"]
    return binary[0] if binary else contract.tasks[0]


def load_training_data(config: SiteConfig, contract: StudyContract) -> SiteData:
    """The site's datasets read for `contract`; `SiteRefusal` naming the first problems
    if any row is bad (nothing is ever trained on a bad row)."""
    try:
        return load_site_data(config, contract).require_clean()
    except DataError as exc:
        raise SiteRefusal(f"the site's data does not meet the study's contract: {exc}") from exc
    except SiteError as exc:
        raise SiteRefusal(f"the site's data could not be read: {exc}") from exc


def trainable_groups(data: SiteData, contract: StudyContract) -> tuple[str, ...]:
    """The parameter groups this site's training data can teach: the encoder of each
    modality some training patient has, the fusion, and the head of each task some
    training patient is labelled for. `SiteRefusal` if the data can feed no modality or
    no task of the contract."""
    present = {modality for sample in data.train for modality in modalities_of(sample)}
    modalities = [m for m in contract.modalities if m in present]
    tasks = [
        task.name
        for task in contract.tasks
        if any(all(f in s.targets for f in task.label_fields) for s in data.train)
    ]
    if not modalities:
        raise SiteRefusal(
            f"none of the study's modalities {list(contract.modalities)} is in this site's"
            " training data"
        )
    if not tasks:
        raise SiteRefusal(
            f"this site has no labels for any of the study's tasks"
            f" {[task.name for task in contract.tasks]}"
        )
    return (*(f"encoders.{m}" for m in modalities), "fusion", *(f"heads.{t}" for t in tasks))


def freeze_untrained(model: torch.nn.Module, groups: tuple[str, ...]) -> None:
    """Stop gradients to every parameter outside `groups`: done before `make_private`,
    so neither DP noise nor updates touch what this site does not train."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(parameter_group(name) in groups)


def _encoded(data: SiteData, contract: StudyContract) -> tuple[Tensors, Tensors]:
    """The (training, held-out) patients as `EncodedBatch.tensors()`."""
    try:
        return (
            encode(list(data.train), contract).tensors(),
            encode(list(data.held_out), contract).tensors(),
        )
    except ModelError as exc:
        raise SiteRefusal(f"the site's data does not fit the study's contract: {exc}") from exc


def _first_of_kind(
    contract: StudyContract, metrics: Mapping[str, TaskMetrics], kind: str, key: str
) -> float:
    for task in contract.tasks:
        if task.kind == kind:
            return metrics[task.name][key]
    return math.nan


class SiteTrainer:
    """One site's data for one contract, its ledger, privacy gate and training logic."""

    def __init__(
        self,
        config: SiteConfig,
        contract: StudyContract,
        *,
        ledger: PrivacyLedger | None = None,
        grad_sample_mode: GradSampleMode = DEFAULT_GRAD_SAMPLE_MODE,
    ) -> None:
        self.site_id = config.site.id
        self._config = config
        self._contract = contract
        self._grad_sample_mode: GradSampleMode = grad_sample_mode
        self._reported_task = _reported_task(contract)
        try:
            # site.toml's accelerator; an unavailable one is refused, never swapped for CPU.
            self._device = resolve_device(config.accelerator)
        except DeviceUnavailableError as exc:
            raise SiteRefusal(f"site.toml's accelerator {config.accelerator!r}: {exc}") from exc
        self._data = load_training_data(config, contract)
        self._groups = trainable_groups(self._data, contract)
        # Encoded once and kept warm: every round of this contract trains on these tensors.
        self._train, self._eval = _encoded(self._data, contract)
        if any(task.kind == "survival" and not task.discrete_hazard for task in contract.tasks):
            log.warning("site %s: WARNING: %s", self.site_id, SURVIVAL_DP_CAVEAT)
        self._ledger = PrivacyLedger(config.ledger_path) if ledger is None else ledger
        self._gate = PrivacyGate(config, self._ledger)

    @property
    def contract(self) -> StudyContract:
        return self._contract

    @property
    def ledger(self) -> PrivacyLedger:
        return self._ledger

    @property
    def dataset_fingerprint(self) -> str:
        """The manifest's fingerprint: what the ledger and the audit key spends on."""
        return self._data.manifest.fingerprint

    @property
    def trained_groups(self) -> tuple[str, ...]:
        """The parameter groups this site trains (the others it returns unchanged)."""
        return self._groups

    @property
    def patients(self) -> int:
        """Training patients: the site's aggregation weight, reported to the scheduler."""
        return len(self._data.train)

    def _model_for(
        self,
        arrays: Mapping[str, np.ndarray],
        digest: str,
        preset: PresetName,
        identity: str = "",
    ) -> MedModel:
        expected = model_identity(preset, self._contract)
        if identity and identity != expected:
            raise SiteRefusal(
                f"the coordinator's model is {identity!r}, this site's code builds"
                f" {expected!r} for the study: refusing a model it does not run"
            )
        actual = arrays_sha256(arrays)
        if actual != digest:
            raise SiteRefusal(
                f"the model received does not match its announced digest ({actual[:12]} !="
                f" {digest[:12]}); refusing to train on it"
            )
        model = build_model(preset, contract=self._contract, seed=0, device=self._device)
        try:
            load_arrays(model, arrays)
        except ValueError as exc:
            raise SiteRefusal(
                f"the model received does not fit the study's network: {exc}"
            ) from exc
        return model

    def _held_out(self, metrics: Mapping[str, TaskMetrics]) -> HeldOut:
        """The metrics the coordinator reads: the reported task's examples, loss, AUROC
        (binary) and accuracy; the first survival task's c-index, regression task's RMSE."""
        task = metrics[self._reported_task.name]
        binary = self._reported_task.kind == "binary"
        accuracy = (
            task["accuracy"]
            if binary
            else _first_of_kind(self._contract, metrics, "multiclass", "accuracy")
        )
        return HeldOut(
            examples=int(task["examples"]),
            loss=task["loss"],
            auroc=task["auroc"] if binary else math.nan,
            accuracy=accuracy,
            c_index=_first_of_kind(self._contract, metrics, "survival", "c_index"),
            rmse=_first_of_kind(self._contract, metrics, "regression", "rmse"),
        )

    def _check(self, model: MedModel) -> ModelCheck:
        """How `model` does here. Held-out metrics over fewer patients than the policy's
        minimum cohort are withheld (reported as 0 patients, undefined values)."""
        on_train = self._held_out(evaluate(model, self._train, self._contract))
        held_out = self._held_out(evaluate(model, self._eval, self._contract))
        if held_out.examples < self._config.privacy.min_cohort_k:
            held_out = HeldOut(examples=0, loss=math.nan, auroc=math.nan, accuracy=math.nan)
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
        dataset = self.dataset_fingerprint
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
            request.arrays, request.model_sha256, request.preset, request.model_identity
        )
        anchor = {name: tensor.detach().clone() for name, tensor in model.named_parameters()}
        # The groups this data can teach that the preset's network has (a linear model
        # has no encoders or fusion).
        present = {parameter_group(name) for name, _ in model.named_parameters()}
        groups = tuple(group for group in self._groups if group in present)
        freeze_untrained(model, groups)
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
                proximal_mu=request.proximal_mu,
                anchor=anchor if request.proximal_mu > 0 else None,
            )
        if not self._gate.record(request, plan, dataset=dataset):
            # Another process trained this round meanwhile and recorded it first; its
            # update is the one that may leave, this one is withheld.
            raise SiteRefusal(
                f"run {request.run_id} round {request.round} was trained here concurrently;"
                " withholding this second update so privacy is not spent twice"
            )
        # The study's own spend on this dataset (not the total over every study).
        epsilon = self._gate.study_epsilon(dataset, plan.study, delta=request.delta)
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
            trained_groups=",".join(groups),
            dataset_sha256=dataset,
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
            request.arrays, request.model_sha256, request.preset, request.model_identity
        )
        return EvaluateReply(site_id=self.site_id, result=self._check(model))
