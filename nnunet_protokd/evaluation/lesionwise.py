"""Lesion-wise Dice and HD95, as the BraTS 2023 and 2024 challenges rank submissions, and the surface HD95 that
both these and the legacy per-case metrics (evaluation/metrics.py) use.

The definition (read from the organisers' public scoring code; nothing of it is copied here):

- A region's reference mask is split into lesions: 26-connected components, and components whose dilations
  touch are one lesion (dilation: `rule.dilation` iterations of the 18-connected 3x3x3 cross, scipy's
  generate_binary_structure(3, 2); lesions = 26-connected components of the dilated mask, restricted to the mask).
- Predicted lesions are the prediction's 26-connected components (BraTS 2023); BraTS 2024 groups them by dilation
  like the reference and drops those of at most `rule.min_volume` voxels before matching.
- A predicted lesion matches every reference lesion whose dilation (same iterations) it meets. Each reference
  lesion scores Dice and HD95 against the union of the predicted lesions matching it; one matched by none is
  missed (FN): Dice 0 and HD95 = `rule.hd95_penalty_mm`. A predicted lesion matching none is a false positive
  (FP): it adds a Dice 0 and an HD95 penalty to the case.
- Reference lesions of at most `rule.min_volume` mm^3 are ignored: neither scored nor missed, and a prediction
  matching one is not a false positive.
- A case's lesion-wise Dice = sum of its scored lesions' Dice / (scored lesions + FP); HD95 likewise with the
  penalty for each FP. A region with no scored lesion and no FP (empty reference, empty prediction) scores
  Dice 1 and HD95 0; an empty reference with a predicted lesion scores 0 and the penalty.
- BraTS 2024 glioma scores single-label regions (ET, RC) after merging lesions across tissues: lesions of the
  region that touch (18-neighbourhood) the same lesion of another tissue are one lesion, the other tissue's
  smallest-numbered touching lesion deciding (`rule.merged_by`, in order: ET by NETC then RC; RC by ET then NETC).

Parameters by generation and sub-challenge (`SCHEMES`): BraTS 2023 (rachitsaluja/BraTS-2023-Metrics at
43c905242b2eecf421d4ab2da7af8ece9777d322, metrics.py): regions WT, TC, ET; dilation 3 (GLI, SSA, PED) or 1
(MEN, MET); lesions of at most 50 mm^3 ignored (MET: 2 mm^3); penalty 374 mm. BraTS 2024 post-treatment glioma
(rachitsaluja/BraTS-2024-Metrics at f1131e340e155908553c226675644a6363b998b7, metrics_GLI.py): WT, TC, ET and
RC; dilation 3, RC 5 (the tissues NETC 5 and SNFH 3); lesions of at most 10 (ET) or 20 mm^3 (others) ignored;
predicted lesions grouped and of at most as many voxels dropped; penalty 337 mm. BraTS 2025 scores with
panoptica (BraTS/BraTS_evaluation): connected components matched one to one by Dice, without dilation or size
threshold; not a generation the converter knows, so not here.

HD95 of a matched lesion is this module's `hd95` (voxel surfaces, scipy's Euclidean distance transform with the
spacing, the larger directed 95th percentile), as for the legacy metrics. The organisers use DeepMind's
surface-distance package (surface elements between voxel corners, percentiles weighted by surface area): on the
same lesion the two differ by up to about a voxel; Dice, lesion counts and penalties are identical
(tests/test_lesionwise.py compares them with the organisers' own numbers).

Why not panoptica (Apache-2.0, BraTS 2025's scorer) as an optional extra: `pip install --dry-run panoptica` in
this environment would replace numpy 2.4 by 2.2, pandas 3.1 by 2.3 and rich 15 by 13 under nnU-Net; and it
implements 2025's matching, not the 2023/2024 dilation rules. So this is written on scipy.ndimage.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# 3x3x3 neighbourhoods: lesions are 26-connected; dilation and "touching" use the 18-connected cross
CONNECTED_26 = np.ones((3, 3, 3), dtype=bool)
CROSS_18 = ndimage.generate_binary_structure(3, 2)
SUB_CHALLENGES = ("GLI", "MEN", "MET", "PED", "SSA")


def hd95(reference: np.ndarray, prediction: np.ndarray, spacing) -> float:
    """95th-percentile Hausdorff distance (mm) between the surfaces of two boolean masks: 0 when both are empty,
    NaN when exactly one is."""
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


@dataclass(frozen=True)
class Tissue:
    """A tissue whose lesions merge those of a scored region (BraTS 2024): its labels and own lesion rule."""
    name: str
    labels: tuple  # nnU-Net labels
    dilation: int
    min_volume: float


@dataclass(frozen=True)
class LesionRule:
    """How one region is scored lesion by lesion (module docstring)."""
    dilation: int  # iterations of the 18-connected cross, >= 1
    min_volume: float  # reference lesions of at most this many mm^3 are ignored
    hd95_penalty_mm: float  # HD95 of a missed or a false-positive lesion
    group_predictions: bool = False  # BraTS 2024: predicted lesions grouped by dilation, the small ones dropped
    merged_by: tuple = ()  # Tissue, in order: lesions touching the same lesion of it are merged


@dataclass(frozen=True)
class LesionScheme:
    """The organisers' lesion-wise scoring of one generation and sub-challenge."""
    name: str  # "BraTS 2023 GLI"
    source: str  # where the parameters were read
    rules: dict  # region short name -> LesionRule

    @property
    def hd95_penalty_mm(self) -> float:
        """The generation's HD95 penalty (one per scheme), also of its legacy per-case HD95."""
        return next(iter(self.rules.values())).hd95_penalty_mm

    def describe(self) -> str:
        """The parameters in one sentence, for the report."""
        rules = "; ".join(f"{region}: dilation {r.dilation}, lesions <= {r.min_volume:g} mm^3 ignored"
                          + (", merged across " + " then ".join(t.name for t in r.merged_by) if r.merged_by else "")
                          for region, r in self.rules.items())
        penalties = sorted({r.hd95_penalty_mm for r in self.rules.values()})
        predicted = ("predicted lesions grouped by the same dilation and those of at most the threshold's voxels "
                     "dropped" if any(r.group_predictions for r in self.rules.values())
                     else "predicted lesions are 26-connected components")
        return (f"{self.name} lesion-wise ({self.source}): {rules}; {predicted}; missed and false-positive lesions "
                f"score Dice 0 and HD95 {'/'.join(f'{p:g}' for p in penalties)} mm; no lesion and no false positive: "
                f"Dice 1, HD95 0")


BRATS2023_SOURCE = "rachitsaluja/BraTS-2023-Metrics 43c9052, metrics.py"
BRATS2024_SOURCE = "rachitsaluja/BraTS-2024-Metrics f1131e3, metrics_GLI.py"
BRATS2023_PENALTY_MM = 374.0
BRATS2024_PENALTY_MM = 337.0


def _brats2023(sub_challenge: str, dilation: int, min_volume: float) -> LesionScheme:
    rule = LesionRule(dilation, min_volume, BRATS2023_PENALTY_MM)
    return LesionScheme(f"BraTS 2023 {sub_challenge}", BRATS2023_SOURCE, {"WT": rule, "TC": rule, "ET": rule})


def _brats2024_glioma() -> LesionScheme:
    # nnU-Net labels of the tissues: 2 NETC, 3 ET, 4 RC (brats_labels.NNUNET_CLASSES)
    netc, et, rc = Tissue("NETC", (2,), 5, 20), Tissue("ET", (3,), 3, 10), Tissue("RC", (4,), 5, 20)

    def rule(dilation, min_volume, merged_by=()):
        return LesionRule(dilation, min_volume, BRATS2024_PENALTY_MM, True, merged_by)
    return LesionScheme("BraTS 2024 GLI (post-treatment)", BRATS2024_SOURCE,
                        {"WT": rule(3, 20), "TC": rule(3, 20), "ET": rule(3, 10, (netc, rc)),
                         "RC": rule(5, 20, (et, netc))})


# (generation, sub-challenge) -> scheme; generation is brats_labels.LabelConvention.name
SCHEMES = {**{("brats2023", s): _brats2023(s, d, v) for s, d, v in (
    ("GLI", 3, 50), ("SSA", 3, 50), ("PED", 3, 50), ("MEN", 1, 50), ("MET", 1, 2))},
    ("brats2024", "GLI"): _brats2024_glioma()}


def sub_challenge_of(case_ids) -> str | None:
    """The BraTS sub-challenge the case names say (BraTS-GLI-00000-000 ...), or None when none says one;
    cases of two sub-challenges are refused (each is scored with its own parameters: report them apart)."""
    found = {}
    for case in case_ids:
        match = re.search(r"BraTS-(GLI|MEN|MET|PED|SSA)-", case, re.IGNORECASE)
        if match:
            found.setdefault(match.group(1).upper(), case)
    if len(found) > 1:
        raise ValueError("the reference cases belong to several BraTS sub-challenges ("
                         + ", ".join(f"{s}: {case}" for s, case in sorted(found.items()))
                         + "), which the challenge scores with different lesion-wise parameters; report each apart")
    return next(iter(found), None)


def scheme_for(generation: str | None, sub_challenge: str | None) -> LesionScheme | None:
    """The organisers' lesion-wise scoring for a dataset's generation (None for BraTS 2018-2021 and non-BraTS
    datasets: no lesion-wise ranking then). Names that state no sub-challenge are scored as glioma (GLI)."""
    if generation not in ("brats2023", "brats2024"):
        return None
    sub_challenge = sub_challenge or "GLI"
    if (generation, sub_challenge) not in SCHEMES:
        raise ValueError(f"no lesion-wise scoring of {generation} {sub_challenge}: BraTS 2024's post-treatment labels "
                         f"(resection cavity) are glioma's (GLI) only")
    return SCHEMES[generation, sub_challenge]


def reference_lesions(mask: np.ndarray, dilation: int) -> np.ndarray:
    """Lesion numbers (0 outside): connected components whose dilations touch are one lesion."""
    dilated = ndimage.binary_dilation(mask, CROSS_18, iterations=dilation)
    grouped, _ = ndimage.label(dilated, CONNECTED_26)
    return np.where(mask, grouped, 0)


def predicted_lesions(mask: np.ndarray, rule_dilation: int, min_voxels: float, grouped: bool) -> np.ndarray:
    """Lesion numbers of a prediction: its connected components, or (BraTS 2024) grouped by dilation like the
    reference and those of at most `min_voxels` voxels dropped (numbers may then have gaps)."""
    if not grouped:
        return ndimage.label(mask, CONNECTED_26)[0]
    lesions = reference_lesions(mask, rule_dilation)
    sizes = np.bincount(lesions.ravel())
    small = np.flatnonzero(sizes <= min_voxels)
    return np.where(np.isin(lesions, small[small > 0]), 0, lesions)


def merge_touching(lesions: np.ndarray, other: np.ndarray) -> np.ndarray:
    """`lesions` with those that touch (18-neighbourhood) the same lesion of `other` merged, each lesion going
    with the smallest-numbered `other` lesion it touches; lesions touching none keep their number."""
    ids = np.unique(lesions[lesions > 0])
    if not len(ids) or not other.any():
        return lesions
    none = int(other.max()) + 1  # "touches no lesion of other", above every lesion number
    nearby = np.where(other > 0, other, none)
    smallest_near = ndimage.grey_erosion(nearby, footprint=CROSS_18, mode="constant", cval=none)
    touched = ndimage.minimum(smallest_near, labels=lesions, index=ids)
    merged = lesions.astype(np.int64)
    offset = int(lesions.max()) + 1  # new numbers above every old one
    for lesion_id, other_id in zip(ids, touched):
        if other_id != none:
            merged[lesions == lesion_id] = offset + int(other_id)
    return merged


def _tissue_lesions(label_map: np.ndarray, tissue: Tissue, is_prediction: bool) -> np.ndarray:
    mask = np.isin(label_map, tissue.labels)
    if is_prediction:
        return predicted_lesions(mask, tissue.dilation, tissue.min_volume, True)
    return reference_lesions(mask, tissue.dilation)


def lesionwise_scores(reference_map: np.ndarray, prediction_map: np.ndarray, region: tuple, rule: LesionRule,
                      spacing) -> dict:
    """A region's lesion-wise scores of one case: {"lesion_dice", "lesion_hd95", "lesion_tp", "lesion_fp",
    "lesion_fn"} (module docstring). Label maps in nnU-Net labels, `spacing` in the arrays' axis order (mm)."""
    reference_mask, prediction_mask = np.isin(reference_map, region), np.isin(prediction_map, region)
    reference = reference_lesions(reference_mask, rule.dilation)
    prediction = predicted_lesions(prediction_mask, rule.dilation, rule.min_volume, rule.group_predictions)
    for tissue in rule.merged_by:
        reference = merge_touching(reference, _tissue_lesions(reference_map, tissue, False))
        prediction = merge_touching(prediction, _tissue_lesions(prediction_map, tissue, True))
    voxel_volume = float(np.prod(spacing))
    matched_predictions = set()
    dice_sum = hd95_sum = 0.0
    tp = fn = 0
    for lesion_id in np.unique(reference[reference > 0]):
        lesion = reference == lesion_id
        near = ndimage.binary_dilation(lesion, CROSS_18, iterations=rule.dilation)
        matches = np.unique(prediction[near & (prediction > 0)])
        matched_predictions.update(matches.tolist())
        if lesion.sum() * voxel_volume <= rule.min_volume:
            continue  # too small to score; what it matches is no false positive
        if not len(matches):
            fn += 1
            hd95_sum += rule.hd95_penalty_mm
            continue
        tp += 1
        predicted = np.isin(prediction, matches)
        dice_sum += 2 * np.count_nonzero(lesion & predicted) / (lesion.sum() + predicted.sum())
        hd95_sum += hd95(lesion, predicted, spacing)
    fp = len(set(np.unique(prediction[prediction > 0]).tolist()) - matched_predictions)
    scored = tp + fn + fp
    return {"lesion_dice": 1.0 if scored == 0 else float(dice_sum / scored),
            "lesion_hd95": 0.0 if scored == 0 else float((hd95_sum + fp * rule.hd95_penalty_mm) / scored),
            "lesion_tp": tp, "lesion_fp": fp, "lesion_fn": fn}
