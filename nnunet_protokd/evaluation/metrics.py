"""The comparison of the ProtoKD paper's Table 1: teacher / unimodal / ProtoKD / KD-Net per modality.

Dice comes from nnU-Net's own region-aware metric code (region masks, TP/FP/FN); a region empty in both the
reference and the prediction scores Dice 1 (nnU-Net leaves it undefined; BraTS scores it 1). HD95 uses scipy's
Euclidean distance transform with the image spacing: the larger of the two directed 95th percentiles of
surface distances; 0 when both masks are empty. When exactly one is empty (a missed or an invented tumour region)
it is undefined; as in the BraTS challenges such a case scores a fixed penalty of 373.13 mm (the diagonal of
BraTS's 240 x 240 x 155 mm image), so that missing a whole region is not rewarded by leaving the case out;
excluding these cases instead is an option. The report gives their count either way.
"""
from __future__ import annotations

import os

import numpy as np
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn, region_or_label_to_mask
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from scipy import ndimage

# HD95 of a case whose reference or prediction (not both) is empty, in the BraTS challenges' scoring
BRATS_HD95_PENALTY_MM = 373.13


def empty_reference_rule(hd95_penalty: float | None) -> str:
    """How empty regions are scored, for the report (`hd95_penalty` None: such cases are excluded from HD95)."""
    one_empty = "excluded from HD95" if hd95_penalty is None else f"scored HD95 = {hd95_penalty:g} mm (BraTS)"
    return ("Dice of a region empty in both reference and prediction is 1, and 0 when only one of them is empty; "
            f"HD95 is 0 when both are empty, and a case where exactly one is empty is {one_empty}")


def hd95(reference: np.ndarray, prediction: np.ndarray, spacing) -> float:
    """95th-percentile Hausdorff distance (mm) between the surfaces of two boolean masks."""
    if not reference.any() and not prediction.any():
        return 0.0
    if not reference.any() or not prediction.any():
        return float("nan")

    def surface(mask):
        return mask & ~ndimage.binary_erosion(mask, border_value=0)

    reference_surface, prediction_surface = surface(reference), surface(prediction)
    to_reference = ndimage.distance_transform_edt(~reference_surface, sampling=spacing)
    to_prediction = ndimage.distance_transform_edt(~prediction_surface, sampling=spacing)
    return float(max(np.percentile(to_reference[prediction_surface], 95),
                     np.percentile(to_prediction[reference_surface], 95)))


def case_metrics(reference_file: str, prediction_file: str, regions,
                 hd95_penalty: float | None = BRATS_HD95_PENALTY_MM) -> dict:
    """{region: {"dice", "hd95", "hd95_one_empty"}}; where exactly one mask is empty, "hd95" is `hd95_penalty`
    (None: undefined, left out of the mean) and "hd95_one_empty" is true."""
    reader = SimpleITKIO()
    reference, properties = reader.read_seg(reference_file)
    prediction, prediction_properties = reader.read_seg(prediction_file)
    if reference.shape != prediction.shape:
        raise ValueError(f"{prediction_file} has shape {prediction.shape[1:]}, its reference {reference_file} "
                         f"{reference.shape[1:]}")
    spacing = properties["spacing"]  # nnU-Net's reader gives it in the array's axis order
    metrics = {}
    for name, region in regions:
        reference_mask = region_or_label_to_mask(reference[0], region)
        prediction_mask = region_or_label_to_mask(prediction[0], region)
        tp, fp, fn, _ = compute_tp_fp_fn_tn(reference_mask, prediction_mask)
        dice = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
        one_empty = bool(reference_mask.any()) != bool(prediction_mask.any())
        distance = hd95_penalty if one_empty else hd95(reference_mask, prediction_mask, spacing)
        metrics[name] = {"dice": float(dice), "hd95": distance, "hd95_one_empty": one_empty}
    return metrics


def evaluate_folder(ground_truth_folder: str, prediction_folder: str, regions, file_ending: str,
                    hd95_penalty: float | None = BRATS_HD95_PENALTY_MM) -> dict:
    """{case: {region: {"dice", "hd95", "hd95_one_empty"}}} over every reference case (see case_metrics); a
    missing prediction is an error."""
    cases = sorted(f[:-len(file_ending)] for f in os.listdir(ground_truth_folder) if f.endswith(file_ending))
    missing = [c for c in cases if not os.path.isfile(os.path.join(prediction_folder, c + file_ending))]
    if missing:
        raise ValueError(f"{prediction_folder} lacks predictions of {len(missing)} reference case(s): {missing[:5]}")
    return {c: case_metrics(os.path.join(ground_truth_folder, c + file_ending),
                            os.path.join(prediction_folder, c + file_ending), regions, hd95_penalty) for c in cases}


def summarise(per_case: dict, regions) -> dict:
    """mean/std over cases of Dice and HD95 per region, and of the per-case mean Dice over regions."""
    summary = {}
    for name, _ in regions:
        dice = np.array([m[name]["dice"] for m in per_case.values()])
        distances = np.array([m[name]["hd95"] for m in per_case.values() if m[name]["hd95"] is not None])
        summary[name] = {"dice_mean": float(dice.mean()), "dice_std": float(dice.std()),
                         "hd95_mean": float(distances.mean()) if len(distances) else None,
                         "hd95_std": float(distances.std()) if len(distances) else None,
                         "hd95_n": int(len(distances)),
                         "hd95_one_empty": sum(bool(m[name]["hd95_one_empty"]) for m in per_case.values())}
    mean_dice = np.array([np.mean([m[name]["dice"] for name, _ in regions]) for m in per_case.values()])
    summary["mean"] = {"dice_mean": float(mean_dice.mean()), "dice_std": float(mean_dice.std())}
    return summary
