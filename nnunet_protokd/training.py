"""What the plugin's trainers share: schedules from the plans and the single-modality student base class."""
from __future__ import annotations

import os

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from torch import distributed as dist

from nnunet_protokd.configurations import (FINAL_VALIDATION_KEY, ConfigurationError, configuration_settings,
                                           resolved_configuration, schedule_of)
from nnunet_protokd.modality import StudentModality, with_input_channel_check
from nnunet_protokd.plots import plot_loss_terms


def apply_schedule(trainer: nnUNetTrainer) -> None:
    """Epochs and iterations from the configuration's settings (see configurations.py), so that a short
    schedule is recorded in the model folder's plans.json instead of living in an environment variable."""
    for key, value in schedule_of(trainer.configuration_manager.configuration).items():
        setattr(trainer, key, value)
    trainer.final_validation = configuration_settings(trainer.configuration_manager.configuration).get(
        FINAL_VALIDATION_KEY, True)


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


class MultiModalityTrainer(nnUNetTrainer):
    """nnU-Net training on every channel (a teacher); refuses student configurations."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # checked before nnU-Net creates the model folder, so that a wrong call leaves nothing behind
        resolved = resolved_configuration(plans, configuration)
        modality = configuration_settings(resolved).get("modality")
        if modality is not None:
            raise ConfigurationError(f"{self.__class__.__name__} trains on all channels, but configuration "
                                     f"{configuration!r} is a {modality} student configuration; use its base "
                                     f"{plans['configurations'][configuration].get('inherits_from')!r}")
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self)

    build_network_architecture = staticmethod(build_checked_network)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if not final_validation_skipped(self):
            super().perform_actual_validation(save_probabilities)


class SingleModalityTrainer(nnUNetTrainer):
    """nnU-Net training of a one-modality student on a multi-channel preprocessed dataset.

    The configuration names the modality. Batches keep every channel (distilling subclasses give them to the
    teacher); the student network sees only its own, in training, validation and nnU-Net's final validation.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        modality = StudentModality.of_configuration(plans, configuration, dataset_json)
        # the model folder then holds single-channel plans.json/dataset.json, which is what prediction reads
        super().__init__(modality.single_channel_plans(plans), configuration, fold,
                         modality.single_channel_dataset_json(dataset_json), device)
        self.modality = modality
        apply_schedule(self)
        self.print_to_log_file(f"student modality: {modality.name} (channel {modality.channel_index} of the "
                               f"preprocessed data)", also_print_to_console=False)

    build_network_architecture = staticmethod(build_checked_network)

    def train_step(self, batch: dict) -> dict:
        return super().train_step({**batch, "data": self.modality.select(batch["data"])})

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


class LossTermLogging:
    """Mixin for an nnU-Net trainer whose train_step returns the terms of its loss: each epoch's mean of every
    term in `logged_terms` goes to the training log, nnU-Net's logger (so checkpoints keep it) and
    fold_X/distillation_progress.png. Call `register_logged_terms()` once nnU-Net's __init__ has made the logger."""
    logged_terms: tuple = ()

    def register_logged_terms(self) -> None:
        for name in self.logged_terms:
            self.logger.local_logger.my_fantastic_logging.setdefault(name, [])

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
        self.print_to_log_file("train " + ", ".join(f"{n} {v:.4g}" for n, v in means.items()))

    def on_epoch_end(self):
        if self.local_rank == 0:
            plot_loss_terms({n: self.logger.get_value(n, step=None) for n in self.logged_terms},
                            os.path.join(self.output_folder, "distillation_progress.png"), self.__class__.__name__)
        super().on_epoch_end()
