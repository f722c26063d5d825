import json
import os

import numpy as np
import torch
from torch import distributed as dist

from nnunet_protokd.lckd.election import (
    elect_teachers,
    election_batches,
    election_tasks,
    random_available,
    single_modality_dice,
    split_election_cases,
)
from nnunet_protokd.lckd.network import ModalityFusionUNet, build_fusion_network
from nnunet_protokd.lckd.subsets import validate_and_log_subsets
from nnunet_protokd.training.base import MultiModalityTrainer, step_autocast
from nnunet_protokd.training.features import FeatureCapture, unwrap
from nnunet_protokd.training.losses import cross_modal_kd_loss
from nnunet_protokd.training.records import RecordedSettings


class LCKDTrainer(RecordedSettings, MultiModalityTrainer):
    """LCKD (Wang et al., MICCAI 2023): one network for any non-empty subset of the modalities.

    Network: nnunet_protokd.lckd.network.ModalityFusionUNet (shared encoder per modality; setting `fusion`: one slot per
    modality at every level, as the authors, or the mean). Schedule: nnU-Net's epochs; the first
    `full_modality_fraction` of them with every modality, the rest with random subsets (`subset_sampling`: 1 to
    M-1 modalities per batch, as the authors, or one of the 2^M - 1 subsets per item). Every `election_interval`
    epochs from the first (`kd_from_start`, as the authors) or from the first missing-modality epoch, the teachers
    are elected: per task, the modality with the best Dice alone on fixed patches of the `election_fraction` of
    the fold's training cases held out from training (never its validation cases). Loss: nnU-Net's segmentation
    loss + kd_weight * L1 between the teachers' bottlenecks and those of the other available modalities, summed
    over the pairs (`kd_pair_reduction`). The resolved settings go into the model folder's plans.json (they shape
    the network), the checkpoints and fold_X/distillation.json. Final validation: nnU-Net's for all modalities
    (fold_X/validation) and every subset (fold_X/validation_subsets/summary.json).
    """
    logged_terms = ("seg_loss", "kd_loss")
    build_network_architecture = staticmethod(build_fusion_network)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        if "ignore" in dataset_json.get("labels", {}):
            raise NotImplementedError("LCKDTrainer: datasets with an ignore label are not supported")
        self.resolve_settings(plans, configuration)
        super().__init__(self.plans_with_resolved_settings(plans, configuration), configuration, fold, dataset_json,
                         device)
        self.num_modalities = len(dataset_json["channel_names"])
        self.election_cases, self.teachers, self.election_batches, self.bottlenecks = [], None, [], None

    def _do_i_compile(self):
        return False  # see initialize


    @property
    def first_missing_modality_epoch(self) -> int:
        return round(self.settings["full_modality_fraction"] * self.num_epochs)

    @property
    def missing_modality_training(self) -> bool:
        return self.current_epoch >= self.first_missing_modality_epoch

    @property
    def first_election_epoch(self) -> int:
        return 0 if self.settings["kd_from_start"] else self.first_missing_modality_epoch

    def do_split(self):
        training_cases, validation_cases = super().do_split()
        training_cases, self.election_cases = split_election_cases(training_cases, self.settings["election_fraction"],
                                                                   self.fold)
        return training_cases, validation_cases

    def initialize(self):
        if MultiModalityTrainer._do_i_compile(self):
            self.print_to_log_file("torch.compile is off for LCKDTrainer: its shared encoder's batch (items x "
                                   "available modalities) changes with every drawn subset, so the graph would be "
                                   "re-traced")
        super().initialize()
        self.bottlenecks = FeatureCapture(self.network, ("bottleneck",))
        self.print_to_log_file(f"LCKD: {json.dumps(self.record())}", also_print_to_console=False)

    def on_train_start(self):
        super().on_train_start()
        self.election_batches = election_batches(self, self.election_cases, self.settings["election_batches"])

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        since = self.current_epoch - self.first_election_epoch
        # teachers is None also after resuming with --c: elect at once
        if since >= 0 and (self.teachers is None or since % self.settings["election_interval"] == 0):
            self.run_election()

    def run_election(self):
        network = unwrap(self.network)
        network.eval()
        names, tasks = election_tasks(self.dataset_json, self.label_manager.has_regions)
        with torch.no_grad(), step_autocast(self):
            def full_resolution_logits(data, available):
                output = network(data.to(self.device), available)
                return output[0] if isinstance(output, (list, tuple)) else output
            dice = single_modality_dice(full_resolution_logits, self.election_batches, self.num_modalities, tasks)
        network.train()
        election = [elect_teachers(dice)]
        if self.is_ddp:  # every rank distils from rank 0's teachers
            dist.broadcast_object_list(election, src=0)
        self.teachers = election[0]
        modalities = [self.dataset_json["channel_names"][str(m)] for m in range(self.num_modalities)]
        table = {modality: dict(zip(names, np.round(dice[m], 4).tolist())) for m, modality in enumerate(modalities)}
        elected = {task: None if t is None else modalities[t] for task, t in zip(names, self.teachers)}
        self.print_to_log_file(f"teacher election (epoch {self.current_epoch}): Dice alone {json.dumps(table)}; "
                               f"teachers {json.dumps(elected)}")
        if self.local_rank == 0:
            record_file = os.path.join(self.output_folder, "lckd_elections.json")
            records = []
            if os.path.isfile(record_file):  # a resumed run adds to its earlier elections
                with open(record_file) as f:
                    records = json.load(f)
            records.append({"epoch": self.current_epoch, "election_cases": self.election_cases, "dice": table,
                            "teachers": elected})
            with open(record_file, "w") as f:
                json.dump(records, f, indent=2)

    def weighted_loss_terms(self, data, target) -> dict:
        missing = self.missing_modality_training
        available = random_available(data.shape[0], self.num_modalities, self.settings["subset_sampling"]) \
            if missing else torch.ones((data.shape[0], self.num_modalities), dtype=torch.bool)
        teachers = sorted({t for t in self.teachers or [] if t is not None})  # none before the first election
        with self.bottlenecks.recording() as features:
            output = self.network(data, available)
        seg_loss = self.loss(output, target)
        kd = cross_modal_kd_loss(ModalityFusionUNet.per_modality(features["bottleneck"], available), available,
                                 teachers, self.settings["kd_pair_reduction"]) if teachers else seg_loss.new_zeros(())
        return {"seg_loss": (1.0, seg_loss), "kd_loss": (self.settings["kd_weight"] if teachers else 0.0, kd)}

    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if not self.final_validation or self.local_rank != 0:
            return
        validate_and_log_subsets(self)
