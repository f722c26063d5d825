"""LCKD (Wang et al., MICCAI 2023): one network for every non-empty subset of the modalities.

The network (`ModalityFusionUNet`) is nnU-Net's U-Net for the configuration's plans, built for one input channel:
its encoder is shared by the modalities and applied to each available one separately (modalities folded into the
batch axis); missing ones are not encoded at all, so whatever their input holds cannot reach the output. At every
encoder level the features are fused before nnU-Net's decoder, in one of two ways (the setting `fusion`):
"slots" (the authors' code): one slot per modality, a missing modality's slot filled with the mean of the
available ones, the slots concatenated in modality order and brought back to the level's width by a 1x1
convolution block, so the decoder knows which modality is which; "mean": the average of the available modalities.
A model folder for a subset (`write_subset_model_folder`) shares the trained weights and declares fewer channels;
its network puts each of its input channels into that channel's slot of the trained model.

Training (trainers/LCKDTrainer.py) elects, per task, the modality with the best single-modality Dice on
held-out *training* cases (`single_modality_dice`, `elect_teachers`) and distils the teachers' bottleneck
features to the other available modalities (losses.cross_modal_kd_loss).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile

import numpy as np
import torch
from torch import nn

from nnunet_protokd.configurations import SETTINGS_KEY, ConfigurationError, method_settings
from nnunet_protokd.modality import ChannelSubset, with_input_channel_check

FUSIONS = ("slots", "mean")


class ModalityFusionUNet(nn.Module):
    """A dynamic_network_architectures U-Net whose one-channel encoder is applied to each available modality
    and whose skips are fused over the modalities before the decoder.

    Args:
        unet: nnU-Net's U-Net built for one input channel; its encoder and decoder are used.
        fusion: "slots" (a slot per modality, missing slots filled with the mean of the available modalities,
            concatenated, then a 1x1 convolution, normalisation and nonlinearity back to the level's width, one
            block per level in `fusion_blocks`) or "mean" (the average of the available modalities; no weights).
        num_modalities: M, the modalities the model was trained with (the slots).
        input_slots: the slot of each input channel (default 0..M-1); a subset model folder gives the trained
            channels its files hold, e.g. (1, 3) for T1ce and FLAIR of BraTS.

    forward(x, available=None):
        x: (N, K, *S), one channel per input modality (K = len(input_slots)).
        available: (N, K) or (K,) bool, which inputs each item has (default: all). Best kept on the host:
            the encoder's batch is assembled from it there.
    Returns nnU-Net's output: logits (N, classes, *S), or with deep supervision the list of them, largest first.
    `encoder.stages[-1]` outputs the bottleneck of each encoded (item, modality), in row-major order of
    `available`; `per_modality` lays those out as (N, K, ...).
    """

    def __init__(self, unet: nn.Module, fusion: str = "slots", num_modalities: int = 1, input_slots=None):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.encoder = unet.encoder
        self.decoder = unet.decoder
        self.fusion = fusion
        self.num_modalities = num_modalities
        self.input_slots = tuple(range(num_modalities)) if input_slots is None else tuple(int(s) for s in input_slots)
        if len(set(self.input_slots)) != len(self.input_slots) or \
                not all(0 <= slot < num_modalities for slot in self.input_slots):
            raise ValueError(f"input slots {self.input_slots} are not distinct modalities among {num_modalities}")
        self.fusion_blocks = None
        if fusion == "slots":
            from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
            from dynamic_network_architectures.initialization.weight_init import InitWeights_He
            encoder = self.encoder
            self.fusion_blocks = nn.ModuleList(
                ConvDropoutNormReLU(encoder.conv_op, num_modalities * width, width, 1, 1, encoder.conv_bias,
                                    encoder.norm_op, encoder.norm_op_kwargs, encoder.dropout_op,
                                    encoder.dropout_op_kwargs, encoder.nonlin, encoder.nonlin_kwargs)
                for width in encoder.output_channels)
            self.fusion_blocks.apply(InitWeights_He(1e-2))  # nnU-Net's initialisation of its U-Nets

    def forward(self, x: torch.Tensor, available: torch.Tensor | None = None):
        num_items, num_inputs = x.shape[:2]
        available_on_host = available_modalities(available, num_items, num_inputs)
        encoded = available_on_host.reshape(-1).nonzero().squeeze(1)
        owner = (encoded // num_inputs).to(x.device, non_blocking=True)
        counts = available_on_host.sum(dim=1).to(x.device, non_blocking=True)
        images = x.reshape(num_items * num_inputs, 1, *x.shape[2:])[encoded.to(x.device, non_blocking=True)]
        slot = None
        if self.fusion == "slots":  # row of each encoded (item, input) among the (item, slot) rows
            slots_of_inputs = torch.tensor(self.input_slots)
            slot = (encoded // num_inputs * self.num_modalities + slots_of_inputs[encoded % num_inputs]).to(x.device)
        fused = []
        for level, skip in enumerate(self.encoder(images)):
            summed = skip.new_zeros((num_items,) + skip.shape[1:]).index_add_(0, owner, skip)
            mean = summed / counts.to(skip.dtype).view(-1, *[1] * (skip.ndim - 1))
            if self.fusion == "mean":
                fused.append(mean)
                continue
            filled = mean.unsqueeze(1).expand(num_items, self.num_modalities, *skip.shape[1:])
            filled = filled.reshape(num_items * self.num_modalities, *skip.shape[1:]).index_copy(0, slot, skip)
            fused.append(self.fusion_blocks[level](filled.view(num_items, -1, *skip.shape[2:])))
        return self.decoder(fused)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        trained_with_slots = any(key.startswith("fusion_blocks.") for key in state_dict)
        if strict and trained_with_slots != (self.fusion == "slots"):
            trained = "slots" if trained_with_slots else "mean"
            raise RuntimeError(
                f"these LCKD weights were trained with {trained!r} fusion but the model folder's plans.json asks for "
                f"{self.fusion!r} (LCKD models of nnunet-protokd 0.1.0 used 'mean' fusion and did not record it): "
                f"in plans.json, under the configuration's \"{SETTINGS_KEY}\", set \"LCKDTrainer\": "
                f"{{\"fusion\": \"{trained}\"}}")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @staticmethod
    def per_modality(encoded_features: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """(P, C, *S) features of the encoded (item, modality) pairs -> (N, M, C, *S), zeros where unavailable."""
        available_on_host = available.detach().cpu().bool()
        num_items, num_modalities = available_on_host.shape
        encoded = available_on_host.reshape(-1).nonzero().squeeze(1).to(encoded_features.device)
        dense = encoded_features.new_zeros((num_items * num_modalities,) + encoded_features.shape[1:])
        dense = dense.index_copy(0, encoded, encoded_features)
        return dense.view(num_items, num_modalities, *encoded_features.shape[1:])


def available_modalities(available, num_items: int, num_modalities: int) -> torch.Tensor:
    """`available` as an (N, M) bool tensor on the host; every item needs at least one modality."""
    if available is None:
        return torch.ones((num_items, num_modalities), dtype=torch.bool)
    available = torch.as_tensor(available).detach().cpu().bool()
    if available.shape[-1] != num_modalities:
        raise ValueError(f"availability mask of shape {tuple(available.shape)} for {num_modalities} modalities")
    available = available.expand(num_items, num_modalities)
    if not bool(available.any(dim=1).all()):
        raise ValueError("every batch item needs at least one available modality")
    return available


def build_fusion_network(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                         enable_deep_supervision: bool = True) -> nn.Module:
    """nnU-Net's network of the plans with one input channel, as a ModalityFusionUNet of `num_input_channels`
    modalities (the channels the model folder declares; prediction with other files fails with a clear error).

    The fusion comes from the configuration's LCKDTrainer settings (LCKDTrainer records them all in the model
    folder's plans.json). The plans of a subset model folder (ChannelSubset.plans) name the trained channels its
    inputs are, and keep one per-channel intensity entry for every trained channel: that count is the number of
    slots."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    unet = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, 1, num_output_channels,
                                                    enable_deep_supervision)
    plans = plans_manager.plans
    input_slots = plans.get(SETTINGS_KEY, {}).get("source_channel_indices")
    num_modalities = num_input_channels if input_slots is None else \
        len(plans["foreground_intensity_properties_per_channel"])
    fusion = method_settings(configuration_manager.configuration, "LCKDTrainer")["fusion"]
    network = ModalityFusionUNet(unet, fusion, num_modalities, input_slots)
    return with_input_channel_check(network, num_input_channels, plans,
                                    " To predict from fewer modalities, write a model folder for them with "
                                    "`nnunet-protokd lckd-subset -d DATASET -c CONFIGURATION -m MODALITY ...`.")


class FixedSubsetNetwork(nn.Module):
    """The fusion network with one fixed set of available modalities, called like a plain network (x -> logits)
    by nnU-Net's predictor; x keeps every channel and the unavailable ones are ignored."""

    def __init__(self, network: ModalityFusionUNet, available: torch.Tensor):
        super().__init__()
        self.network = network
        self.available = available.bool().cpu()

    def forward(self, x):
        return self.network(x, self.available.expand(x.shape[0], -1))


def all_subsets(num_modalities: int) -> list[tuple]:
    """Every non-empty subset of range(num_modalities) as a sorted tuple; singles first, then pairs, ..."""
    return [subset for size in range(1, num_modalities + 1)
            for subset in itertools.combinations(range(num_modalities), size)]


def every_channel_subset(dataset_json: dict) -> list[ChannelSubset]:
    """The dataset's non-empty channel subsets in all_subsets' order (15 for BraTS)."""
    names = dataset_json["channel_names"]
    return [ChannelSubset(tuple(names[str(c)] for c in subset), subset) for subset in all_subsets(len(names))]


def random_available(num_items: int, num_modalities: int, sampling: str = "per_item",
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, M) bool, the modalities each batch item has in a missing-modality training step.

    "per_batch" (the authors' code): one subset for the whole batch, its size drawn uniformly from 1..M-1 (1-3 of
    BraTS's 4) and then its members uniformly; the full set is never drawn. "per_item" (plugin 0.1.0): each item
    independently one of the 2^M - 1 non-empty subsets, each with probability 1 / (2^M - 1) (drawn as a non-zero
    M-bit number).
    """
    if sampling == "per_batch":
        size = int(torch.randint(1, max(num_modalities - 1, 1) + 1, (1,), generator=generator))
        members = torch.randperm(num_modalities, generator=generator)[:size]
        available = torch.zeros(num_modalities, dtype=torch.bool)
        available[members] = True
        return available.expand(num_items, num_modalities).clone()
    if sampling != "per_item":
        raise ValueError(f"sampling must be 'per_batch' or 'per_item', got {sampling!r}")
    codes = torch.randint(1, 2 ** num_modalities, (num_items,), generator=generator)
    return ((codes[:, None] >> torch.arange(num_modalities)) & 1).bool()


def single_modality_dice(forward, batches, num_modalities: int, tasks: list | None) -> np.ndarray:
    """Dice of each modality on its own, per task, accumulated over fixed batches as nnU-Net's online validation
    does (TP/FP/FN summed over all voxels of all batches, then Dice).

    Args:
        forward: (data (N, M, *S), available (N, M) bool) -> full-resolution logits (N, K, *S).
        batches: list of (data, target) with nnU-Net's full-resolution targets: region masks (N, R, *S) for
            region-based training, else label maps (N, 1, *S).
        tasks: None for region-based training (a task per sigmoid output, thresholded at 0.5); else the label
            tuples of the tasks, scored on the argmax of softmax outputs (e.g. BraTS WT = (1, 2, 3)).
    Returns:
        (M, T) Dice; NaN for a task with no foreground in the reference and the prediction.
    """
    counts = None
    for data, target in batches:
        for modality in range(num_modalities):
            available = torch.zeros((data.shape[0], num_modalities), dtype=torch.bool)
            available[:, modality] = True
            logits = forward(data, available).float()
            if tasks is None:
                predicted, reference = torch.sigmoid(logits) > 0.5, target.to(logits.device).bool()
            else:
                labels, reference_labels = logits.argmax(1), target.to(logits.device)[:, 0].long()
                predicted = torch.stack([torch.isin(labels, torch.tensor(t, device=labels.device)) for t in tasks], 1)
                reference = torch.stack([torch.isin(reference_labels, torch.tensor(t, device=labels.device))
                                         for t in tasks], 1)
            axes = [0] + list(range(2, logits.ndim))
            tp = (predicted & reference).sum(axes)
            fp = (predicted & ~reference).sum(axes)
            fn = (~predicted & reference).sum(axes)
            if counts is None:
                counts = np.zeros((3, num_modalities, len(tp)))
            counts[:, modality] += torch.stack([tp, fp, fn]).cpu().double().numpy()
    tp, fp, fn = counts
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)


def election_batches(trainer, cases: list, count: int) -> list:
    """`count` fixed (data, full-resolution target) batches of the trainer's patch size from `cases`, drawn by
    nnU-Net's data loader with its validation transforms (no augmentation), as its online validation draws them."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    label_manager = trainer.label_manager
    transforms = trainer.get_validation_transforms(
        None, is_cascaded=False, foreground_labels=label_manager.foreground_labels,
        regions=label_manager.foreground_regions if label_manager.has_regions else None, ignore_label=None)
    patch = trainer.configuration_manager.patch_size
    loader = nnUNetDataLoader(trainer.dataset_class(trainer.preprocessed_dataset_folder, cases), trainer.batch_size,
                              patch, patch, label_manager,
                              oversample_foreground_percent=trainer.oversample_foreground_percent, transforms=transforms)
    return [(batch["data"], batch["target"]) for batch in (next(loader) for _ in range(count))]


def elect_teachers(dice: np.ndarray) -> list:
    """Per task (column of the (M, T) Dice table) the modality with the highest Dice (the lowest index on a
    tie), or None when no modality has a defined Dice for that task."""
    return [None if np.all(np.isnan(column)) else int(np.nanargmax(column)) for column in dice.T]


def split_election_cases(training_cases: list, fraction: float, fold) -> tuple[list, list]:
    """(cases to train on, cases to elect teachers on): a seeded random `fraction` (at least one) of the fold's
    training cases is held out for the election, so it never sees the fold's validation cases."""
    cases = sorted(training_cases)
    if len(cases) < 2:
        raise ConfigurationError(f"LCKD needs at least 2 training cases (one held out to elect teachers); fold "
                                 f"{fold} has {len(cases)}")
    count = min(len(cases) - 1, max(1, int(round(fraction * len(cases)))))
    seed = 12345 + (fold if isinstance(fold, int) else 0)
    held_out = set(np.random.RandomState(seed).choice(len(cases), count, replace=False).tolist())
    return ([c for i, c in enumerate(cases) if i not in held_out],
            [c for i, c in enumerate(cases) if i in held_out])


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
            raise ConfigurationError(f"{os.path.join(source, required)} not found: train {trainer} on "
                                     f"{configuration} first (nnUNetv2_train DATASET {configuration} FOLD -tr {trainer})")
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
    target = os.path.join(results_folder, f"{trainer}__{plans_name}__{subset_configuration_name(configuration, subset.label)}")
    if os.path.exists(target):
        if _folder_matches(target, contents, links):
            return target
        if not overwrite:
            raise ConfigurationError(f"{target} exists with other contents; pass --overwrite to replace it")
    staging = tempfile.mkdtemp(prefix=".tmp_subset_", dir=results_folder)
    try:
        for name, content in contents.items():
            with open(os.path.join(staging, name), "w") as f:
                json.dump(content, f, indent=4)
        for name, link in links.items():
            os.makedirs(os.path.join(staging, os.path.dirname(name)), exist_ok=True)
            os.symlink(link, os.path.join(staging, name))
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
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
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunet_protokd.features import unwrap

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
