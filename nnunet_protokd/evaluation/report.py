"""The comparison of the ProtoKD paper's Table 1: teacher / unimodal / ProtoKD / KD-Net per modality, scored by
evaluation/metrics.py (Dice from nnU-Net's region-aware metric code, HD95 with the BraTS penalty), each student
paired with the unimodal baseline of its modality (evaluation/statistics.py). A BraTS 2023/2024 dataset (its
dataset.json's "brats_generation") is also scored lesion-wise, with the parameters and penalty of its generation and
sub-challenge (evaluation/lesionwise.py), and its legacy HD95 penalty is the generation's."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from nnunet_protokd.data.brats_labels import generation_of
from nnunet_protokd.data.regions import evaluation_regions
from nnunet_protokd.evaluation.figures import plot_dice_bars, plot_overlays
from nnunet_protokd.evaluation.lesionwise import LesionScheme, scheme_for, sub_challenge_of
from nnunet_protokd.evaluation.metrics import (
    BRATS_HD95_PENALTY_MM,
    ScoringInputError,
    dataset_labels,
    empty_reference_rule,
    evaluate_folder,
    reference_cases,
    summarise,
)
from nnunet_protokd.evaluation.statistics import (
    format_p,
    holm_adjust,
    paired_comparison,
    replicate_comparison,
    verdict,
)
from nnunet_protokd.io import write_json_atomically
from nnunet_protokd.methods import MODALITY_SEPARATOR, TEACHER, ModelKey, baseline_of, title


@dataclass(frozen=True)
class PredictionSet:
    method: str
    modality: str | None  # None for the teacher, which sees every modality; "A+B" for a subset of modalities
    folder: str

    @property
    def key(self) -> str:
        """The ModelKey text that keys this set's results ("teacher", "protokd:T1ce", "lckd:T1ce+FLAIR")."""
        return ModelKey(self.method, self.modality).text


# build_report's HD95 penalty when none is given: the dataset's BraTS generation decides
DATASET_DEFAULT = "dataset"


def lesion_scheme_of(dataset_json: dict, ground_truth_folder: str) -> LesionScheme | None:
    """The organisers' lesion-wise scoring of this dataset: its BraTS generation (dataset.json) and the
    sub-challenge its reference case names say (GLI when they say none); None for BraTS 2018-2021 and others."""
    generation = generation_of(dataset_json)
    cases = reference_cases(ground_truth_folder, dataset_json["file_ending"])
    try:
        return scheme_for(generation.name if generation else None, sub_challenge_of(cases))
    except ValueError as exc:
        raise ScoringInputError(f"{ground_truth_folder}: {exc}") from None


def _format(mean, std, digits=3):
    return "n/a" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def build_report(ground_truth_folder: str, dataset_json: dict, prediction_sets: list, output_folder: str,
                 images_folder: str | None = None, run_info: dict | None = None, seed: int = 0,
                 hd95_penalty: float | None | str = DATASET_DEFAULT, model_of_case: dict | None = None) -> dict:
    """Scores every prediction set and writes report.md, summary.json, dice.png and overlays.png. A case where
    exactly one of reference and prediction is empty scores HD95 = `hd95_penalty` (None: excluded; by default
    the dataset's: 374 mm for BraTS 2023, 337 mm for BraTS 2024 glioma, 373.13 mm otherwise). A BraTS 2023/2024
    dataset is also scored lesion-wise (`lesion_scheme_of`).

    model_of_case: {case: the trained model that predicted it} (cross-validation: its fold). With two models or
    more, the comparisons take the trained model as the unit and carry statistics.verdict's rule
    (replicate_comparison, Holm over each modality's comparisons of a region); otherwise they are case-level and
    descriptive."""
    if not os.path.isdir(ground_truth_folder):
        raise ScoringInputError(f"ground-truth folder {ground_truth_folder} does not exist or is not a folder")
    if os.path.exists(output_folder) and not os.path.isdir(output_folder):
        raise ScoringInputError(f"the report folder {output_folder} is a file; give a folder to write the report in")
    folders = {}
    for prediction_set in prediction_sets:  # keyed by method and modality: a second set would replace the first
        if prediction_set.modality is None and prediction_set.method != TEACHER.name:
            raise ScoringInputError(f"prediction set {prediction_set.method}={prediction_set.folder} names no "
                                    f"modality: give {prediction_set.method}:MODALITY=FOLDER (only the teacher reads "
                                    f"every modality)")
        if prediction_set.key in folders:
            raise ScoringInputError(f"two prediction sets are {prediction_set.key}: {folders[prediction_set.key]} and "
                                    f"{prediction_set.folder}; give each METHOD:MODALITY once")
        folders[prediction_set.key] = prediction_set.folder
    regions = evaluation_regions(dataset_json)
    lesion_scheme = lesion_scheme_of(dataset_json, ground_truth_folder)
    if hd95_penalty == DATASET_DEFAULT:
        hd95_penalty = lesion_scheme.hd95_penalty_mm if lesion_scheme else BRATS_HD95_PENALTY_MM
    region_names = [name for name, _ in regions]
    file_ending = dataset_json["file_ending"]
    labels = dataset_labels(dataset_json)
    results = {}
    for prediction_set in prediction_sets:
        per_case = evaluate_folder(ground_truth_folder, prediction_set.folder, regions, labels, file_ending,
                                   hd95_penalty, lesion_scheme)
        results[prediction_set.key] = {"method": prediction_set.method, "modality": prediction_set.modality,
                                       "folder": os.path.abspath(prediction_set.folder),
                                       "summary": summarise(per_case, regions), "per_case": per_case}
    comparisons = {}
    several_models = len(set((model_of_case or {}).values())) > 1
    for key, result in results.items():
        baseline = baseline_of(results, key)
        if baseline is None:
            continue
        cases = sorted(result["per_case"])
        if several_models:
            comparisons[key] = {name: replicate_comparison(
                {(model_of_case[c], c): result["per_case"][c][name]["dice"] for c in cases},
                {(model_of_case[c], c): baseline["per_case"][c][name]["dice"] for c in cases}, seed)
                for name in region_names}
        else:
            comparisons[key] = {name: paired_comparison([result["per_case"][c][name]["dice"] for c in cases],
                                                        [baseline["per_case"][c][name]["dice"] for c in cases], seed)
                                for name in region_names}
    if several_models:
        for modality in {results[key]["modality"] for key in comparisons}:
            for name in region_names:
                family = {key: per_region[name] for key, per_region in comparisons.items()
                          if results[key]["modality"] == modality}
                for key, p in holm_adjust({k: c["seed_level"]["p"] for k, c in family.items()}).items():
                    family[key]["holm_p"] = p
    summary = {"n_cases": len(next(iter(results.values()))["per_case"]) if results else 0,
               "regions": region_names, "empty_reference_rule": empty_reference_rule(hd95_penalty),
               "hd95_penalty_mm": hd95_penalty,
               "lesionwise": None if lesion_scheme is None else {
                   "scheme": lesion_scheme.name, "rule": lesion_scheme.describe(),
                   "regions": [name for name in region_names if name in lesion_scheme.rules]},
               "ground_truth_folder": os.path.abspath(ground_truth_folder),
               "results": results, "comparisons_with_unimodal": comparisons,
               "comparison_unit": "trained model" if several_models else "case", "run": run_info or {}}
    os.makedirs(output_folder, exist_ok=True)  # only once every file scored: bad input leaves nothing behind
    write_json_atomically(summary, os.path.join(output_folder, "summary.json"), indent=2, allow_nan=True)
    _write_markdown(summary, os.path.join(output_folder, "report.md"))
    rows = [result for _, result in ordered_results(summary)]
    plot_dice_bars(summary, rows, os.path.join(output_folder, "dice.png"))
    if images_folder:
        plot_overlays(rows, dataset_json, images_folder, ground_truth_folder,
                      os.path.join(output_folder, "overlays.png"))
    return summary


def ordered_results(summary: dict) -> list:
    """The rows of Table 1: the teacher first, then per single modality unimodal, ProtoKD, KD-Net, LCKD.
    Predictions from several modalities (LCKD's subsets) are left to `subset_results`."""
    return sorted(((key, result) for key, result in summary["results"].items()
                   if MODALITY_SEPARATOR not in (result["modality"] or "")),
                  key=lambda item: ModelKey.parse(item[0]).sort_key())


def subset_results(summary: dict, method: str = "lckd") -> list:
    """`method`'s results for every subset of modalities it was given, fewest modalities first."""
    results = [(key, r) for key, r in summary["results"].items() if r["method"] == method and r["modality"]]
    return sorted(results, key=lambda item: len(item[1]["modality"].split(MODALITY_SEPARATOR)))


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
        lines.append(f"| {result['modality'] or 'all'} | {title(result['method'])} | "
                     + " | ".join(_format(s[r]["dice_mean"], s[r]["dice_std"]) for r in regions)
                     + f" | {_format(s['mean']['dice_mean'], s['mean']['dice_std'])} |")
    penalty = summary.get("hd95_penalty_mm")
    one_empty = "excluded" if penalty is None else f"at {penalty:g}"
    lines += ["", f"## HD95 in mm (mean ± std over n cases; k cases with exactly one of reference and prediction "
                  f"empty, {'excluded' if penalty is None else f'scored {penalty:g} mm as in BraTS'})", "",
              "| Modality | Method | " + " | ".join(regions) + " |", "|---|---|" + "---|" * len(regions)]
    for _, result in ordered_results(summary):
        s = result["summary"]
        lines.append(f"| {result['modality'] or 'all'} | {title(result['method'])} | "
                     + " | ".join(f"{_format(s[r]['hd95_mean'], s[r]['hd95_std'], 2)} "
                                  f"(n={s[r]['hd95_n']}, k={s[r]['hd95_one_empty']} {one_empty})"
                                  for r in regions) + " |")
    if summary.get("lesionwise"):
        lines += _lesionwise_lines(summary)
    subsets = subset_results(summary)
    if subsets:
        lines += ["", "## LCKD: one model given each subset of the modalities (Dice, mean ± std over cases)", "",
                  "| Modalities | " + " | ".join(regions) + " | Mean |", "|---|" + "---|" * (len(regions) + 1)]
        for _, result in subsets:
            s = result["summary"]
            lines.append(f"| {result['modality']} | "
                         + " | ".join(_format(s[r]["dice_mean"], s[r]["dice_std"]) for r in regions)
                         + f" | {_format(s['mean']['dice_mean'], s['mean']['dice_std'])} |")
    if summary["comparisons_with_unimodal"] and summary["comparison_unit"] == "trained model":
        lines += _model_level_comparison_lines(summary)
    elif summary["comparisons_with_unimodal"]:
        lines += ["", "## Students vs the unimodal baseline of their modality (paired over cases, Dice; "
                      "descriptive: the cases share one trained model per method)", "",
                  "| Modality | Method | Region | n | Mean difference | Bootstrap 95 % CI | Wilcoxon p | Paired t p |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, per_region in summary["comparisons_with_unimodal"].items():
            result = summary["results"][key]
            for region, c in per_region.items():
                lines.append(f"| {result['modality']} | {title(result['method'])} | "
                             f"{region} | {c['n']} | {c['mean_difference']:+.3f} | "
                             f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | {format_p(c['wilcoxon_p'])} | "
                             f"{format_p(c['ttest_p'])} |")
    if summary["run"]:
        lines += ["", "## What ran", "", "```", json.dumps(summary["run"], indent=2), "```"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _lesionwise_lines(summary: dict) -> list:
    """The challenge's ranking metrics: lesion-wise Dice and HD95 per region (mean ± std over cases) with the
    lesions found (TP), invented (FP) and missed (FN), summed over cases."""
    lesionwise = summary["lesionwise"]
    regions = lesionwise["regions"]
    lines = ["", f"## Lesion-wise Dice and HD95 in mm, {lesionwise['scheme']} (mean ± std over cases; lesions "
                 f"TP/FP/FN summed over cases)", "", f"Scoring: {lesionwise['rule']}.", "",
             "| Modality | Method | " + " | ".join(regions) + " | Mean Dice |",
             "|---|---|" + "---|" * (len(regions) + 1)]
    for _, result in ordered_results(summary):
        s = result["summary"]
        lines.append(f"| {result['modality'] or 'all'} | {title(result['method'])} | "
                     + " | ".join(f"Dice {_format(s[r]['lesion_dice_mean'], s[r]['lesion_dice_std'])}, "
                                  f"HD95 {_format(s[r]['lesion_hd95_mean'], s[r]['lesion_hd95_std'], 2)} "
                                  f"({s[r]['lesion_tp']}/{s[r]['lesion_fp']}/{s[r]['lesion_fn']})" for r in regions)
                     + f" | {_format(s['mean']['lesion_dice_mean'], s['mean']['lesion_dice_std'])} |")
    return lines


def _model_level_comparison_lines(summary: dict) -> list:
    """Table 1's comparisons over several trained models (folds): the model is the unit (statistics.verdict)."""
    lines = ["", "## Students vs the unimodal baseline of their modality, the trained model (fold) as the unit (Dice)",
             "", "Mean difference [hierarchical bootstrap 95 % CI: models, then cases]; p: one-sample t-test of the "
             "models' mean differences (df = models - 1), Holm over the modality's comparisons of the region; "
             "verdict: better or worse only with p < 0.05, the CI excluding 0 and the mean, the median and all "
             "models but one agreeing. Wilcoxon p over the cases is descriptive.", "",
             "| Modality | Method | Region | models | n | Mean difference [95 % CI] | p (Holm) | per model | "
             "Verdict | Wilcoxon p (cases) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, per_region in summary["comparisons_with_unimodal"].items():
        result = summary["results"][key]
        for region, c in per_region.items():
            low, high = c["hierarchical_ci95"]
            lines.append(f"| {result['modality']} | {title(result['method'])} | {region} | {c['replicates']} | "
                         f"{c['n']} | {c['mean_difference']:+.3f} [{low:+.3f}, {high:+.3f}] | "
                         f"{format_p(c['seed_level']['p'])} ({format_p(c.get('holm_p'))}) | "
                         + ", ".join(f"{d:+.3f}" for d in c["per_replicate"].values())
                         + f" | {verdict(c).text} | {format_p(c['case_level']['wilcoxon_p'])} |")
    return lines
