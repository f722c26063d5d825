"""The comparison of the ProtoKD paper's Table 1: teacher / unimodal / ProtoKD / KD-Net per modality.

Dice comes from nnU-Net's own region-aware metric code (region masks, TP/FP/FN); a region empty in both the
reference and the prediction scores Dice 1 (nnU-Net leaves it undefined; BraTS scores it 1). HD95 uses scipy's
Euclidean distance transform with the image spacing: the larger of the two directed 95th percentiles of
surface distances; 0 when both masks are empty. When exactly one is empty (a missed or an invented tumour region)
it is undefined; as in the BraTS challenges such a case scores a fixed penalty of 373.13 mm (the diagonal of
BraTS's 240 x 240 x 155 mm image), so that missing a whole region is not rewarded by leaving the case out;
excluding these cases instead is an option. The report gives their count either way. BraTS 2023 and 2024 datasets
also score each region lesion by lesion, as those challenges rank (evaluation/lesionwise.py), and their legacy
penalty is the generation's (374 mm for 2023, 337 mm for 2024 glioma, as in the organisers' code).
"""
from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn, region_or_label_to_mask
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_protokd.data.brats_labels import geometry_mismatch
from nnunet_protokd.errors import UserError
from nnunet_protokd.evaluation.lesionwise import LesionScheme, hd95, lesionwise_scores

# HD95 of a case whose reference or prediction (not both) is empty, in the BraTS challenges' scoring
BRATS_HD95_PENALTY_MM = 373.13
MAX_VALUES_SHOWN = 12


class ScoringInputError(UserError, ValueError):
    """A reference or prediction that cannot be scored as it is; the message names the file and what is wrong."""


def dataset_labels(dataset_json: dict) -> list[int]:
    """The label values a label map of this dataset may hold (nnU-Net's LabelManager: every label, and every
    label of its regions)."""
    return [int(v) for v in LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order")).all_labels]


def read_label_map(path: str, labels: list, reference: sitk.Image | None = None,
                   reference_file: str | None = None) -> sitk.Image:
    """The label map at `path`, refused (ScoringInputError naming the file) unless it holds only `labels` and,
    given a `reference`, lies on its grid (shape, spacing, origin, direction): a map in another numbering (BraTS's
    0/1/2/4) or on another grid would be scored without a word, wrongly."""
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as exc:  # SimpleITK's; its last line says why
        raise ScoringInputError(f"cannot read {path}: {str(exc).strip().splitlines()[-1]}") from None
    if reference is not None and (problem := geometry_mismatch(image, reference)) is not None:
        raise ScoringInputError(f"{path}: {problem} of its reference {reference_file}: a prediction must lie on its "
                                f"reference's grid")
    found = np.unique(sitk.GetArrayFromImage(image)).tolist()
    if set(found) - set(labels):
        shown = ", ".join(f"{v:g}" for v in found[:MAX_VALUES_SHOWN]) + (", ..." if len(found) > MAX_VALUES_SHOWN
                                                                         else "")
        raise ScoringInputError(f"{path} holds the values {shown}; a label map of this dataset holds only its labels "
                                f"{labels} (dataset.json), in the dataset's numbering (not BraTS's 0/1/2/4)")
    return image


def empty_reference_rule(hd95_penalty: float | None) -> str:
    """How empty regions are scored, for the report (`hd95_penalty` None: such cases are excluded from HD95)."""
    one_empty = "excluded from HD95" if hd95_penalty is None else f"scored HD95 = {hd95_penalty:g} mm (BraTS)"
    return ("Dice of a region empty in both reference and prediction is 1, and 0 when only one of them is empty; "
            f"HD95 is 0 when both are empty, and a case where exactly one is empty is {one_empty}")


def case_metrics(reference_file: str, prediction_file: str, regions, labels: list,
                 hd95_penalty: float | None = BRATS_HD95_PENALTY_MM, lesion_scheme: LesionScheme | None = None) -> dict:
    """{region: {"dice", "hd95", "hd95_one_empty"}}; where exactly one mask is empty, "hd95" is `hd95_penalty`
    (None: undefined, left out of the mean) and "hd95_one_empty" is true. With a `lesion_scheme`, each region it
    rules also has "lesion_dice", "lesion_hd95" and its lesion counts "lesion_tp", "lesion_fp", "lesion_fn"
    (lesionwise.lesionwise_scores). Both files must hold only `labels` (`dataset_labels`), the prediction on the
    reference's grid (`read_label_map`)."""
    reference_image = read_label_map(reference_file, labels)
    prediction_image = read_label_map(prediction_file, labels, reference_image, reference_file)
    reference = sitk.GetArrayFromImage(reference_image)
    prediction = sitk.GetArrayFromImage(prediction_image)
    spacing = reference_image.GetSpacing()[::-1]  # in the array's axis order
    metrics = {}
    for name, region in regions:
        reference_mask = region_or_label_to_mask(reference, region)
        prediction_mask = region_or_label_to_mask(prediction, region)
        tp, fp, fn, _ = compute_tp_fp_fn_tn(reference_mask, prediction_mask)
        dice = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
        one_empty = bool(reference_mask.any()) != bool(prediction_mask.any())
        distance = hd95_penalty if one_empty else hd95(reference_mask, prediction_mask, spacing)
        metrics[name] = {"dice": float(dice), "hd95": distance, "hd95_one_empty": one_empty}
        if lesion_scheme is not None and name in lesion_scheme.rules:
            metrics[name].update(lesionwise_scores(reference, prediction, region, lesion_scheme.rules[name], spacing))
    return metrics


def reference_cases(ground_truth_folder: str, file_ending: str) -> list:
    """The cases of a reference folder (<case><file_ending>); none is an error."""
    cases = sorted(f[:-len(file_ending)] for f in os.listdir(ground_truth_folder) if f.endswith(file_ending))
    if not cases:
        raise ScoringInputError(f"no reference label maps <case>{file_ending} in {ground_truth_folder}")
    return cases


def evaluate_folder(ground_truth_folder: str, prediction_folder: str, regions, labels: list, file_ending: str,
                    hd95_penalty: float | None = BRATS_HD95_PENALTY_MM,
                    lesion_scheme: LesionScheme | None = None) -> dict:
    """{case: {region: {"dice", "hd95", "hd95_one_empty"}}} over every reference case (see case_metrics); a
    missing prediction is an error."""
    cases = reference_cases(ground_truth_folder, file_ending)
    missing = [c for c in cases if not os.path.isfile(os.path.join(prediction_folder, c + file_ending))]
    if missing:
        raise ScoringInputError(f"{prediction_folder} lacks predictions of {len(missing)} reference case(s): "
                                f"{missing[:5]}")
    return {c: case_metrics(os.path.join(ground_truth_folder, c + file_ending),
                            os.path.join(prediction_folder, c + file_ending), regions, labels, hd95_penalty,
                            lesion_scheme)
            for c in cases}


def summarise(per_case: dict, regions) -> dict:
    """mean/std over cases of Dice and HD95 per region, and of the per-case mean Dice over regions; where the
    cases carry lesion-wise scores, also their mean/std over cases ("lesion_dice_mean", "lesion_hd95_mean", as the
    challenge averages its cases) and the total lesion counts ("lesion_tp", "lesion_fp", "lesion_fn")."""
    summary = {}
    lesionwise = []
    for name, _ in regions:
        dice = np.array([m[name]["dice"] for m in per_case.values()])
        distances = np.array([m[name]["hd95"] for m in per_case.values() if m[name]["hd95"] is not None])
        summary[name] = {"dice_mean": float(dice.mean()), "dice_std": float(dice.std()),
                         "hd95_mean": float(distances.mean()) if len(distances) else None,
                         "hd95_std": float(distances.std()) if len(distances) else None,
                         "hd95_n": int(len(distances)),
                         "hd95_one_empty": sum(bool(m[name]["hd95_one_empty"]) for m in per_case.values())}
        if all("lesion_dice" in m[name] for m in per_case.values()):
            lesionwise.append(name)
            lesion_dice = np.array([m[name]["lesion_dice"] for m in per_case.values()])
            lesion_hd95 = np.array([m[name]["lesion_hd95"] for m in per_case.values()])
            summary[name].update(
                lesion_dice_mean=float(lesion_dice.mean()), lesion_dice_std=float(lesion_dice.std()),
                lesion_hd95_mean=float(lesion_hd95.mean()), lesion_hd95_std=float(lesion_hd95.std()),
                **{count: int(sum(m[name][count] for m in per_case.values()))
                   for count in ("lesion_tp", "lesion_fp", "lesion_fn")})
    mean_dice = np.array([np.mean([m[name]["dice"] for name, _ in regions]) for m in per_case.values()])
    summary["mean"] = {"dice_mean": float(mean_dice.mean()), "dice_std": float(mean_dice.std())}
    if lesionwise:
        mean_lesion_dice = np.array([np.mean([m[name]["lesion_dice"] for name in lesionwise])
                                     for m in per_case.values()])
        summary["mean"].update(lesion_dice_mean=float(mean_lesion_dice.mean()),
                               lesion_dice_std=float(mean_lesion_dice.std()))
    return summary
