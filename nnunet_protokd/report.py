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

import json
import os
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, stats

from nnunet_protokd.brats import NNUNET_REGIONS
from nnunet_protokd.configurations import LABEL_SEPARATOR
from nnunet_protokd.experiment import METHOD_VARIANTS

METHOD_ORDER = ("teacher", "unimodal", "protokd", "kdnet", "lckd")
METHOD_TITLES = {"teacher": "Teacher (all modalities)", "unimodal": "Unimodal", "protokd": "ProtoKD",
                 "kdnet": "KD-Net", "lckd": "LCKD", **{name: title for name, (_, _, title) in METHOD_VARIANTS.items()}}
REGION_ABBREVIATIONS = {"whole tumor": "WT", "tumor core": "TC", "enhancing tumor": "ET"}
# HD95 of a case whose reference or prediction (not both) is empty, in the BraTS challenges' scoring
BRATS_HD95_PENALTY_MM = 373.13


def empty_reference_rule(hd95_penalty: float | None) -> str:
    """How empty regions are scored, for the report (`hd95_penalty` None: such cases are excluded from HD95)."""
    one_empty = "excluded from HD95" if hd95_penalty is None else f"scored HD95 = {hd95_penalty:g} mm (BraTS)"
    return ("Dice of a region empty in both reference and prediction is 1, and 0 when only one of them is empty; "
            f"HD95 is 0 when both are empty, and a case where exactly one is empty is {one_empty}")


@dataclass(frozen=True)
class PredictionSet:
    method: str
    modality: str | None  # None for the teacher, which sees every modality; "A+B" for a subset of modalities
    folder: str

    @property
    def key(self) -> str:
        return self.method if self.modality is None else f"{self.method}:{self.modality}"


def evaluation_regions(dataset_json: dict) -> list[tuple[str, tuple]]:
    """(short name, labels) of what to score: the dataset's regions; for a label-based BraTS conversion the
    BraTS regions WT/TC/ET; otherwise each foreground label."""
    labels = dataset_json["labels"]
    if "regions_class_order" in dataset_json or dataset_json.get("brats_naming"):
        source = NNUNET_REGIONS if "regions_class_order" not in dataset_json else labels
        return [(REGION_ABBREVIATIONS.get(name, name), tuple(np.atleast_1d(value).tolist()))
                for name, value in source.items() if name != "background"]
    return [(name, (int(value),)) for name, value in labels.items() if name not in ("background", "ignore")]


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
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn, region_or_label_to_mask
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
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


def significant(comparison: dict) -> bool:
    """A paired comparison counts as a difference only when the rank test (Wilcoxon p < 0.05) and the bootstrap
    95 % CI of the mean (excluding 0) agree: with the (seed, case) pairs of a few trained models, either alone
    overstates the evidence."""
    return rank_test_rejects(comparison) and (comparison["ci95"][0] > 0 or comparison["ci95"][1] < 0)


def rank_test_rejects(comparison: dict) -> bool:
    """The Wilcoxon half of `significant`: p < 0.05 (None when there are too few pairs for the test)."""
    return comparison["wilcoxon_p"] is not None and comparison["wilcoxon_p"] < 0.05


def paired_comparison(student: list, baseline: list, seed: int = 0) -> dict:
    """Student minus baseline over paired cases: mean, bootstrap 95 % CI, Wilcoxon and paired t-test p."""
    student, baseline = np.asarray(student, float), np.asarray(baseline, float)
    differences = student - baseline
    result = {"n": int(len(differences)), "mean_difference": float(differences.mean())}
    if len(differences) < 2 or np.allclose(differences, differences[0]):
        # no spread: the tests and the bootstrap are undefined
        return {**result, "ci95": [float(differences.mean())] * 2, "wilcoxon_p": None, "ttest_p": None}
    interval = stats.bootstrap((differences,), np.mean, confidence_level=0.95, n_resamples=2000,
                               method="percentile", random_state=np.random.default_rng(seed)).confidence_interval
    wilcoxon = stats.wilcoxon(student, baseline) if np.any(differences != 0) else None
    return {**result, "ci95": [float(interval.low), float(interval.high)],
            "wilcoxon_p": float(wilcoxon.pvalue) if wilcoxon is not None else None,
            "ttest_p": float(stats.ttest_rel(student, baseline).pvalue)}


def _format(mean, std, digits=3):
    return "n/a" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _p(value):
    return "n/a" if value is None else f"{value:.3g}"


def build_report(ground_truth_folder: str, dataset_json: dict, prediction_sets: list, output_folder: str,
                 images_folder: str | None = None, run_info: dict | None = None, seed: int = 0,
                 hd95_penalty: float | None = BRATS_HD95_PENALTY_MM) -> dict:
    """Scores every prediction set and writes report.md, summary.json, dice.png and overlays.png. A case where
    exactly one of reference and prediction is empty scores HD95 = `hd95_penalty` (None: excluded)."""
    regions = evaluation_regions(dataset_json)
    region_names = [name for name, _ in regions]
    file_ending = dataset_json["file_ending"]
    os.makedirs(output_folder, exist_ok=True)
    results = {}
    for prediction_set in prediction_sets:
        per_case = evaluate_folder(ground_truth_folder, prediction_set.folder, regions, file_ending, hd95_penalty)
        results[prediction_set.key] = {"method": prediction_set.method, "modality": prediction_set.modality,
                                       "folder": os.path.abspath(prediction_set.folder),
                                       "summary": summarise(per_case, regions), "per_case": per_case}
    comparisons = {}
    for key, result in results.items():
        baseline = results.get(f"unimodal:{result['modality']}")
        if result["method"] in ("teacher", "unimodal") or baseline is None:
            continue
        comparisons[key] = {name: paired_comparison(
            [result["per_case"][c][name]["dice"] for c in sorted(result["per_case"])],
            [baseline["per_case"][c][name]["dice"] for c in sorted(result["per_case"])], seed)
            for name in region_names}
    summary = {"n_cases": len(next(iter(results.values()))["per_case"]) if results else 0,
               "regions": region_names, "empty_reference_rule": empty_reference_rule(hd95_penalty),
               "hd95_penalty_mm": hd95_penalty,
               "ground_truth_folder": os.path.abspath(ground_truth_folder),
               "results": results, "comparisons_with_unimodal": comparisons, "run": run_info or {}}
    with open(os.path.join(output_folder, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    _write_markdown(summary, os.path.join(output_folder, "report.md"))
    from nnunet_protokd.plots import plot_dice_bars, plot_overlays
    plot_dice_bars(summary, os.path.join(output_folder, "dice.png"))
    if images_folder:
        plot_overlays(summary, dataset_json, images_folder, ground_truth_folder,
                      os.path.join(output_folder, "overlays.png"))
    return summary


def ordered_results(summary: dict) -> list:
    """The rows of Table 1: the teacher first, then per single modality unimodal, ProtoKD, KD-Net, LCKD.
    Predictions from several modalities (LCKD's subsets) are left to `subset_results`."""
    def rank(item):
        result = item[1]
        base = METHOD_VARIANTS[result["method"]][0] if result["method"] in METHOD_VARIANTS else result["method"]
        method = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
        return (result["modality"] is not None, result["modality"] or "", method, result["method"] != base,
                result["method"])
    return sorted(((key, result) for key, result in summary["results"].items()
                   if LABEL_SEPARATOR not in (result["modality"] or "")), key=rank)


def subset_results(summary: dict, method: str = "lckd") -> list:
    """`method`'s results for every subset of modalities it was given, fewest modalities first."""
    results = [(key, r) for key, r in summary["results"].items() if r["method"] == method and r["modality"]]
    return sorted(results, key=lambda item: len(item[1]["modality"].split(LABEL_SEPARATOR)))


def _write_markdown(summary: dict, path: str) -> None:
    regions = summary["regions"]
    lines = ["# Single-modality segmentation: Table 1", "",
             f"{summary['n_cases']} held-out cases; reference {summary['ground_truth_folder']}.", "",
             f"Scoring: Dice from nnU-Net's region-aware metric code; {summary['empty_reference_rule']}.", "",
             "## Dice (mean ± std over cases)", "",
             "| Modality | Method | " + " | ".join(regions) + " | Mean |",
             "|---|---|" + "---|" * (len(regions) + 1)]
    for _, result in ordered_results(summary):
        s = result["summary"]
        lines.append(f"| {result['modality'] or 'all'} | {METHOD_TITLES.get(result['method'], result['method'])} | "
                     + " | ".join(_format(s[r]["dice_mean"], s[r]["dice_std"]) for r in regions)
                     + f" | {_format(s['mean']['dice_mean'], s['mean']['dice_std'])} |")
    penalty = summary.get("hd95_penalty_mm")
    one_empty = "excluded" if penalty is None else f"at {penalty:g}"
    lines += ["", f"## HD95 in mm (mean ± std over n cases; k cases with exactly one of reference and prediction "
                  f"empty, {'excluded' if penalty is None else f'scored {penalty:g} mm as in BraTS'})", "",
              "| Modality | Method | " + " | ".join(regions) + " |", "|---|---|" + "---|" * len(regions)]
    for _, result in ordered_results(summary):
        s = result["summary"]
        lines.append(f"| {result['modality'] or 'all'} | {METHOD_TITLES.get(result['method'], result['method'])} | "
                     + " | ".join(f"{_format(s[r]['hd95_mean'], s[r]['hd95_std'], 2)} "
                                  f"(n={s[r]['hd95_n']}, k={s[r]['hd95_one_empty']} {one_empty})"
                                  for r in regions) + " |")
    subsets = subset_results(summary)
    if subsets:
        lines += ["", "## LCKD: one model given each subset of the modalities (Dice, mean ± std over cases)", "",
                  "| Modalities | " + " | ".join(regions) + " | Mean |", "|---|" + "---|" * (len(regions) + 1)]
        for _, result in subsets:
            s = result["summary"]
            lines.append(f"| {result['modality']} | "
                         + " | ".join(_format(s[r]["dice_mean"], s[r]["dice_std"]) for r in regions)
                         + f" | {_format(s['mean']['dice_mean'], s['mean']['dice_std'])} |")
    if summary["comparisons_with_unimodal"]:
        lines += ["", "## Students vs the unimodal baseline of their modality (paired over cases, Dice)", "",
                  "| Modality | Method | Region | n | Mean difference | Bootstrap 95 % CI | Wilcoxon p | Paired t p |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, per_region in summary["comparisons_with_unimodal"].items():
            result = summary["results"][key]
            for region, c in per_region.items():
                lines.append(f"| {result['modality']} | {METHOD_TITLES.get(result['method'], result['method'])} | "
                             f"{region} | {c['n']} | {c['mean_difference']:+.3f} | "
                             f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | {_p(c['wilcoxon_p'])} | "
                             f"{_p(c['ttest_p'])} |")
    if summary["run"]:
        lines += ["", "## What ran", "", "```", json.dumps(summary["run"], indent=2), "```"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
