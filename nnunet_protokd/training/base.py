"""What the plugin's trainers share: schedules from the plans and the single-modality student base class."""
from __future__ import annotations

import os
import random

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast
from torch import distributed as dist

from nnunet_protokd.channels import StudentModality, with_input_channel_check
from nnunet_protokd.errors import ConfigurationError, show_user_errors_in_nnunet_commands
from nnunet_protokd.plans import ConfigurationResolvedOnce, configuration_settings, schedule_of
from nnunet_protokd.settings import FINAL_VALIDATION_KEY
from nnunet_protokd.training.features import compiled_submodules_plain, unwrap
from nnunet_protokd.training.progress import plot_loss_terms

# nnUNetv2_train/-predict import this module through our trainers: our input errors then print as one line there
show_user_errors_in_nnunet_commands()


def apply_schedule(trainer: nnUNetTrainer) -> None:
    """Epochs and iterations from the configuration's settings (see configurations.py), so that a short
    schedule is recorded in the model folder's plans.json instead of living in an environment variable."""
    for key, value in schedule_of(trainer.configuration_manager.configuration).items():
        if key == "seed":  # before nnU-Net builds the network (initialize): its initial weights are seeded
            seed_everything(value)
        else:
            setattr(trainer, key, value)
    trainer.final_validation = configuration_settings(trainer.configuration_manager.configuration).get(
        FINAL_VALIDATION_KEY, True)


def seed_everything(seed: int) -> None:
    """torch, numpy and random (nnU-Net's data loader draws with numpy and random)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def final_validation_skipped(trainer: nnUNetTrainer) -> bool:
    # the setting skips the validation that ends a training run; `nnUNetv2_train --val` trains nothing (nnU-Net
    # makes the training data loader in on_train_start) and validates as asked
    if trainer.final_validation or trainer.dataloader_train is None:
        return False
    trainer.print_to_log_file(f"final validation skipped ({FINAL_VALIDATION_KEY}: false in the configuration)")
    return True


def build_checked_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                          enable_deep_supervision=True) -> torch.nn.Module:
    """nnU-Net's network, with a clear error when prediction feeds it the wrong number of channels."""
    network = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                       num_output_channels, enable_deep_supervision)
    return with_input_channel_check(network, num_input_channels, plans_manager.plans)


def batch_on_device(trainer: nnUNetTrainer, batch: dict) -> tuple:
    """(data, target) of an nnU-Net batch on the trainer's device (target: a tensor, or a list with deep
    supervision)."""
    data = batch["data"].to(trainer.device, non_blocking=True)
    target = batch["target"]
    target = [t.to(trainer.device, non_blocking=True) for t in target] if isinstance(target, list) \
        else target.to(trainer.device, non_blocking=True)
    return data, target


def step_autocast(trainer: nnUNetTrainer):
    """The precision of a training (or election) forward pass. On CUDA nnU-Net's: autocast, float16. On CPU
    nnU-Net trains in float32; a trainer whose `cpu_autocast_dtype` is set (tests do, to float16 or bfloat16)
    runs under CPU autocast instead, a stand-in for CUDA's that casts the same matmul-like ops."""
    if trainer.device.type == "cuda":
        return autocast("cuda", enabled=True)
    if trainer.device.type == "cpu" and trainer.cpu_autocast_dtype is not None:
        return autocast("cpu", dtype=trainer.cpu_autocast_dtype)
    return dummy_context()


def optimizer_step(trainer: nnUNetTrainer, loss: torch.Tensor) -> None:
    """nnU-Net's backward pass and update, as in its train_step: gradient scaling where it uses it (CUDA),
    gradient norm clipped at 12."""
    if trainer.grad_scaler is not None:
        trainer.grad_scaler.scale(loss).backward()
        trainer.grad_scaler.unscale_(trainer.optimizer)
        torch.nn.utils.clip_grad_norm_(trainer.network.parameters(), 12)
        trainer.grad_scaler.step(trainer.optimizer)
        trainer.grad_scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.network.parameters(), 12)
        trainer.optimizer.step()


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; training stops before the optimiser applies it."""


def stop_if_non_finite(trainer: nnUNetTrainer, names: tuple, values: torch.Tensor) -> np.ndarray:
    """The step's loss values on the host, or NonFiniteLossError naming the term(s) and the epoch.

    Checked before the optimiser step: GradScaler would skip such steps silently (CUDA) and a plain optimiser
    would write NaN into the weights (CPU). Under DDP the ranks agree first (one all-reduce of a flag), so that
    they all stop at the same step instead of the healthy ones waiting for the stopped one until the job's time
    limit. One device-to-host copy per step, as before the check existed.
    """
    non_finite_here = (~torch.isfinite(values)).any().to(torch.float32).reshape(1)
    if trainer.is_ddp:
        dist.all_reduce(non_finite_here, op=dist.ReduceOp.MAX)
    on_host = torch.cat((values, non_finite_here)).cpu().numpy()
    values_on_host, non_finite_anywhere = on_host[:-1], on_host[-1] > 0
    if non_finite_anywhere:
        bad = [f"{name} = {value}" for name, value in zip(names, values_on_host) if not np.isfinite(value)]
        where = ", ".join(bad) if bad else f"another rank's loss (this is rank {trainer.local_rank})"
        raise NonFiniteLossError(
            f"{trainer.__class__.__name__}, epoch {trainer.current_epoch}: {where} is not finite; training stopped "
            f"before the optimiser step so that the weights stay finite. Check the method's settings in the "
            f"configuration (plans.json), the learning rate and the data; the last checkpoint is "
            f"{os.path.join(trainer.output_folder, 'checkpoint_latest.pth')}")
    return values_on_host


def term_gradient_norms(trainer: nnUNetTrainer, terms: dict) -> dict:
    """How strongly each weighted loss term pulls on the student: the L2 norm, over all trainable parameters of
    the network, of the gradient of weight * term (one backward pass per term over a retained graph; the trainers
    do this once per epoch, see LossTermTraining.probe_term_gradients). Terms with weight 0 (ablations, computed
    without gradient) pull with 0.

    Under a GradScaler (float16 on CUDA) each term is scaled like the loss, so that small gradients do not
    underflow, and the norm is unscaled again; a scale that overflows is halved, as GradScaler would.
    """
    parameters = [p for p in trainer.network.parameters() if p.requires_grad]
    scale = trainer.grad_scaler.get_scale() if trainer.grad_scaler is not None else 1.0
    norms = {}
    for name, (weight, value) in terms.items():
        if not weight or not value.requires_grad:
            norms[name] = 0.0
            continue
        for _ in range(16):
            gradients = torch.autograd.grad(value * (weight * scale), parameters, retain_graph=True,
                                            allow_unused=True)
            norm = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g.float()) for g in gradients if g is not None])).item() / scale
            if np.isfinite(norm) or trainer.grad_scaler is None:
                break
            scale /= 2
        norms[name] = norm
    return norms


class LossTermTraining(ConfigurationResolvedOnce):
    """The one training step of the plugin's nnU-Net trainers, whose loss is a weighted sum of named terms.

    A trainer defines `logged_terms` and `weighted_loss_terms(data, target)` -> {name: (weight, value)}; this
    mixin runs the step like nnU-Net's train_step (same autocast, GradScaler, clipping and optimiser) and adds:
      - a non-finite term stops training before the optimiser step, naming the term and the epoch
        (stop_if_non_finite; all DDP ranks together);
      - on the first batch of every epoch, each term's pull on the student (probe_term_gradients);
      - every epoch: the mean of each term and its gradient norm in the training log, nnU-Net's logger (so
        checkpoints keep them) and fold_X/distillation_progress.png.
    Call `register_logged_terms()` once nnU-Net's __init__ has made the logger.
    """
    logged_terms: tuple = ("seg_loss",)
    cpu_autocast_dtype = None  # see step_autocast
    _gradient_norms = None

    def weighted_loss_terms(self, data: torch.Tensor, target) -> dict:
        raise NotImplementedError

    def probe_term_gradients(self, data: torch.Tensor, target) -> dict:
        """term_gradient_norms of an extra forward pass on `data` through the plain network and the plain loss
        (no update): a compiled graph's backward may run only once (over a retained compiled graph a second pass
        gives wrong gradients, and then so does the step's own backward; one that donates buffers refuses
        retain_graph outright, as nnU-Net's compiled Dice loss did at a 24x40x40 patch), and the plain module,
        which shares the compiled one's parameters and feature hooks, also bypasses DDP, which expects one
        backward per forward."""
        network = self.network
        self.network = unwrap(network)
        try:
            with compiled_submodules_plain(self.loss), step_autocast(self):
                terms = self.weighted_loss_terms(data, target)
            return term_gradient_norms(self, {name: terms[name] for name in self.logged_terms})
        finally:
            self.network = network

    def register_logged_terms(self) -> None:
        for name in self.logged_terms:
            for key in (name, f"grad_norm_{name}"):
                self.logger.local_logger.my_fantastic_logging.setdefault(key, [])

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._gradient_norms = None  # measured on this epoch's first step

    def train_step(self, batch: dict) -> dict:
        return self.train_step_with_terms(batch, self.weighted_loss_terms, self.logged_terms)

    def train_step_with_terms(self, batch: dict, weighted_loss_terms, logged_terms: tuple) -> dict:
        """train_step with other terms than the trainer's own: the benchmark times a distilling trainer's student
        in a unimodal step (SingleModalityTrainer's terms) beside its distilling step, in one process."""
        data, target = batch_on_device(self, batch)
        if self._gradient_norms is None:
            self._gradient_norms = self.probe_term_gradients(data, target)
        self.optimizer.zero_grad(set_to_none=True)
        with step_autocast(self):
            terms = weighted_loss_terms(data, target)
        loss = sum(weight * value for weight, value in terms.values() if weight)
        names = ("loss",) + tuple(logged_terms)
        values = torch.stack([loss] + [terms[n][1] for n in logged_terms]).detach().float()
        values = stop_if_non_finite(self, names, values)
        optimizer_step(self, loss)
        return dict(zip(names, values))

    def on_train_epoch_end(self, train_outputs: list):
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        means = {}
        for name in self.logged_terms:
            values = outputs[name]
            if self.is_ddp:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, values)
                values = np.concatenate([np.atleast_1d(v) for v in gathered])
            means[name] = float(np.mean(values))
            self.logger.log(name, means[name], self.current_epoch)
            # this rank's first step of the epoch (rank 0's is the one logged and plotted)
            self.logger.log(f"grad_norm_{name}", float(self._gradient_norms[name]), self.current_epoch)
        total = sum(self._gradient_norms.values()) or 1.0
        self.print_to_log_file("train " + ", ".join(f"{n} {v:.4g}" for n, v in means.items()) +
                               "; gradient norm at the network's parameters (share) " +
                               ", ".join(f"{n} {g:.3g} ({g / total:.0%})" for n, g in self._gradient_norms.items()))

    def on_epoch_end(self):
        if self.local_rank == 0 and len(self.logged_terms) > 1:  # a plain segmentation trainer has progress.png
            plot_loss_terms({n: self.logger.get_value(n, step=None) for n in self.logged_terms},
                            {n: self.logger.get_value(f"grad_norm_{n}", step=None) for n in self.logged_terms},
                            os.path.join(self.output_folder, "distillation_progress.png"), self.__class__.__name__)
        super().on_epoch_end()


class MultiModalityTrainer(LossTermTraining, nnUNetTrainer):
    """nnU-Net training on every channel (a teacher); refuses student configurations."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # checked before nnU-Net creates the model folder, so that a wrong call leaves nothing behind
        modality = configuration_settings(self.resolved_configuration(plans, configuration)).get("modality")
        if modality is not None:
            raise ConfigurationError(f"{self.__class__.__name__} trains on all channels, but configuration "
                                     f"{configuration!r} is a {modality} student configuration; use its base "
                                     f"{plans['configurations'][configuration].get('inherits_from')!r}")
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self)
        self.register_logged_terms()

    build_network_architecture = staticmethod(build_checked_network)

    def weighted_loss_terms(self, data, target) -> dict:
        return {"seg_loss": (1.0, self.loss(self.network(data), target))}

    def perform_actual_validation(self, save_probabilities: bool = False):
        if not final_validation_skipped(self):
            super().perform_actual_validation(save_probabilities)


class SingleModalityTrainer(LossTermTraining, nnUNetTrainer):
    """nnU-Net training of a one-modality student on a multi-channel preprocessed dataset.

    The configuration names the modality. Batches keep every channel (distilling subclasses give them to the
    teacher); the student network sees only its own, in training, validation and nnU-Net's final validation.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        modality = StudentModality.of_configuration(plans, configuration, dataset_json,
                                                    self.resolved_configuration(plans, configuration))
        # the model folder then holds single-channel plans.json/dataset.json, which is what prediction reads
        super().__init__(modality.single_channel_plans(plans), configuration, fold,
                         modality.single_channel_dataset_json(dataset_json), device)
        self.modality = modality
        apply_schedule(self)
        self.register_logged_terms()
        self.print_to_log_file(f"student modality: {modality.name} (channel {modality.channel_index} of the "
                               f"preprocessed data)", also_print_to_console=False)

    build_network_architecture = staticmethod(build_checked_network)

    def weighted_loss_terms(self, data, target) -> dict:
        return {"seg_loss": (1.0, self.loss(self.network(self.modality.select(data)), target))}

    def validation_step(self, batch: dict) -> dict:
        return super().validation_step({**batch, "data": self.modality.select(batch["data"])})

    def perform_actual_validation(self, save_probabilities: bool = False):
        if final_validation_skipped(self):
            return
        multi_channel_dataset_class = self.dataset_class
        self.dataset_class = self.modality.dataset_class(multi_channel_dataset_class)
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.dataset_class = multi_channel_dataset_class
