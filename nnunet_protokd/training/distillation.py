"""The base of every distilling trainer: a single-modality student plus a frozen multi-modality teacher."""
from __future__ import annotations

import json
import os

import torch
from nnunetv2.paths import nnUNet_results
from nnunetv2.utilities.file_path_utilities import get_output_folder
from nnunetv2.utilities.helpers import dummy_context

from nnunet_protokd.errors import TeacherError
from nnunet_protokd.training.base import SingleModalityTrainer
from nnunet_protokd.training.features import FEATURES, FeatureCapture
from nnunet_protokd.training.modality_dropout import (
    locate_modality_dropout_start,
    minimal_input_shape,
    start_from_modality_dropout,
)
from nnunet_protokd.training.records import RecordedSettings
from nnunet_protokd.training.teacher import TeacherCheckpoint, locate_teacher


class DistillationTrainer(RecordedSettings, SingleModalityTrainer):
    """Student trainer whose loss is nnU-Net's segmentation loss plus weighted distillation terms.

    Subclasses name their terms in `loss_terms` and compute them in `distillation_terms`; they may reweight
    the segmentation loss (`segmentation_weight`) and add checks of the teacher (`check_teacher`). The
    teacher and the settings are checked before nnU-Net creates the model folder (a finished student without its
    teacher still validates; training it again is refused in on_train_start); the teacher is built on the
    device in `initialize`, run under no_grad in every training step on the full multi-channel batch, and never
    saved: the checkpoint and `fold_X/distillation.json` record its path and sha256 instead, with the resolved
    settings and the plugin version (records.py), and resuming with `--c` checks them. The step itself, its
    checks and the logging of every term are LossTermTraining's (training.py).
    """
    loss_terms: tuple = ()
    distilled_features: tuple = FEATURES  # the captured features distillation_terms reads (FeatureCapture)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        if "ignore" in dataset_json.get("labels", {}):
            raise NotImplementedError(f"{self.__class__.__name__}: datasets with an ignore label are not supported")
        student_configuration = self.resolved_configuration(plans, configuration)
        self.resolve_settings(plans, configuration)
        self.teacher_checkpoint = self.missing_teacher = None
        try:
            self.teacher_checkpoint = locate_teacher(plans, configuration, fold, dataset_json, nnUNet_results.get(),
                                                     student_configuration)
            self.check_teacher(self.teacher_checkpoint, student_configuration)
        except TeacherError as error:
            # a finished student is validated (nnUNetv2_train --val) without its teacher; training needs it
            if not self.is_finished(plans, configuration, fold):
                raise
            self.teacher_checkpoint, self.missing_teacher = None, error
        # the modality-dropout model a student starts from (setting start_from), found and checked before nnU-Net
        # creates the model folder too; a finished student (validation) or a continued one needs it no more
        self.start_checkpoint = None
        if self.settings["start_from"] == "modality_dropout" and not self.is_finished(plans, configuration, fold):
            self.start_checkpoint = locate_modality_dropout_start(plans, configuration, fold, dataset_json,
                                                                  nnUNet_results.get(), student_configuration)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.teacher = self.student_features = None

    @property
    def logged_terms(self) -> tuple:
        return ("seg_loss",) + tuple(self.loss_terms)

    def is_finished(self, plans: dict, configuration: str, fold) -> bool:
        """Whether this student's fold has its checkpoint_final.pth (what `nnUNetv2_train --val` validates)."""
        return nnUNet_results.is_set() and os.path.isfile(os.path.join(get_output_folder(
            plans["dataset_name"], self.__class__.__name__, plans["plans_name"], configuration, fold),
            "checkpoint_final.pth"))

    def record(self) -> dict:
        started_from = {"started_from": self.start_checkpoint.identity()} if self.start_checkpoint else {}
        return {**super().record(), "modality": self.modality.name, "teacher": self.teacher_checkpoint.identity(),
                **started_from}

    def initialize(self):
        super().initialize()
        if self.start_checkpoint is not None:
            # before any training; a continued training (--c) loads its own checkpoint's weights over these
            start_from_modality_dropout(getattr(self.network, "_orig_mod", self.network), self.start_checkpoint,
                                        self.modality.name, minimal_input_shape(1, self.configuration_manager))
            self.print_to_log_file(f"started from {self.start_checkpoint.checkpoint_path}, first convolution sliced "
                                   f"to {self.modality.name}")
        self.student_features = FeatureCapture(self.network, self.distilled_features)
        if self.teacher_checkpoint is None:
            self.print_to_log_file(f"no teacher (validation and prediction only): {self.missing_teacher}")
            return
        # the teacher runs every step: compiled when the student is (nnU-Net's choice: CUDA, nnUNet_compile)
        self.teacher = self.teacher_checkpoint.build(self.device, compile_network=self._do_i_compile(),
                                                     features=self.distilled_features)
        self.print_to_log_file(f"distillation: {json.dumps(self.record())}", also_print_to_console=False)

    def on_train_start(self):
        if self.teacher_checkpoint is None:
            raise self.missing_teacher
        super().on_train_start()

    def check_teacher(self, teacher: TeacherCheckpoint, student_configuration: dict) -> None:
        """Method-specific requirements on the teacher; raise TeacherError. Runs before anything is written."""

    def segmentation_weight(self) -> float:
        return 1.0

    def distillation_terms(self, output, target, student_features: dict, teacher_logits: torch.Tensor,
                           teacher_features: dict) -> dict:
        """{name: (weight, value)} for each name in loss_terms; `output`/`target` as nnU-Net's loss gets them."""
        raise NotImplementedError

    @staticmethod
    def gradient_if(weight: float):
        """A term with weight 0 is left out of the loss (an ablation) but still computed and logged: without
        gradient, so that it costs no backward memory."""
        return dummy_context() if weight else torch.no_grad()

    def weighted_loss_terms(self, data, target) -> dict:
        teacher_logits, teacher_features = self.teacher(data)
        with self.student_features.recording() as student_features:
            output = self.network(self.modality.select(data))
        terms = self.distillation_terms(output, target, student_features, teacher_logits, teacher_features)
        return {"seg_loss": (self.segmentation_weight(), self.loss(output, target)), **terms}

    def check_checkpoint(self, checkpoint: dict, name: str) -> None:
        recorded = checkpoint.get("protokd", {}).get("teacher", {})
        current = self.teacher_checkpoint.identity() if self.teacher_checkpoint else None
        if recorded and current and recorded["sha256"] != current["sha256"]:
            raise TeacherError(f"this student was trained with the teacher {recorded['checkpoint']} (sha256 "
                               f"{recorded['sha256'][:12]}...), but its teacher is now {current['checkpoint']} "
                               f"(sha256 {current['sha256'][:12]}...); continuing would mix two teachers")
        super().check_checkpoint(checkpoint, name)
