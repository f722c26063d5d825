"""Subsets of modalities of a model on every channel (LCKD, modality dropout): every non-empty channel subset of a
dataset, the model folder that predicts from one (fewer channels declared; LCKD's weights shared with the trained
model, modality dropout's first convolution sliced), and nnU-Net's final validation from each."""
from __future__ import annotations

import itertools
import json
import os

import numpy as np
import torch
from nnunetv2.evaluation.evaluate_predictions import compute_metrics
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_protokd.channels import ChannelSubset
from nnunet_protokd.errors import ConfigurationError
from nnunet_protokd.io import load_checkpoint_weights_only, sha256_of, staged_folder
from nnunet_protokd.lckd.network import FixedSubsetNetwork
from nnunet_protokd.methods import method_of_trainer
from nnunet_protokd.settings import SETTINGS_KEY
from nnunet_protokd.training.features import unwrap
from nnunet_protokd.training.modality_dropout import first_convolution, minimal_input_shape, sliced_state_dict

# the key of a sliced checkpoint that names the trained checkpoint it was cut from
SLICED_FROM_KEY = "sliced_from"


def all_subsets(num_modalities: int) -> list[tuple]:
    """Every non-empty subset of range(num_modalities) as a sorted tuple; singles first, then pairs, ..."""
    return [subset for size in range(1, num_modalities + 1)
            for subset in itertools.combinations(range(num_modalities), size)]


def every_channel_subset(dataset_json: dict) -> list[ChannelSubset]:
    """The dataset's non-empty channel subsets in all_subsets' order (15 for BraTS)."""
    names = dataset_json["channel_names"]
    return [ChannelSubset(tuple(names[str(c)] for c in subset), subset) for subset in all_subsets(len(names))]


def full_and_single_channel_subsets(dataset_json: dict) -> list[ChannelSubset]:
    """Every channel together, then each channel alone (what a modality-dropout model is validated from)."""
    subsets = every_channel_subset(dataset_json)
    return [subsets[-1]] + [subset for subset in subsets if len(subset.channel_indices) == 1]


def subset_configuration_name(configuration: str, subset_label: str) -> str:
    """e.g. 3d_fullres_T1ce+FLAIR: what `nnUNetv2_predict -c` takes for an LCKD subset model folder."""
    return f"{configuration}_{subset_label}"


def write_subset_model_folder(results_folder: str, trainer: str, plans_name: str, configuration: str,
                              subset: ChannelSubset, overwrite: bool = False) -> str:
    """A model folder `<trainer>__<plans>__<configuration>_<subset>` next to the trained one, for prediction from
    the subset's files only: its plans.json and dataset.json declare just those channels (ChannelSubset). Each
    fold's checkpoints are, for LCKD, symbolic links to the trained model's (weights shared, not copied); for a
    method whose registry entry has `sliced_subsets` (modality dropout), files of their own holding nnU-Net's
    plain network with the first convolution sliced to the subset's channels (`sliced_checkpoint`), which plain
    nnU-Net predicts.

    An identical existing folder is left alone; a different one is refused unless `overwrite`. The folder is
    assembled under a temporary name and renamed into place, so a failure leaves nothing half-written.
    """
    source = os.path.join(results_folder, f"{trainer}__{plans_name}__{configuration}")
    for required in ("plans.json", "dataset.json"):
        if not os.path.isfile(os.path.join(source, required)):
            raise ConfigurationError(f"{os.path.join(source, required)} not found: train {trainer} on {configuration} "
                                     f"first (nnUNetv2_train DATASET {configuration} FOLD -tr {trainer})")
    links = {}  # {checkpoint in the subset folder: the trained one, relative to it}
    for fold in sorted(f for f in os.listdir(source) if f.startswith("fold_")):
        for checkpoint in ("checkpoint_final.pth", "checkpoint_best.pth"):
            if os.path.isfile(os.path.join(source, fold, checkpoint)):
                links[os.path.join(fold, checkpoint)] = os.path.join("..", "..", os.path.basename(source), fold,
                                                                     checkpoint)
    if not any(name.endswith("checkpoint_final.pth") for name in links):
        raise ConfigurationError(f"{source} has no fold with checkpoint_final.pth: finish training first")
    with open(os.path.join(source, "plans.json")) as f:
        plans = json.load(f)
    with open(os.path.join(source, "dataset.json")) as f:
        dataset_json = json.load(f)
    if "channels" in plans.get(SETTINGS_KEY, {}):
        raise ConfigurationError(f"{source} is already a subset model folder; give the trained model's configuration")
    contents = {"plans.json": subset.plans(plans), "dataset.json": subset.dataset_json(dataset_json)}
    subset_configuration = subset_configuration_name(configuration, subset.label)
    target = os.path.join(results_folder, f"{trainer}__{plans_name}__{subset_configuration}")
    method = method_of_trainer(trainer)
    # a sliced checkpoint names the trained one it was cut from (its digest), so that an identical folder is known
    sliced_from = {name: {"checkpoint": link, "sha256": sha256_of(os.path.join(source, name))}
                   for name, link in links.items()} if method is not None and method.sliced_subsets else None
    if os.path.exists(target):
        if _folder_matches(target, contents, links, sliced_from):
            return target
        if not overwrite:
            raise ConfigurationError(f"{target} exists with other contents; pass --overwrite to replace it")
    # a different folder there (and --overwrite) is replaced only once the new one is complete
    with staged_folder(target, prefix=".tmp_subset_", replace=True) as staging:
        for name, content in contents.items():
            with open(os.path.join(staging, name), "w") as f:
                json.dump(content, f, indent=4)
        for name, link in links.items():
            os.makedirs(os.path.join(staging, os.path.dirname(name)), exist_ok=True)
            if sliced_from is None:
                os.symlink(link, os.path.join(staging, name))
            else:
                checkpoint = sliced_checkpoint(load_checkpoint_weights_only(os.path.join(source, name)), plans,
                                               dataset_json, configuration, subset)
                torch.save({**checkpoint, SLICED_FROM_KEY: sliced_from[name]}, os.path.join(staging, name))
    return target


def sliced_checkpoint(checkpoint: dict, plans: dict, dataset_json: dict, configuration: str,
                      subset: ChannelSubset) -> dict:
    """A checkpoint of nnU-Net's own network on every channel (the trained model's `plans`, `dataset_json`), as
    the checkpoint of plain nnU-Net's network on the subset's channels: the first convolution's weights sliced to
    them (equal to the full network fed zeros for the other channels; NotSliceableError where that cannot hold),
    trainer `nnUNetTrainer` and the subset's plans and dataset.json, without the optimiser's state (it is for
    prediction only). Checked by loading it into the network plain nnU-Net builds from the subset's plans."""
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    num_heads = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    num_channels = len(dataset_json["channel_names"])
    network = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_channels,
                                                       num_heads, False)
    network.load_state_dict(checkpoint["network_weights"])
    convolution = first_convolution(network, minimal_input_shape(num_channels, configuration_manager))
    weights = sliced_state_dict(checkpoint["network_weights"], convolution, subset.channel_indices)
    subset_plans_manager = PlansManager(subset.plans(plans))
    nnUNetTrainer.build_network_architecture(subset_plans_manager,
                                             subset_plans_manager.get_configuration(configuration),
                                             len(subset.channel_indices), num_heads, False).load_state_dict(weights)
    return {**checkpoint, "network_weights": weights, "trainer_name": nnUNetTrainer.__name__, "optimizer_state": None,
            "grad_scaler_state": None,
            "init_args": {**checkpoint["init_args"], "plans": subset.plans(plans),
                          "dataset_json": subset.dataset_json(dataset_json)}}


def _folder_matches(folder: str, contents: dict, links: dict, sliced_from: dict | None = None) -> bool:
    try:
        for name, content in contents.items():
            with open(os.path.join(folder, name)) as f:
                if json.load(f) != content:
                    return False
        if sliced_from is not None:
            return all(not os.path.islink(os.path.join(folder, name)) and
                       load_checkpoint_weights_only(os.path.join(folder, name)).get(SLICED_FROM_KEY) == record
                       for name, record in sliced_from.items())
        return all(os.path.islink(os.path.join(folder, name)) and os.readlink(os.path.join(folder, name)) == link
                   for name, link in links.items())
    except (OSError, ValueError):
        return False


def validate_and_log_subsets(trainer, subsets: list | None = None, subset_network=FixedSubsetNetwork) -> dict:
    """validate_subsets into fold_X/validation_subsets, without deep supervision, one line per subset in the
    trainer's log; the summary."""
    trainer.set_deep_supervision_enabled(False)
    summary = validate_subsets(trainer, os.path.join(trainer.output_folder, "validation_subsets"), subsets,
                               subset_network)
    trainer.set_deep_supervision_enabled(True)
    for subset, result in summary.items():
        trainer.print_to_log_file(f"validation with {subset}: mean Dice {result['foreground_mean']:.4f} "
                                  f"{json.dumps(result['mean'])}", also_print_to_console=True)
    return summary


def validate_subsets(trainer, output_folder: str, subsets: list | None = None,
                     subset_network=FixedSubsetNetwork) -> dict:
    """nnU-Net's final validation of a trainer on every channel for each of `subsets` (ChannelSubsets; default
    every non-empty subset of its modalities). `subset_network(network, available (M,) bool)` is the trainer's
    network with only those channels available: LCKD's FixedSubsetNetwork, modality dropout's ZeroFilledNetwork.

    Each validation case is loaded once and predicted by nnU-Net's predictor (sliding window, Gaussian, mirroring)
    with each subset available; the predictions are exported to the original geometry with nnU-Net's export and
    scored with nnU-Net's metric code against gt_segmentations, like nnU-Net's own final validation (which
    writes fold_X/validation for all modalities). Runs in this process, on the trainer's rank only.
    Writes `output_folder/<subset>/<case>` and `output_folder/summary.json`; returns the summary:
    {subset label: {"mean": {task: Dice}, "foreground_mean": Dice}}.
    """
    num_modalities = len(trainer.dataset_json["channel_names"])
    subsets = every_channel_subset(trainer.dataset_json) if subsets is None else subsets
    network = unwrap(trainer.network)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=True, device=trainer.device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    _, validation_cases = trainer.do_split()
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, validation_cases,
                                    folder_with_segs_from_previous_stage=trainer.folder_with_segs_from_previous_stage)
    ending = trainer.dataset_json["file_ending"]
    for case in dataset.identifiers:
        data, _, _, properties = dataset.load_case(case)
        data = torch.from_numpy(np.asarray(data[:]))
        for subset in subsets:
            available = torch.zeros(num_modalities, dtype=torch.bool)
            available[list(subset.channel_indices)] = True
            predictor.manual_initialization(subset_network(network, available), trainer.plans_manager,
                                            trainer.configuration_manager, None, trainer.dataset_json,
                                            trainer.__class__.__name__, trainer.inference_allowed_mirroring_axes)
            logits = predictor.predict_sliding_window_return_logits(data).cpu()
            os.makedirs(os.path.join(output_folder, subset.label), exist_ok=True)
            export_prediction_from_logits(logits, properties, trainer.configuration_manager, trainer.plans_manager,
                                          trainer.dataset_json, os.path.join(output_folder, subset.label, case), False)
    label_manager = trainer.label_manager
    tasks = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    reader = trainer.plans_manager.image_reader_writer_class()
    reference_folder = os.path.join(trainer.preprocessed_dataset_folder_base, "gt_segmentations")
    summary = {}
    for subset in subsets:
        per_case = [compute_metrics(os.path.join(reference_folder, case + ending),
                                    os.path.join(output_folder, subset.label, case + ending), reader, tasks,
                                    label_manager.ignore_label)["metrics"] for case in dataset.identifiers]
        mean = {str(task): float(np.nanmean([m[task]["Dice"] for m in per_case])) for task in tasks}
        summary[subset.label] = {"mean": mean, "foreground_mean": float(np.nanmean(list(mean.values())))}
    with open(os.path.join(output_folder, "summary.json"), "w") as f:
        json.dump({"cases": list(dataset.identifiers), "subsets": summary}, f, indent=2)
    return summary
