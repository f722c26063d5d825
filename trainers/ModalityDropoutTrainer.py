import json

import torch

from nnunet_protokd.lckd.subsets import full_and_single_channel_subsets, validate_and_log_subsets
from nnunet_protokd.training.base import MultiModalityTrainer
from nnunet_protokd.training.modality_dropout import ZeroFilledNetwork, random_kept_channels, zero_missing_channels
from nnunet_protokd.training.records import RecordedSettings


class ModalityDropoutTrainer(RecordedSettings, MultiModalityTrainer):
    """Modality dropout: nnU-Net's own network and loss on every channel of the configuration, each training item
    keeping a random non-empty subset of its channels, the others set to 0 after nnU-Net's normalisation
    (settings `subset_sampling`, `keep_all_probability`; training/modality_dropout.py).

    A model folder for a subset of the channels (`nnunet-protokd lckd-subset -tr ModalityDropoutTrainer`) holds
    nnU-Net's plain network with the first convolution sliced to those channels, which equals this network fed zeros
    for the others. Final validation: nnU-Net's with every channel (fold_X/validation), then every channel and each
    single channel alone (fold_X/validation_subsets/summary.json), as LCKDTrainer's.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.resolve_settings(plans, configuration)
        super().__init__(self.plans_with_resolved_settings(plans, configuration), configuration, fold, dataset_json,
                         device)

    def initialize(self):
        super().initialize()
        self.print_to_log_file(f"modality dropout: {json.dumps(self.record())}", also_print_to_console=False)

    def weighted_loss_terms(self, data, target) -> dict:
        kept = random_kept_channels(data.shape[0], data.shape[1], self.settings["subset_sampling"],
                                    self.settings["keep_all_probability"])
        return {"seg_loss": (1.0, self.loss(self.network(zero_missing_channels(data, kept)), target))}

    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if not self.final_validation or self.local_rank != 0:
            return
        validate_and_log_subsets(self, full_and_single_channel_subsets(self.dataset_json), ZeroFilledNetwork)
