"""The site trainer: everything a site does for a round, callable in-process.

It loads the site's datasets for the study's contract once (refusing data with any
problem), checks the incoming model against its announced digest, asks the privacy gate
for the round's noise and permission, trains with DP-SGD only the parameter groups its
data can teach, and records the signed spend before the update is handed back.
Simulation and tests call it directly; the Flower ClientApp calls it for each message.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import TensorDataset

from medfed.client.config import SiteConfig
from medfed.client.errors import DATA_REASON, SETUP_REASON, BudgetRefusal, SiteRefusal
from medfed.client.metrics_release import noisy_check, patient_stats
from medfed.client.privacy_gate import (
    PrivacyGate,
    Refused,
    RoundAsk,
    cox_refusal,
    unbounded_tasks,
)
from medfed.client.protocol import (
    EvaluateReply,
    EvaluateRequest,
    ModelCheck,
    TrainReply,
    TrainRequest,
)
from medfed.model.contract import StudyContract, TaskSpec
from medfed.model.devices import resolve_device
from medfed.model.errors import DeviceUnavailableError, ModelError
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
from medfed.model.precision import autocast_dtype, precision_problem
from medfed.model.sample import PatientSample
from medfed.model.tokenizers import encode
from medfed.model.train import TrainResult, train_steps
from medfed.privacy.dpsgd import DpSgdSettings, GradSampleMode, PrivateTraining, make_private
from medfed.privacy.ledger import PrivacyLedger
from medfed.privacy.population import NoisyCount
from medfed.privacy.receipts import UpdateReceipt
from medfed.sites.errors import DataError, SiteError
from medfed.sites.manifest import (
    SiteData,
    SiteDataSource,
    configured_inputs,
    load_site_data,
    privacy_unit_of,
)

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
        raise SiteRefusal(
            f"the site's data does not meet the study's contract: {exc}", public=DATA_REASON
        ) from exc
    except SiteError as exc:
        raise SiteRefusal(f"the site's data could not be read: {exc}", public=DATA_REASON) from exc


def trainable_groups(config: SiteDataSource, contract: StudyContract) -> tuple[str, ...]:
    """The parameter groups this site trains: the encoder of each modality its
    configured datasets map, the fusion, and the head of each task whose label fields
    they map. Decided from `site.toml`, never from the data: which modalities or labels
    some patient has would otherwise leave the site in the reply. `SiteRefusal` if the
    configuration maps no modality or no task of the contract."""
    modalities, labels = configured_inputs(config, contract)
    tasks = [task.name for task in contract.tasks if set(task.label_fields) <= labels]
    present = [m for m in contract.modalities if m in modalities]
    if not present:
        raise SiteRefusal(
            f"none of the study's modalities {list(contract.modalities)} is in this site's"
            " configured datasets"
        )
    if not tasks:
        raise SiteRefusal(
            f"this site's datasets map no labels for any of the study's tasks"
            f" {[task.name for task in contract.tasks]}"
        )
    return (*(f"encoders.{m}" for m in present), "fusion", *(f"heads.{t}" for t in tasks))


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
        raise SiteRefusal(
            f"the site's data does not fit the study's contract: {exc}", public=DATA_REASON
        ) from exc


class SiteTrainer:
    """One site's data for one contract, its ledger, privacy gate and training logic."""

    def __init__(
        self,
        config: SiteConfig,
        contract: StudyContract,
        *,
        ledger: PrivacyLedger | None = None,
        grad_sample_mode: GradSampleMode | None = None,
    ) -> None:
        self.site_id = config.site.id
        self._config = config
        self._contract = contract
        training = config.training
        self._grad_sample_mode: GradSampleMode = grad_sample_mode or training.grad_sample_mode
        self._reported_task = _reported_task(contract)
        try:
            # site.toml's accelerator; an unavailable one is refused, never swapped for CPU.
            self._device = resolve_device(config.accelerator)
        except DeviceUnavailableError as exc:
            raise SiteRefusal(f"site.toml's accelerator {config.accelerator!r}: {exc}") from exc
        problem = precision_problem(training.precision, self._device)
        if problem is not None:
            raise SiteRefusal(f"site.toml's [training] precision: {problem}")
        self._autocast = autocast_dtype(training.precision)
        survival = any(task.kind == "survival" for task in contract.tasks)
        # A survival study's Cox loss needs the whole batch's risk sets: never split.
        self._physical_batch_size = None if survival else training.physical_batch_size
        self._data = load_training_data(config, contract)
        self._groups = trainable_groups(config, contract)
        # Encoded once and kept warm: every round of this contract trains on these tensors.
        self._train, self._eval = _encoded(self._data, contract)
        self._ledger = PrivacyLedger(config.ledger_path) if ledger is None else ledger
        self._gate = PrivacyGate(config, self._ledger)
        try:
            self._unit = privacy_unit_of(
                config, default=config.privacy.privacy_unit or self.site_id
            )
        except SiteError as exc:
            raise SiteRefusal(str(exc), public=SETUP_REASON) from exc
        cox = unbounded_tasks(contract)
        if cox and config.privacy.allow_unbounded_mechanisms:
            log.warning("site %s: WARNING: %s", self.site_id, cox_refusal(cox))
        self._count: NoisyCount | None = None

    @property
    def contract(self) -> StudyContract:
        return self._contract

    @property
    def ledger(self) -> PrivacyLedger:
        return self._ledger

    @property
    def privacy_unit(self) -> str:
        """The officer-declared patient population every spend of this site's data falls on."""
        return self._unit

    @property
    def samples(self) -> tuple[PatientSample, ...]:
        """Every patient of the site's data for this contract (training and held-out)."""
        return self._data.samples

    @property
    def gate(self) -> PrivacyGate:
        return self._gate

    @property
    def dataset_fingerprint(self) -> str:
        """The manifest's fingerprint: identifies a data version at the site (never sent)."""
        return self._data.manifest.fingerprint

    def noisy_count(self) -> NoisyCount:
        """The training patients' noised count (released and charged once per version)."""
        if self._count is None:
            self._count = self._gate.population(
                self._unit,
                patient_ids=[sample.patient_id for sample in self._data.samples],
                training=self.train_patients,
            )
        return self._count

    @property
    def trained_groups(self) -> tuple[str, ...]:
        """The parameter groups this site trains (the others it returns unchanged)."""
        return self._groups

    @property
    def patients(self) -> int:
        """Training patients as they may leave the site (noised): the aggregation weight."""
        return self.noisy_count().public

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

    def _check(self, model: MedModel) -> ModelCheck:
        """How `model` does here, as one DP release (`client.metrics_release`): the caller
        charges `release_event` before any of it leaves. The noised patient count stands
        in for the training count."""
        task = self._reported_task
        check = noisy_check(
            patient_stats(model, self._train, self._contract, task),
            patient_stats(model, self._eval, self._contract, task),
            noise_multiplier=self._config.privacy.metrics_noise_multiplier,
            task=task,
            min_cohort_k=self._config.privacy.min_cohort_k,
        )
        return replace(check, train_examples=self.noisy_count().public)

    @property
    def train_patients(self) -> int:
        """Training patients: DP-SGD's population and this site's FedAvg weight."""
        return int(self._train[0].shape[0])

    def preflight(self, ask: RoundAsk) -> Refused | None:
        """Why this site would refuse the round `ask` describes (a dry run), or None."""
        try:
            patients = self.noisy_count().public
        except BudgetRefusal as exc:
            return Refused("no-budget", str(exc))
        return self._gate.preflight(
            ask, unit=self._unit, patients=patients, contract=self._contract
        )

    def train(self, request: TrainRequest) -> TrainReply:
        """Pre-flight, train with DP-SGD, and record the spend before replying.

        A round that the policy or budget forbids is refused before any training step.
        """
        unit = self._unit
        already = [
            record
            for record in self._ledger.records(unit)
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
        count = self.noisy_count()
        plan = self._gate.plan(request, unit=unit, count=count, contract=self._contract)
        incoming = self._check(model)
        private = make_private(
            model,
            train_set,
            settings=DpSgdSettings(
                noise_multiplier=plan.event.noise_multiplier,
                max_grad_norm=request.max_grad_norm,
                sample_rate=request.sample_rate,
            ),
            learning_rate=request.learning_rate,
            grad_sample_mode=self._grad_sample_mode,
            public_patients=count.public,
        )
        if private.event(request.local_steps) != plan.event:
            raise SiteRefusal("the training would not match the planned privacy event")
        result = self._train_steps(private, request, anchor)
        if not self._gate.record(request, plan, unit=unit):
            # Another process trained this round meanwhile and recorded it first; its
            # update is the one that may leave, this one is withheld.
            raise SiteRefusal(
                f"run {request.run_id} round {request.round} was trained here concurrently;"
                " withholding this second update so privacy is not spent twice"
            )
        # The study's own spend on this unit (not the total over every study).
        epsilon = self._gate.study_epsilon(unit, plan.study, delta=request.delta)
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
            # The DP-SGD batches' own loss is not DP: the received model's noised loss on
            # the training patients stands in for it.
            local_loss=incoming.train_loss,
            epsilon=epsilon,
            noise_multiplier=plan.event.noise_multiplier,
            incoming=incoming,
            trained_groups=",".join(groups),
            dataset_sha256=self._gate.keyed_digest(self.dataset_fingerprint),
        )

    def _train_steps(
        self,
        private: PrivateTraining,
        request: TrainRequest,
        anchor: Mapping[str, torch.Tensor],
    ) -> TrainResult:
        with warnings.catch_warnings():
            # Opacus's hooks fire on module outputs since inputs need no gradient: expected.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            # Opacus's functorch mode asks for a float32 autocast, which CPU autocast ignores.
            warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype")
            return train_steps(
                private.model,
                private.optimizer,
                private.loader,
                steps=request.local_steps,
                contract=self._contract,
                reduce_loss=private.reduce_loss,
                proximal_mu=request.proximal_mu,
                anchor=dict(anchor) if request.proximal_mu > 0 else None,
                physical_batch_size=self._physical_batch_size,
                autocast_dtype=self._autocast,
            )

    def evaluate(self, request: EvaluateRequest) -> EvaluateReply:
        """How the global model does at this site, as one charged DP release.

        Each answer is a Gaussian release charged to the privacy unit: at most the
        policy's `max_evaluations_per_run` per run, one per (run, round), within the caps.
        """
        minimum = self._config.privacy.min_cohort_k
        if self.patients < minimum:
            raise SiteRefusal(
                f"the dataset has about {self.patients} training patients (noised), fewer"
                f" than the site's minimum cohort {minimum}; no metric is reported"
            )
        model = self._model_for(
            request.arrays, request.model_sha256, request.preset, request.model_identity
        )
        check = self._check(model)
        self._gate.charge_evaluation(self._unit, run_id=request.run_id, round_=request.round)
        return EvaluateReply(site_id=self.site_id, result=check)
