"""LCKD's teacher election: which modality teaches each task (tumour region), elected by its single-modality Dice
on held-out training patches, and the modalities each missing-modality training step draws."""
from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_protokd.data.regions import evaluation_regions
from nnunet_protokd.errors import ConfigurationError


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
    label_manager = trainer.label_manager
    transforms = trainer.get_validation_transforms(
        None, is_cascaded=False, foreground_labels=label_manager.foreground_labels,
        regions=label_manager.foreground_regions if label_manager.has_regions else None, ignore_label=None)
    patch = trainer.configuration_manager.patch_size
    loader = nnUNetDataLoader(trainer.dataset_class(trainer.preprocessed_dataset_folder, cases), trainer.batch_size,
                              patch, patch, label_manager,
                              oversample_foreground_percent=trainer.oversample_foreground_percent,
                              transforms=transforms)
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


def election_tasks(dataset_json: dict, region_based: bool) -> tuple[list, list | None]:
    """(task names, tasks for `single_modality_dice`): the dataset's scored regions; tasks None for region-based
    training (one task per sigmoid output), else the label tuples of each region."""
    regions = evaluation_regions(dataset_json)
    return [name for name, _ in regions], None if region_based else [labels for _, labels in regions]
