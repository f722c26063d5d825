"""Lesion-wise Dice and HD95 (evaluation/lesionwise.py) against the BraTS organisers' own scoring code, and the
rules a user relies on: small reference lesions ignored, a false-positive lesion scored 0 and the penalty, an
empty case scored 1 and 0, and the report's defaults following the dataset's BraTS generation."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_protokd.data.brats_labels import CONVENTIONS
from nnunet_protokd.evaluation.lesionwise import (
    BRATS2023_PENALTY_MM,
    BRATS2024_PENALTY_MM,
    SCHEMES,
    LesionRule,
    lesionwise_scores,
    scheme_for,
    sub_challenge_of,
)
from nnunet_protokd.evaluation.metrics import case_metrics
from nnunet_protokd.evaluation.report import PredictionSet, build_report

SHAPE = (40, 40, 40)
# nnU-Net labels of a converted BraTS dataset: 1 SNFH/ED, 2 NETC, 3 ET, 4 RC (brats_labels.NNUNET_CLASSES)
SNFH, NETC, ET, RC = 1, 2, 3, 4
REGIONS = {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,), "RC": (4,)}


def box(array, low, high, label):
    array[tuple(slice(lo, hi) for lo, hi in zip(low, high))] = label


def tumour(array, corner, size=8, shift=0):
    """A cube of oedema around a core of necrosis and enhancing tumour."""
    z, y, x = (c + shift for c in corner)
    box(array, (z, y, x), (z + size, y + size, x + size), SNFH)
    box(array, (z + 2, y + 2, x + 2), (z + size - 2, y + size - 2, x + size - 2), ET)
    box(array, (z + 3, y + 3, x + 3), (z + size - 3, y + size - 3, x + size - 3), NETC)


def synthetic_cases() -> dict:
    """{case: (reference, prediction, spacing in array axis order)}, nnU-Net labels, arrays (z, y, x)."""
    cases = {}
    reference, prediction = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    tumour(reference, (2, 2, 2))
    tumour(reference, (2, 25, 25), size=10)
    box(reference, (30, 2, 30), (33, 5, 33), SNFH)  # 27 voxels: under every 2023 threshold but MET's
    tumour(prediction, (2, 2, 2), shift=1)  # found, one voxel off
    box(prediction, (2, 25, 25), (12, 35, 30), SNFH)  # the second found in part, its enhancing core missed
    box(prediction, (30, 30, 2), (34, 34, 6), ET)  # a false-positive enhancing lesion
    cases["several_lesions"] = (reference, prediction, (1.0, 1.0, 1.0))
    reference, prediction = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    box(prediction, (10, 10, 10), (16, 16, 16), ET)
    cases["empty_reference"] = (reference, prediction, (1.0, 1.0, 1.0))
    reference, prediction = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    tumour(reference, (10, 10, 10))
    cases["empty_prediction"] = (reference, prediction, (1.0, 1.0, 1.0))
    cases["both_empty"] = (np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8), (1.0, 1.0, 1.0))
    reference, prediction = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    box(reference, (5, 5, 5), (11, 11, 11), ET)  # two lesions 2 voxels apart: one lesion after dilation
    box(reference, (5, 5, 13), (11, 11, 19), ET)
    box(reference, (25, 25, 25), (29, 29, 29), ET)  # 64 voxels of 2 mm^3: 128 mm^3, over the threshold
    box(prediction, (5, 5, 5), (11, 11, 11), ET)
    box(prediction, (5, 5, 20), (7, 7, 22), ET)  # a small piece beside the second: matched, no false positive
    cases["close_lesions_anisotropic"] = (reference, prediction, (2.0, 1.0, 1.0))
    reference, prediction = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    tumour(reference, (2, 2, 2), size=12)
    box(reference, (4, 4, 4), (6, 12, 12), RC)  # a cavity inside the oedema, touching the core
    box(reference, (25, 25, 25), (32, 32, 32), RC)  # a second cavity, alone
    box(reference, (20, 2, 20), (22, 4, 22), ET)  # 8 voxels of enhancing tumour: under 2024's 10 mm^3
    tumour(prediction, (2, 2, 2), size=12, shift=1)
    box(prediction, (26, 26, 26), (32, 32, 32), RC)
    box(prediction, (35, 35, 2), (37, 37, 4), RC)  # 8 predicted voxels: dropped (2024), no false positive
    box(prediction, (2, 30, 30), (8, 36, 36), RC)  # a false-positive cavity
    cases["post_treatment"] = (reference, prediction, (1.0, 1.0, 1.0))
    return cases


# The organisers' numbers for synthetic_cases(), computed once (lesion-wise Dice, HD95 in mm, TP, FP, FN lesions):
# each case saved as NIfTI (BraTS labels 1 NETC, 2 SNFH, 3 ET, 4 RC; arrays transposed to x, y, z; the spacing in
# the affine) and scored by get_LesionWiseResults(pred_file, gt_file, challenge_name) of
# - rachitsaluja/BraTS-2023-Metrics at 43c905242b2eecf421d4ab2da7af8ece9777d322, metrics.py, challenge_name
#   "BraTS-GLI" (brats2023 GLI) and "BraTS-MET" (brats2023 MET); Python 3.11, numpy 1.26.4, pandas 1.5.3,
#   scipy 1.11.4, nibabel 5.4.2, connected-components-3d 4.1.1 (their pandas 1.3.4 has no Python 3.11 wheel; pandas
#   1.5.3 refuses their DataFrame.replace(np.inf, 374) over the column holding arrays of matched lesion numbers,
#   so that call was applied to the numeric columns only, which is what it replaces);
# - rachitsaluja/BraTS-2024-Metrics at f1131e340e155908553c226675644a6363b998b7, metrics_GLI.py, challenge_name
#   "BraTS-GLI" (brats2024 GLI), same environment plus MedPy 0.5.2, unchanged.
# Columns LesionWise_Score_Dice, LesionWise_Score_HD95, Num_TP, Num_FP, Num_FN of the rows WT, TC, ET (and RC).
ORGANISERS = {
    ("brats2024", "GLI", "both_empty", "WT"): (1.0, 0.0, 0, 0, 0),
    ("brats2024", "GLI", "both_empty", "TC"): (1.0, 0.0, 0, 0, 0),
    ("brats2024", "GLI", "both_empty", "ET"): (1.0, 0.0, 0, 0, 0),
    ("brats2024", "GLI", "both_empty", "RC"): (1.0, 0.0, 0, 0, 0),
    ("brats2024", "GLI", "close_lesions_anisotropic", "WT"): (0.3333333333333333, 172.5, 1, 0, 1),
    ("brats2024", "GLI", "close_lesions_anisotropic", "TC"): (0.3333333333333333, 172.5, 1, 0, 1),
    ("brats2024", "GLI", "close_lesions_anisotropic", "ET"): (0.3333333333333333, 172.5, 1, 0, 1),
    ("brats2024", "GLI", "close_lesions_anisotropic", "RC"): (1.0, 0.0, 0, 0, 0),
    ("brats2024", "GLI", "empty_prediction", "WT"): (0.0, 337.0, 0, 0, 1),
    ("brats2024", "GLI", "empty_prediction", "TC"): (0.0, 337.0, 0, 0, 1),
    ("brats2024", "GLI", "empty_prediction", "ET"): (0.0, 337.0, 0, 0, 1),
    ("brats2024", "GLI", "empty_prediction", "RC"): (1.0, 0.0, 0, 0, 0),
    ("brats2024", "GLI", "empty_reference", "WT"): (0.0, 337.0, 0, 1, 0),
    ("brats2024", "GLI", "empty_reference", "TC"): (0.0, 337.0, 0, 1, 0),
    ("brats2024", "GLI", "empty_reference", "ET"): (0.0, 337.0, 0, 1, 0),
    ("brats2024", "GLI", "empty_reference", "RC"): (1.0, 0.0, 0, 0, 0),
    ("brats2024", "GLI", "post_treatment", "WT"): (0.7212230215827338, 3.0, 1, 0, 0),
    ("brats2024", "GLI", "post_treatment", "TC"): (0.65625, 1.4142135623730951, 1, 0, 0),
    ("brats2024", "GLI", "post_treatment", "ET"): (0.092, 1.4142135623730951, 1, 0, 0),
    ("brats2024", "GLI", "post_treatment", "RC"): (0.257602862254025, 225.1380711874577, 1, 1, 1),
    ("brats2024", "GLI", "several_lesions", "WT"): (0.33414713541666663, 170.0, 2, 1, 1),
    ("brats2024", "GLI", "several_lesions", "TC"): (0.140625, 225.1380711874577, 1, 1, 1),
    ("brats2024", "GLI", "several_lesions", "ET"): (0.07142857142857142, 225.1380711874577, 1, 1, 1),
    ("brats2024", "GLI", "several_lesions", "RC"): (1.0, 0.0, 0, 0, 0),
    ("brats2023", "GLI", "both_empty", "WT"): (1.0, 0.0, 0, 0, 0),
    ("brats2023", "GLI", "both_empty", "TC"): (1.0, 0.0, 0, 0, 0),
    ("brats2023", "GLI", "both_empty", "ET"): (1.0, 0.0, 0, 0, 0),
    ("brats2023", "GLI", "close_lesions_anisotropic", "WT"): (0.32926829268292684, 190.0, 1, 0, 1),
    ("brats2023", "GLI", "close_lesions_anisotropic", "TC"): (0.32926829268292684, 190.0, 1, 0, 1),
    ("brats2023", "GLI", "close_lesions_anisotropic", "ET"): (0.32926829268292684, 190.0, 1, 0, 1),
    ("brats2023", "GLI", "empty_prediction", "WT"): (0.0, 374.0, 0, 0, 1),
    ("brats2023", "GLI", "empty_prediction", "TC"): (0.0, 374.0, 0, 0, 1),
    ("brats2023", "GLI", "empty_prediction", "ET"): (0.0, 374.0, 0, 0, 1),
    ("brats2023", "GLI", "empty_reference", "WT"): (0.0, 374.0, 0, 1, 0),
    ("brats2023", "GLI", "empty_reference", "TC"): (0.0, 374.0, 0, 1, 0),
    ("brats2023", "GLI", "empty_reference", "ET"): (0.0, 374.0, 0, 1, 0),
    ("brats2023", "GLI", "post_treatment", "WT"): (0.7212230215827338, 3.0, 1, 0, 0),
    ("brats2023", "GLI", "post_treatment", "TC"): (0.65625, 1.4142135623730951, 1, 0, 0),
    ("brats2023", "GLI", "post_treatment", "ET"): (0.092, 1.4142135623730951, 1, 0, 0),
    ("brats2023", "GLI", "several_lesions", "WT"): (0.44552951388888884, 126.66666666666667, 2, 1, 0),
    ("brats2023", "GLI", "several_lesions", "TC"): (0.140625, 249.80473785412437, 1, 1, 1),
    ("brats2023", "GLI", "several_lesions", "ET"): (0.07142857142857142, 249.80473785412437, 1, 1, 1),
    ("brats2023", "MET", "both_empty", "WT"): (1.0, 0.0, 0, 0, 0),
    ("brats2023", "MET", "both_empty", "TC"): (1.0, 0.0, 0, 0, 0),
    ("brats2023", "MET", "both_empty", "ET"): (1.0, 0.0, 0, 0, 0),
    ("brats2023", "MET", "close_lesions_anisotropic", "WT"): (0.2222222222222222, 252.0, 1, 1, 1),
    ("brats2023", "MET", "close_lesions_anisotropic", "TC"): (0.2222222222222222, 252.0, 1, 1, 1),
    ("brats2023", "MET", "close_lesions_anisotropic", "ET"): (0.2222222222222222, 252.0, 1, 1, 1),
    ("brats2023", "MET", "empty_prediction", "WT"): (0.0, 374.0, 0, 0, 1),
    ("brats2023", "MET", "empty_prediction", "TC"): (0.0, 374.0, 0, 0, 1),
    ("brats2023", "MET", "empty_prediction", "ET"): (0.0, 374.0, 0, 0, 1),
    ("brats2023", "MET", "empty_reference", "WT"): (0.0, 374.0, 0, 1, 0),
    ("brats2023", "MET", "empty_reference", "TC"): (0.0, 374.0, 0, 1, 0),
    ("brats2023", "MET", "empty_reference", "ET"): (0.0, 374.0, 0, 1, 0),
    ("brats2023", "MET", "post_treatment", "WT"): (0.36147836538461536, 188.0, 1, 0, 1),
    ("brats2023", "MET", "post_treatment", "TC"): (0.328125, 187.70710678118655, 1, 0, 1),
    ("brats2023", "MET", "post_treatment", "ET"): (0.046, 187.70710678118655, 1, 0, 1),
    ("brats2023", "MET", "several_lesions", "WT"): (0.33414713541666663, 188.5, 2, 1, 1),
    ("brats2023", "MET", "several_lesions", "TC"): (0.140625, 249.80473785412437, 1, 1, 1),
    ("brats2023", "MET", "several_lesions", "ET"): (0.07142857142857142, 249.80473785412437, 1, 1, 1),
}
# HD95 of a matched lesion: the organisers measure between surface elements (DeepMind's surface-distance), this
# project between surface voxels; they differ by up to a voxel (1 mm here). Penalties and Dice agree exactly.
HD95_TOLERANCE_MM = 1.0


@pytest.fixture(scope="module")
def cases():
    return synthetic_cases()


@pytest.mark.parametrize("generation, sub_challenge, case, region", sorted(ORGANISERS))
def test_lesionwise_scores_match_the_organisers_code(cases, generation, sub_challenge, case, region):
    reference, prediction, spacing = cases[case]
    rule = SCHEMES[generation, sub_challenge].rules[region]
    ours = lesionwise_scores(reference, prediction, REGIONS[region], rule, spacing)
    dice, distance, tp, fp, fn = ORGANISERS[generation, sub_challenge, case, region]
    assert (ours["lesion_tp"], ours["lesion_fp"], ours["lesion_fn"]) == (tp, fp, fn)
    assert ours["lesion_dice"] == pytest.approx(dice, abs=1e-12)
    assert ours["lesion_hd95"] == pytest.approx(distance, abs=HD95_TOLERANCE_MM)


def one_lesion_case(reference_voxels: int, prediction_box=None):
    """A reference lesion of `reference_voxels` (a 1-voxel-thick row) and optionally a predicted box."""
    reference, prediction = np.zeros((20, 20, 20), np.uint8), np.zeros((20, 20, 20), np.uint8)
    reference[10, 10, 2:2 + reference_voxels] = ET
    if prediction_box:
        box(prediction, *prediction_box, ET)
    return reference, prediction


RULE = LesionRule(dilation=1, min_volume=5, hd95_penalty_mm=300.0)


def test_a_reference_lesion_at_or_under_the_size_threshold_is_ignored():
    reference, prediction = one_lesion_case(5)  # 5 mm^3, missed: not scored, no false negative
    assert lesionwise_scores(reference, prediction, (ET,), RULE, (1, 1, 1)) == {
        "lesion_dice": 1.0, "lesion_hd95": 0.0, "lesion_tp": 0, "lesion_fp": 0, "lesion_fn": 0}
    reference, prediction = one_lesion_case(6)  # 6 mm^3: over it, missed
    assert lesionwise_scores(reference, prediction, (ET,), RULE, (1, 1, 1)) == {
        "lesion_dice": 0.0, "lesion_hd95": 300.0, "lesion_tp": 0, "lesion_fp": 0, "lesion_fn": 1}
    # the threshold is a volume: 3 voxels of 2 mm^3 are 6 mm^3
    reference, prediction = one_lesion_case(3)
    assert lesionwise_scores(reference, prediction, (ET,), RULE, (2, 1, 1))["lesion_fn"] == 1


def test_a_prediction_of_an_ignored_lesion_is_no_false_positive():
    reference, prediction = one_lesion_case(4, ((10, 10, 2), (11, 11, 6)))
    assert lesionwise_scores(reference, prediction, (ET,), RULE, (1, 1, 1))["lesion_fp"] == 0


def test_a_false_positive_lesion_scores_dice_0_and_the_penalty():
    reference, prediction = one_lesion_case(10, ((10, 10, 2), (11, 11, 12)))  # found exactly
    found = lesionwise_scores(reference, prediction, (ET,), RULE, (1, 1, 1))
    assert found == {"lesion_dice": 1.0, "lesion_hd95": 0.0, "lesion_tp": 1, "lesion_fp": 0, "lesion_fn": 0}
    box(prediction, (2, 2, 2), (4, 4, 4), ET)  # and an invented lesion far away: (1 + 0) / 2, (0 + 300) / 2
    assert lesionwise_scores(reference, prediction, (ET,), RULE, (1, 1, 1)) == {
        "lesion_dice": 0.5, "lesion_hd95": 150.0, "lesion_tp": 1, "lesion_fp": 1, "lesion_fn": 0}


def test_a_prediction_within_the_dilation_matches_and_one_beyond_is_a_false_positive():
    reference, prediction = one_lesion_case(10, ((12, 10, 2), (13, 11, 12)))  # two voxels away: beyond 1
    assert lesionwise_scores(reference, prediction, (ET,), RULE, (1, 1, 1))["lesion_fp"] == 1
    wider = LesionRule(dilation=2, min_volume=5, hd95_penalty_mm=300.0)
    assert lesionwise_scores(reference, prediction, (ET,), wider, (1, 1, 1))["lesion_tp"] == 1


def test_empty_reference_and_prediction_score_1_and_0():
    empty = np.zeros((8, 8, 8), np.uint8)
    for scheme in SCHEMES.values():
        for region, rule in scheme.rules.items():
            assert lesionwise_scores(empty, empty, REGIONS[region], rule, (1, 1, 1)) == {
                "lesion_dice": 1.0, "lesion_hd95": 0.0, "lesion_tp": 0, "lesion_fp": 0, "lesion_fn": 0}


def test_schemes_follow_the_generation_and_the_case_names():
    assert scheme_for("brats2018", "GLI") is None and scheme_for(None, None) is None
    assert scheme_for("brats2023", None).name == "BraTS 2023 GLI"
    assert scheme_for("brats2023", "MET").rules["ET"] == LesionRule(1, 2, BRATS2023_PENALTY_MM)
    glioma_2024 = scheme_for("brats2024", "GLI")
    assert list(glioma_2024.rules) == ["WT", "TC", "ET", "RC"] and glioma_2024.hd95_penalty_mm == BRATS2024_PENALTY_MM
    assert sub_challenge_of(["BraTS-MEN-00004-000", "BraTS-MEN-00008-001"]) == "MEN"
    assert sub_challenge_of(["case_0"]) is None
    with pytest.raises(ValueError, match="GLI: BraTS-GLI-00000-000, MET: BraTS-MET-00001-000"):
        sub_challenge_of(["BraTS-GLI-00000-000", "BraTS-MET-00001-000"])


def write(path, array, spacing):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    sitk.WriteImage(image, str(path))


@pytest.mark.parametrize("generation, penalty", [("brats2023", BRATS2023_PENALTY_MM),
                                                 ("brats2024", BRATS2024_PENALTY_MM)])
def test_report_scores_a_2023_or_2024_dataset_lesion_wise_with_its_penalty(cases, tmp_path, generation, penalty):
    """A dataset converted from BraTS 2023/2024 gets its generation's regions, lesion-wise scores and penalty
    (legacy HD95 too); the per-case dict keeps its legacy keys."""
    convention = CONVENTIONS[generation]
    dataset_json = {"labels": convention.nnunet_regions, "regions_class_order": list(convention.regions_class_order),
                    "file_ending": ".nii.gz", "brats_generation": generation, "channel_names": {"0": "T1ce"}}
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    for number, case in enumerate(("several_lesions", "empty_reference")):
        reference, prediction, spacing = cases[case]
        write(tmp_path / "gt" / f"BraTS-GLI-0000{number}-000.nii.gz", reference, spacing)
        write(tmp_path / "pred" / f"BraTS-GLI-0000{number}-000.nii.gz", prediction, spacing)
    summary = build_report(str(tmp_path / "gt"), dataset_json, [PredictionSet("teacher", None, str(tmp_path / "pred"))],
                           str(tmp_path / "report"))
    regions = ["WT", "TC", "ET"] + (["RC"] if generation == "brats2024" else [])
    assert summary["regions"] == regions and summary["hd95_penalty_mm"] == penalty
    assert summary["lesionwise"]["regions"] == regions
    per_case = summary["results"]["teacher"]["per_case"]
    invented = per_case["BraTS-GLI-00001-000"]["ET"]
    assert invented == {"dice": 0.0, "hd95": penalty, "hd95_one_empty": True, "lesion_dice": 0.0,
                        "lesion_hd95": penalty, "lesion_tp": 0, "lesion_fp": 1, "lesion_fn": 0}
    several = per_case["BraTS-GLI-00000-000"]["ET"]
    assert several["lesion_dice"] == pytest.approx(ORGANISERS[generation, "GLI", "several_lesions", "ET"][0])
    et = summary["results"]["teacher"]["summary"]["ET"]
    assert et["lesion_dice_mean"] == pytest.approx((several["lesion_dice"] + 0.0) / 2)
    assert (et["lesion_tp"], et["lesion_fp"], et["lesion_fn"]) == (1, 2, 1)
    stored = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert stored["results"]["teacher"]["per_case"] == per_case
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert f"## Lesion-wise Dice and HD95 in mm, {summary['lesionwise']['scheme']}" in markdown
    assert "(1/2/1)" in markdown  # ET's lesions found/invented/missed


def test_a_2018_dataset_keeps_the_legacy_metrics_only(cases, tmp_path):
    reference, prediction, spacing = cases["empty_reference"]
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    write(tmp_path / "gt" / "case_0.nii.gz", reference, spacing)
    write(tmp_path / "pred" / "case_0.nii.gz", prediction, spacing)
    convention = CONVENTIONS["brats2018"]
    dataset_json = {"labels": convention.nnunet_regions, "regions_class_order": list(convention.regions_class_order),
                    "file_ending": ".nii.gz", "brats_generation": "brats2018"}
    summary = build_report(str(tmp_path / "gt"), dataset_json, [PredictionSet("teacher", None, str(tmp_path / "pred"))],
                           str(tmp_path / "report"))
    assert summary["lesionwise"] is None and summary["hd95_penalty_mm"] == 373.13
    assert summary["results"]["teacher"]["per_case"]["case_0"]["ET"] == {"dice": 0.0, "hd95": 373.13,
                                                                         "hd95_one_empty": True}
    assert "Lesion-wise" not in (tmp_path / "report" / "report.md").read_text()


def test_case_metrics_without_a_scheme_has_the_legacy_keys_only(cases, tmp_path):
    reference, prediction, spacing = cases["several_lesions"]
    write(tmp_path / "r.nii.gz", reference, spacing)
    write(tmp_path / "p.nii.gz", prediction, spacing)
    metrics = case_metrics(str(tmp_path / "r.nii.gz"), str(tmp_path / "p.nii.gz"), [("ET", (3,))], [0, 1, 2, 3])
    assert set(metrics["ET"]) == {"dice", "hd95", "hd95_one_empty"}
