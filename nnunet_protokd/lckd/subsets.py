"""LCKD's subsets of modalities: every non-empty channel subset of a dataset, the model folder that predicts from one
(weights shared with the trained model, fewer channels declared), and nnU-Net's final validation from each."""
from __future__ import annotations

import itertools
import json
import os

import numpy as np
import torch
from nnunetv2.evaluation.evaluate_predictions import compute_metrics
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_protokd.channels import ChannelSubset
from nnunet_protokd.errors import ConfigurationError
from nnunet_protokd.io import staged_folder
from nnunet_protokd.lckd.network import FixedSubsetNetwork
from nnunet_protokd.settings import SETTINGS_KEY
from nnunet_protokd.training.features import unwrap


def all_subsets(num_modalities: int) -> list[tuple]:
    """Every non-empty subset of range(num_modalities) as a sorted tuple; singles first, then pairs, ..."""
    return [subset for size in range(1, num_modalities + 1)
            for subset in itertools.combinations(range(num_modalities), size)]


def every_channel_subset(dataset_json: dict) -> list[ChannelSubset]:
    """The dataset's non-empty channel subsets in all_subsets' order (15 for BraTS)."""
    names = dataset_json["channel_names"]
    return [ChannelSubset(tuple(names[str(c)] for c in subset), subset) for subset in all_subsets(len(names))]


def subset_configuration_name(configuration: str, subset_label: str) -> str:
    """e.g. 3d_fullres_T1ce+FLAIR: what `nnUNetv2_predict -c` takes for an LCKD subset model folder."""
    return f"{configuration}_{subset_label}"


def write_subset_model_folder(results_folder: str, trainer: str, plans_name: str, configuration: str,
                              subset: ChannelSubset, overwrite: bool = False) -> str:
    """A model folder `<trainer>__<plans>__<configuration>_<subset>` next to the trained one, for prediction from
    the subset's files only: its plans.json and dataset.json declare just those channels (ChannelSubset), and
    each fold's checkpoints are symbolic links to the trained model's (weights shared, not copied).

    An identical existing folder is left alone; a different one is refused unless `overwrite`. The folder is
    assembled under a temporary name and renamed into place, so a failure leaves nothing half-written.
    """
    source = os.path.join(results_folder, f"{trainer}__{plans_name}__{configuration}")
    for required in ("plans.json", "dataset.json"):
        if not os.path.isfile(os.path.join(source, required)):
            raise ConfigurationError(f"{os.path.join(source, required)} not found: train {trainer} on {configuration} "
                                     f"first (nnUNetv2_train DATASET {configuration} FOLD -tr {trainer})")
    links = {}
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
    if os.path.exists(target):
        if _folder_matches(target, contents, links):
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
            os.symlink(link, os.path.join(staging, name))
    return target


def _folder_matches(folder: str, contents: dict, links: dict) -> bool:
    try:
        for name, content in contents.items():
            with open(os.path.join(folder, name)) as f:
                if json.load(f) != content:
                    return False
        return all(os.path.islink(os.path.join(folder, name)) and os.readlink(os.path.join(folder, name)) == link
                   for name, link in links.items())
    except (OSError, ValueError):
        return False


def validate_subsets(trainer, output_folder: str) -> dict:
    """nnU-Net's final validation of an LCKD trainer for every non-empty subset of its modalities.

    Each validation case is loaded once and predicted by nnU-Net's predictor (sliding window, Gaussian, mirroring)
    with each subset available; the predictions are exported to the original geometry with nnU-Net's export and
    scored with nnU-Net's metric code against gt_segmentations, like nnU-Net's own final validation (which
    writes fold_X/validation for all modalities). Runs in this process, on the trainer's rank only.
    Writes `output_folder/<subset>/<case>` and `output_folder/summary.json`; returns the summary:
    {subset label: {"mean": {task: Dice}, "foreground_mean": Dice}}.
    """
    num_modalities = len(trainer.dataset_json["channel_names"])
    subsets = every_channel_subset(trainer.dataset_json)
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
            predictor.manual_initialization(FixedSubsetNetwork(network, available), trainer.plans_manager,
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
