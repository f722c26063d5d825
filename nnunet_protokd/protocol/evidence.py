"""`nnunet-protokd evidence`: does distillation help an nnU-Net student? Measured with seeds and statistics.

For each seed: phantoms of that seed (training and held-out cases) -> the BraTS converter -> `experiment` with
the trainers seeded (teacher; per modality the unimodal baseline, ProtoKD and KD-Net; one nnU-Net trained with
modality dropout; ProtoKD's ablations and the diagnosis variants when asked for; every model on one schedule) ->
predictions of the held-out cases with probabilities (the modality-dropout model's from each student modality).
Then `aggregate` pools the seeds:

- Dice WT/TC/ET and their mean per method and modality, and each student's paired difference to the unimodal
  baseline (and each ProtoKD model's to the control) with the trained model as the unit: the seed-level t-test over
  the seeds' mean differences, a hierarchical bootstrap CI, Holm-adjusted p per modality, the smallest difference
  the seeds could detect, and one verdict rule (evaluation/statistics.py `verdict`); the case-level figures are
  kept as a description;
- knowledge transfer measured directly: each student's agreement with the teacher on the held-out cases (Dice
  between the two segmentations; mean Bernoulli KL(teacher || student) of their region probabilities over brain
  voxels), paired against the baseline's agreement;
- learning curves (nnU-Net's per-epoch pseudo Dice against iterations) and the plateau of the teacher and the
  baselines (change of the pseudo Dice over the last fifth of training);
- per-term gradient shares of the distilling students (training.py's probe), first and last epoch: the loss
  balance, for the diagnosis of a method that does not help.

evidence.json keeps every per-case value the report is computed from (Dice, HD95, agreement with the teacher,
calibration, learning curves of every seed and model): `report_from_evidence` regenerates the report from it
alone. Everything is resumable (phantoms, conversion and experiment skip what exists). `--schedule full` runs
nnU-Net's own schedule (1000 epochs of 250 iterations) and 3d_fullres on a GPU with the same command.

On a user's already converted dataset (`EvidenceSettings.dataset`, `evidence -d`) the phantoms and their
conversion are left out: each seed trains every model in the environment's nnU-Net folders (the seed is part of
each model's configuration) and predicts the dataset's held-out test set (imagesTs with labelsTs), so the
replicate is the seed as on phantoms. Without a test set (or with `folds` given) the replicates are the (seed,
fold) models of nnU-Net's cross-validation, each predicting its own validation cases; the seed-level statistics
and the hierarchical bootstrap then resample those models.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from nnunetv2.evaluation.evaluate_predictions import region_or_label_to_mask
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_protokd.data.brats import convert_brats_dataset
from nnunet_protokd.data.phantoms import audit_phantoms, generate_brats_phantoms
from nnunet_protokd.data.regions import evaluation_regions
from nnunet_protokd.errors import UserError
from nnunet_protokd.evaluation.figures import plot_learning_curves, plot_paired_differences
from nnunet_protokd.evaluation.statistics import (
    NO_KNOWLEDGE,
    UNTESTED,
    Verdict,
    distillation_verdict,
    format_p,
    holm_adjust,
    replicate_comparison,
    seed_level_test,
    verdict,
)
from nnunet_protokd.io import staged_folder, write_json_atomically
from nnunet_protokd.methods import (
    BASELINE,
    DEFAULT_METHODS,
    MODALITY_DROPOUT,
    MODALITY_SEPARATOR,
    TEACHER,
    ModelKey,
    baseline_of,
    control_of,
    every_channel_methods,
    method_trainer,
    modality_dropout_of,
    title,
)
from nnunet_protokd.plans import dataset_name
from nnunet_protokd.protocol.experiment import (
    CROSS_VALIDATION_FOLDS,
    Experiment,
    ExperimentSettings,
    has_labelled_test_set,
)
from nnunet_protokd.protocol.running import run_command

# the CPU schedule: 2d (nnU-Net plans batch 32 of whole 32x32 slices for these phantoms; an epoch of 25 steps took
# 6-8.5 s on 2 cores against about 0.5 s per step for a small 3d patch), 15 epochs of 25 iterations: 3 seeds of
# 10 models in 81 minutes. On the slower 2-core machine of the committed run (2026-12-04; an epoch 10-16 s, the
# time in the convolutions' backward pass) a seed of the default (8 models, 9 predictions) took 29.5-32 minutes
# alone, the 5 seeds about 2 h 40 min. The evidence report measures whether the models reached a plateau (pseudo
# Dice over the last fifth of training against the fifth before)
CPU_SCHEDULE = {"configuration": "2d", "epochs": 15, "iterations_per_epoch": 25, "val_iterations_per_epoch": 3}
FULL_SCHEDULE = {"configuration": "3d_fullres", "epochs": None, "iterations_per_epoch": None,
                 "val_iterations_per_epoch": None}
# ProtoKD's ablations on T1, its hardest case (the paper's Tables 2 and 3): trained with `--ablations` (they were
# trained by default until the default went from 3 seeds to 5: 3 models more per seed, about 8 minutes on 2 cores)
ABLATION_VARIANTS = (("protokd-no_kd", "T1"), ("protokd-no_proto", "T1"), ("protokd-intra", "T1"))
# the methods an evidence run trains by default: the students and the arm a practitioner would pick instead, one
# nnU-Net trained with modality dropout (one model per seed, predicted from each student modality)
EVIDENCE_METHODS = (*DEFAULT_METHODS, MODALITY_DROPOUT.name)
EVIDENCE_SEEDS = (0, 1, 2, 3, 4)
# the diagnosis (`--diagnosis`): ProtoKD's pixel-wise KD at temperature 1 on T1, and ProtoKDTrainer without either
# distillation term (the control of the ablations); KD-Net with its bottleneck KL averaged instead of summed, and
# without its soft-label term, on T1ce
DIAGNOSIS_VARIANTS = (("protokd-temp1", "T1"), ("protokd-seg_only", "T1"), ("kdnet-kl_mean", "T1ce"),
                      ("kdnet-no_kd", "T1ce"))


def train_with_augmentation_in_process(command: list, env: dict | None = None):
    """Runs an experiment's command (in `env`, or this process's environment); a training with nnU-Net's
    augmentation in the training process.

    Measured on 2 cores (2d, 25 iterations of batch 32 per epoch): 6.3 s per epoch in-process against 7.0 s with 2
    augmentation workers, which only compete with training for the cores. Only for training: nnU-Net's planner
    sets torch's thread count from the same variable and fails at 0."""
    if os.path.basename(command[0]) == "nnUNetv2_train":
        env = dict(env or os.environ, nnUNet_n_proc_DA="0")
    return run_command(command, env)


def requested_variants(variants: tuple | None, ablations: bool, diagnosis: bool, modalities: tuple) -> tuple:
    """The variants an evidence run trains: those asked for (none when None), with `ablations` ProtoKD's ablations
    and with `diagnosis` the diagnosis variants, each for the modalities asked for."""
    chosen = tuple(variants or ())
    if ablations:
        chosen += tuple(v for v in ABLATION_VARIANTS if v not in chosen and v[1] in modalities)
    if diagnosis:
        chosen += tuple(v for v in DIAGNOSIS_VARIANTS if v not in chosen and v[1] in modalities)
    return chosen


# a model has reached its plateau when its pseudo Dice moved by less than this between the last two fifths of
# training (mean over seeds). The committed run's teacher and T1ce baseline, flat on their curves, moved +0.006
# and +0.002; its T1 baseline and students, visibly still climbing, +0.01 to +0.034
PLATEAU_TOLERANCE = 0.01

# probabilities are clipped here before the KL: a student certain where the teacher is not would give infinity
PROBABILITY_FLOOR = 1e-4


@dataclass
class EvidenceSettings:
    output_folder: str
    seeds: tuple = EVIDENCE_SEEDS
    modalities: tuple = ("T1", "T1ce")
    methods: tuple = EVIDENCE_METHODS
    variants: tuple = ()
    configuration: str = CPU_SCHEDULE["configuration"]
    epochs: int | None = CPU_SCHEDULE["epochs"]
    iterations_per_epoch: int | None = CPU_SCHEDULE["iterations_per_epoch"]
    val_iterations_per_epoch: int | None = CPU_SCHEDULE["val_iterations_per_epoch"]
    device: str = "cpu"
    training_cases: dict = field(default_factory=lambda: {"num_hgg": 24, "num_lgg": 8})
    held_out_cases: dict = field(default_factory=lambda: {"num_hgg": 15, "num_lgg": 5, "first_case_index": 500})
    phantom_shape_zyx: tuple = (32, 48, 48)
    first_dataset_id: int = 620  # seed s is dataset first_dataset_id + s
    # an earlier evidence.json (the committed run, for the demo) whose figures the result sentence quotes beside ours
    reference_evidence: str | None = None
    # an already converted dataset (id or name in the user's nnUNet_raw) instead of the phantoms: each seed trains
    # every model on it and predicts its held-out test set (imagesTs with labelsTs)
    dataset: str | None = None
    # cross-validation folds taken as replicates, a (seed, fold) model each predicting its own validation cases;
    # None: the held-out test set, or for a dataset without one nnU-Net's five folds (cross_validation_folds)
    folds: tuple | None = None

    def __post_init__(self):
        self.output_folder = os.path.abspath(self.output_folder)


class Evidence:
    def __init__(self, settings: EvidenceSettings, log=print):
        self.settings, self.log = settings, log
        if settings.dataset is None:  # the phantoms get nnU-Net folders of their own; a user's dataset has its own
            folders = {f"nnUNet_{kind}": os.path.join(settings.output_folder, f"nnUNet_{kind}")
                       for kind in ("raw", "preprocessed", "results")}
            os.environ.update(folders)  # nnU-Net reads them lazily; every command the experiments run inherits them
        os.environ.setdefault("nnUNet_def_n_proc", "2")

    def seed_folder(self, seed: int) -> str:
        return os.path.join(self.settings.output_folder, f"seed_{seed}")

    def cross_validation_folds(self) -> tuple:
        """The folds whose models are the replicates beside the seeds: those asked for; for a user's dataset
        without a held-out test set nnU-Net's five; none (each seed's models predict the test set) otherwise."""
        s = self.settings
        if s.folds:
            return tuple(s.folds)
        if s.dataset is not None and not has_labelled_test_set(os.path.join(os.environ["nnUNet_raw"],
                                                                             dataset_name(s.dataset))):
            return CROSS_VALIDATION_FOLDS
        return ()

    def replicates(self, seed: int) -> list:
        """(label, fold) of each trained model of `seed` that predicts cases of its own: the seed ("3") with the
        test set; each (seed, fold) model ("3/1") in cross-validation."""
        folds = self.cross_validation_folds()
        return [(f"{seed}/{fold}", fold) for fold in folds] if folds else [(str(seed), 0)]

    def experiment(self, seed: int) -> Experiment:
        s = self.settings
        folds = self.cross_validation_folds()
        data = {"dataset": s.dataset} if s.dataset is not None else {
            "phantom_shape_zyx": list(s.phantom_shape_zyx), "training_cases": s.training_cases,
            "held_out_cases": s.held_out_cases}
        if folds:
            data["folds"] = list(folds)
        experiment = Experiment(ExperimentSettings(
            dataset=s.dataset if s.dataset is not None else str(s.first_dataset_id + seed),
            output_folder=os.path.join(self.seed_folder(seed), "experiment"),
            configuration=s.configuration, modalities=tuple(s.modalities), methods=tuple(s.methods),
            variants=tuple(s.variants), seed=seed, folds=folds or (0,), cross_validation=bool(folds),
            device=s.device, epochs=s.epochs,
            iterations_per_epoch=s.iterations_per_epoch, val_iterations_per_epoch=s.val_iterations_per_epoch,
            final_validation=False, predict_in_process=True,
            notes={"evidence": {"seed": seed, **data}}))
        if s.device == "cpu" and "nnUNet_n_proc_DA" not in os.environ:
            experiment.run_command = train_with_augmentation_in_process
        return experiment

    def prepare(self, seed: int) -> None:
        """The seed's phantoms and their conversion (each skipped when it exists); nothing for a user's dataset."""
        s = self.settings
        if s.dataset is not None:
            return
        phantoms = {name: os.path.join(self.seed_folder(seed), "phantoms", name) for name in ("training", "held_out")}
        for name, cases in (("training", s.training_cases), ("held_out", s.held_out_cases)):
            if not os.path.isdir(phantoms[name]):
                os.makedirs(os.path.dirname(phantoms[name]), exist_ok=True)
                with staged_folder(phantoms[name]) as staging:  # a phantom folder is complete or absent
                    generate_brats_phantoms(staging, seed=seed, shape_zyx=tuple(s.phantom_shape_zyx), **cases)
        raw = os.environ["nnUNet_raw"]
        dataset_id = s.first_dataset_id + seed
        if not (os.path.isdir(raw) and any(d.startswith(f"Dataset{dataset_id:03d}_") for d in os.listdir(raw))):
            convert_brats_dataset(phantoms["training"], dataset_id, raw, test_folder=phantoms["held_out"],
                                  dataset_name=f"PhantomSeed{seed}")

    def run(self) -> str:
        start = time.time()
        for seed in self.settings.seeds:
            self.log(f"=== seed {seed} ({time.strftime('%H:%M:%S', time.gmtime(time.time() - start))})")
            self.prepare(seed)
            self.experiment(seed).run(log=self.log)
        return self.aggregate(wall_time_seconds=round(time.time() - start))

    # ----- pooling the seeds
    def aggregate(self, wall_time_seconds: float | None = None, output_folder: str | None = None) -> str:
        output_folder = output_folder or os.path.join(self.settings.output_folder, "report")
        os.makedirs(output_folder, exist_ok=True)
        experiments = {seed: self.experiment(seed) for seed in self.settings.seeds}
        summaries = {}
        for seed, experiment in experiments.items():
            summary_file = os.path.join(experiment.settings.output_folder, "report", "summary.json")
            if not os.path.isfile(summary_file):
                raise UserError(f"seed {seed} has no report yet ({summary_file} is missing): run the evidence "
                                f"command without --report-only to finish it")
            with open(summary_file) as f:
                summaries[seed] = json.load(f)
        regions = summaries[self.settings.seeds[0]]["regions"]
        raw = {"regions": regions, "scores": {}, "teacher_agreement": {}, "learning_curves": {}}
        folds = self.cross_validation_folds()
        for seed, experiment in experiments.items():
            for label, fold in self.replicates(seed):
                # in cross-validation the seed's report holds every fold's cases: each replicate keeps its own
                cases = set(experiment.evaluation_cases(fold)) if folds else None
                raw["scores"][label] = {key: {case: values for case, values in result["per_case"].items()
                                              if cases is None or case in cases}
                                        for key, result in summaries[seed]["results"].items()}
                raw["teacher_agreement"][label] = teacher_agreement(experiment, regions, fold)
                raw["learning_curves"][label] = training_curves(experiment, fold)
        settings = {**asdict(self.settings), "folds": list(folds) or None, "wall_time_seconds": wall_time_seconds,
                    "runs": self.run_history(output_folder, wall_time_seconds)}
        audit = audit_phantoms(seed=self.settings.seeds[0], shape_zyx=tuple(self.settings.phantom_shape_zyx)) \
            if self.settings.dataset is None else None  # a user's dataset: its images are what they are
        reference = None
        if self.settings.reference_evidence and os.path.isfile(self.settings.reference_evidence):
            with open(self.settings.reference_evidence) as f:
                reference = reference_figures(json.load(f))
        # through JSON once: the report of a run and the report regenerated from its evidence.json are one text
        evidence = evidence_from_raw(json.loads(json.dumps(raw)), json.loads(json.dumps(settings)), audit, reference)
        report = write_evidence_report(evidence, output_folder)
        self.log(evidence["headline"])
        return report

    def run_history(self, output_folder: str, wall_time_seconds: float | None) -> list:
        """The invocations that trained this folder, oldest first (from the previous report), plus this one.

        A second invocation (say `--diagnosis` on a finished run) trains only what is missing: its wall time alone
        would misreport the run's cost."""
        previous = os.path.join(output_folder, "evidence.json")
        runs = []
        if os.path.isfile(previous):
            with open(previous) as f:
                settings = json.load(f)["settings"]
            runs = settings.get("runs") or ([{"variants": settings["variants"], "seeds": settings["seeds"],
                                              "wall_time_seconds": settings["wall_time_seconds"]}]
                                            if settings.get("wall_time_seconds") else [])
        if wall_time_seconds is not None:
            runs.append({"methods": list(self.settings.methods), "variants": [list(v) for v in self.settings.variants],
                         "seeds": list(self.settings.seeds), "wall_time_seconds": wall_time_seconds,
                         "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        return runs


def evidence_from_raw(raw: dict, settings: dict, phantom_audit: dict, reference: dict | None = None) -> dict:
    """The whole evidence (every table, figure and sentence of the report) from the raw per-case values alone:
    raw = {"regions", "scores": {seed: {key: {case: {region: {"dice", "hd95", "hd95_one_empty"}}}}},
    "teacher_agreement": {seed: {key: {case: measures}}}, "learning_curves": {seed: {key: curve}}}, seeds as text.
    `reference`: an earlier run's figures (reference_figures) that the headline quotes beside ours."""
    regions = raw["regions"]
    dice = pooled_dice(raw["scores"], regions)
    comparisons = compare_with_baseline(dice, regions)
    with_control = compare_with_control(dice, regions)
    with_modality_dropout = compare_with_modality_dropout(dice, regions)
    adjust_per_modality([comparisons, with_control, with_modality_dropout])
    evidence = {
        "settings": settings,
        "regions": regions,
        "dice": summarise_dice(dice, regions),
        "knowledge": compare_teacher_with_baselines(dice, regions),
        "comparisons": comparisons,
        "comparisons_with_control": with_control,
        "comparisons_with_modality_dropout": with_modality_dropout,
        "teacher_agreement": summarise_agreement(raw["teacher_agreement"]),
        "learning_curves": pool_curves(raw["learning_curves"]),
        "plateau": plateaus(raw["learning_curves"]),
        "gradient_shares": gradient_shares(raw["learning_curves"]),
        "phantom_audit": phantom_audit,
        "reference": reference,
    }
    evidence["headline"] = headline(evidence, reference)
    evidence["raw"] = raw
    return evidence


def write_evidence_report(evidence: dict, output_folder: str) -> str:
    """evidence.json, evidence.md and the figures in `output_folder`; returns evidence.md's path."""
    os.makedirs(output_folder, exist_ok=True)
    write_json_atomically(evidence, os.path.join(output_folder, "evidence.json"), indent=1, allow_nan=True)
    plot_learning_curves(evidence["learning_curves"], os.path.join(output_folder, "learning_curves.png"))
    plot_paired_differences(forest_rows(evidence), os.path.join(output_folder, "paired_differences.png"))
    write_evidence_markdown(evidence, os.path.join(output_folder, "evidence.md"))
    return os.path.join(output_folder, "evidence.md")


def report_from_evidence(evidence_file: str, output_folder: str) -> str:
    """`evidence --report-only FILE`: the report recomputed from an evidence.json's raw values alone, into
    `output_folder`; returns evidence.md's path."""
    if not os.path.isfile(evidence_file):
        raise UserError(f"{evidence_file} is not a file: give the evidence.json of an evidence report")
    if os.path.exists(output_folder) and not os.path.isdir(output_folder):
        raise UserError(f"the report folder {output_folder} is a file; give a folder to write the report in")
    try:
        with open(evidence_file) as f:
            stored = json.load(f)
    except json.JSONDecodeError as error:
        raise UserError(f"{evidence_file} is not JSON ({error})") from None
    if not isinstance(stored, dict) or "raw" not in stored:
        raise UserError(f"{evidence_file} holds no per-case values (no \"raw\"): it was written before the report kept "
                        f"them; run `nnunet-protokd evidence --report-only` in its evidence folder to pool the seeds "
                        f"again")
    evidence = evidence_from_raw(stored["raw"], stored["settings"], stored["phantom_audit"], stored.get("reference"))
    return write_evidence_report(evidence, output_folder)


def reference_figures(evidence: dict) -> dict:
    """What the headline quotes of an earlier evidence.json (the committed run, for the demo): its seeds and each
    comparison's mean-Dice figures. Kept inside our evidence.json, so that it stays the report's only input."""
    rivals = evidence.get("comparisons_with_modality_dropout") or {}
    return {"settings": {"seeds": evidence["settings"]["seeds"]},
            "comparisons": {key: {"mean": per_region["mean"]} for key, per_region in evidence["comparisons"].items()},
            "comparisons_with_modality_dropout": {key: {"mean": per_region["mean"]}
                                                  for key, per_region in rivals.items()},
            "knowledge": {modality: {"mean": per_region["mean"]}
                          for modality, per_region in (evidence.get("knowledge") or {}).items()}}


def pooled_dice(scores: dict, regions) -> dict:
    """{key: {(seed, case): {region: Dice, "mean": mean over regions}}} from every seed's per-case scores
    ({seed: {key: {case: {region: {"dice", ...}}}}})."""
    pooled = {}
    for seed, per_key in scores.items():
        for key, per_case in per_key.items():
            for case, metrics in per_case.items():
                values = {region: metrics[region]["dice"] for region in regions}
                pooled.setdefault(key, {})[(seed, case)] = {**values, "mean": float(np.mean(list(values.values())))}
    return pooled


def summarise_dice(dice: dict, regions) -> dict:
    """{key: {region or "mean": {"mean", "std", "n"}}} over (seed, case) pairs, and per seed."""
    summary = {}
    for key, per_pair in dice.items():
        summary[key] = {}
        for region in list(regions) + ["mean"]:
            values = np.array([v[region] for v in per_pair.values()])
            by_seed = {}
            for (seed, _), v in per_pair.items():
                by_seed.setdefault(seed, []).append(v[region])
            summary[key][region] = {"mean": float(values.mean()), "std": float(values.std()), "n": int(len(values)),
                                    "per_seed": {str(seed): float(np.mean(v)) for seed, v in by_seed.items()}}
    return summary


def compare_with_baseline(dice: dict, regions, reference_of=baseline_of) -> dict:
    """{student key: {region or "mean": replicate_comparison over the (seed, case) pairs it and its baseline
    have}}: the seed is the trained model, the unit of the seed-level test."""
    comparisons = {}
    for key, per_pair in dice.items():
        reference = reference_of(dice, key)
        if reference is None:
            continue
        comparisons[key] = {region: replicate_comparison({p: v[region] for p, v in per_pair.items()},
                                                         {p: v[region] for p, v in reference.items()})
                            for region in list(regions) + ["mean"]}
    return comparisons


def compare_with_control(dice: dict, regions) -> dict:
    """As compare_with_baseline, against each model's control (methods.CONTROLS) where it was trained."""
    return compare_with_baseline(dice, regions, reference_of=control_of)


def compare_with_modality_dropout(dice: dict, regions) -> dict:
    """As compare_with_baseline, each distilled student minus the modality-dropout model predicting from the same
    modality (ModelKey.modality_dropout) where it was trained: is distillation worth its teacher over the arm a
    practitioner would train instead? Both are trained on each seed, so the seed is the unit here too."""
    return compare_with_baseline(dice, regions, reference_of=modality_dropout_of)


def compare_teacher_with_baselines(dice: dict, regions) -> dict:
    """Is there knowledge to transfer? {modality: {region or "mean": replicate_comparison of the teacher minus that
    modality's unimodal baseline}} over the (seed, case) pairs both have. A student can only learn from its teacher
    what the teacher knows beyond the baseline: where the teacher is not better (`verdict`), the students of that
    modality get no verdict for that region (`student_verdict`)."""
    teacher = dice.get(TEACHER.name)
    knowledge = {}
    if teacher is None:
        return knowledge
    for key, per_pair in _ordered(dice):
        model = ModelKey.parse(key)
        if model.method == BASELINE.name and model.modality:
            knowledge[model.modality] = {
                region: replicate_comparison({p: v[region] for p, v in teacher.items()},
                                             {p: v[region] for p, v in per_pair.items()})
                for region in list(regions) + ["mean"]}
    return knowledge


def student_verdict(knowledge: dict, key: str, region: str, comparison: dict) -> Verdict:
    """The one verdict of the evidence's comparisons (headline, tables, forest plot, the demo's sentence) of model
    `key` on `region`: for a model that distils (ModelKey.distils), `distillation_verdict` against the teacher minus
    the baseline of its modality and region (`knowledge`, compare_teacher_with_baselines), so that a region where
    the teacher is not better gets "no knowledge to transfer at this budget"; for any other (the control, modality
    dropout, LCKD: they learn from no teacher), `verdict`."""
    model = ModelKey.parse(key)
    if not model.distils:
        return verdict(comparison)
    return distillation_verdict(comparison, (knowledge or {}).get(model.modality, {}).get(region))


def adjust_per_modality(families: list) -> None:
    """Adds "holm_p" beside each comparison's seed-level p: Holm's adjustment over one modality's comparisons of one
    region (against the baseline, the control and modality dropout together), the family a reader scans for that
    modality."""
    grouped = {}
    for family_index, comparisons in enumerate(families):
        for key, per_region in comparisons.items():
            for region, c in per_region.items():
                grouped.setdefault((ModelKey.parse(key).modality, region), {})[(family_index, key)] = c
    for members in grouped.values():
        adjusted = holm_adjust({name: c["seed_level"]["p"] for name, c in members.items()})
        for name, c in members.items():
            c["holm_p"] = adjusted[name]


def bernoulli_kl(teacher: np.ndarray, student: np.ndarray) -> np.ndarray:
    """Voxel-wise KL(teacher || student) of per-region sigmoid probabilities (or per-label softmax ones summed by
    the caller), after clipping both to [PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR]."""
    t = np.clip(teacher.astype(np.float64), PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
    s = np.clip(student.astype(np.float64), PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
    return t * np.log(t / s) + (1 - t) * np.log((1 - t) / (1 - s))


def mean_entropy(probabilities: np.ndarray, region_based: bool) -> np.ndarray:
    """Voxel-wise entropy (nats) of a prediction: the binary entropy averaged over regions (sigmoid outputs) or
    the categorical entropy over labels (softmax outputs). probabilities: (C, *S) -> (*S)."""
    p = np.clip(probabilities.astype(np.float64), PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
    if region_based:
        return (-(p * np.log(p) + (1 - p) * np.log(1 - p))).mean(axis=0)
    return -(p * np.log(p)).sum(axis=0)


def teacher_agreement(experiment: Experiment, regions, fold=0) -> dict:
    """{key: {case: measures}} on the held-out cases (in cross-validation: `fold`'s validation cases), from the saved
    segmentations and probabilities. Students:
    "dice", the mean over regions of Dice(student, teacher), and "kl", the mean KL(teacher || student) over brain
    voxels. Every model, the teacher too (calibration, for the diagnosis): "entropy", the mean entropy of its
    probabilities over the reference tumour's voxels, and "volume_ratio": {region: predicted / reference volume}."""
    reader, ending = SimpleITKIO(), experiment.dataset_json["file_ending"]
    region_labels = evaluation_regions(experiment.dataset_json)
    region_based = "regions_class_order" in experiment.dataset_json
    # a variant trained on only some seeds (a diagnosis added later) has no predictions in the others
    # each fold's own folder: predictions/all_folds links the segmentations of every fold, not their probabilities
    sets = [replace(p, folder=experiment.prediction_folder(p.method, p.modality, fold))
            for p in experiment.prediction_sets() if MODALITY_SEPARATOR not in (p.modality or "")]
    sets = [p for p in sets if os.path.isdir(p.folder)]
    teacher = next(p for p in sets if p.method == TEACHER.name)
    brain_folder, reference_folder = experiment.input_folder(None, fold), experiment.ground_truth_folder()
    agreement = {}
    for case in experiment.evaluation_cases(fold):
        brain = reader.read_images([os.path.join(brain_folder, f"{case}_0000{ending}")])[0][0] != 0
        reference = reader.read_seg(os.path.join(reference_folder, case + ending))[0][0]
        teacher_seg = reader.read_seg(os.path.join(teacher.folder, case + ending))[0][0]
        teacher_probabilities = np.load(os.path.join(teacher.folder, case + ".npz"))["probabilities"]
        for prediction_set in sets:
            seg = reader.read_seg(os.path.join(prediction_set.folder, case + ending))[0][0]
            probabilities = np.load(os.path.join(prediction_set.folder, case + ".npz"))["probabilities"]
            tumour = reference > 0
            measures = {"entropy": float(mean_entropy(probabilities, region_based)[tumour].mean())
                        if tumour.any() else 0.0, "volume_ratio": {}}
            dices = []
            for (name, labels), region in zip(region_labels, regions):
                reference_mask, mask = region_or_label_to_mask(reference, labels), region_or_label_to_mask(seg, labels)
                # +1 voxel each: a region absent from the reference does not divide by zero
                measures["volume_ratio"][region] = float((mask.sum() + 1) / (reference_mask.sum() + 1))
                a = region_or_label_to_mask(teacher_seg, labels)
                total = a.sum() + mask.sum()
                dices.append(1.0 if total == 0 else 2 * float((a & mask).sum()) / float(total))
            if prediction_set.method != TEACHER.name:
                if region_based:
                    kl = bernoulli_kl(teacher_probabilities, probabilities).sum(axis=0)
                else:  # softmax over labels: the categorical KL
                    t = np.clip(teacher_probabilities.astype(np.float64), PROBABILITY_FLOOR, 1)
                    q = np.clip(probabilities.astype(np.float64), PROBABILITY_FLOOR, 1)
                    kl = (t * np.log(t / q)).sum(axis=0)
                measures.update(dice=float(np.mean(dices)), kl=float(kl[brain].mean()))
            agreement.setdefault(prediction_set.key, {})[case] = measures
    return agreement


def summarise_agreement(agreement: dict) -> dict:
    """Per model: mean entropy and median volume ratios over (seed, case); per student also the mean Dice to the
    teacher and mean KL, and their paired difference to the baseline's (a distilling student should agree more:
    higher Dice, lower KL)."""
    pooled = {}
    for seed, per_key in agreement.items():
        for key, per_case in per_key.items():
            for case, values in per_case.items():
                pooled.setdefault(key, {})[(seed, case)] = values
    summary = {}
    for key, per_pair in pooled.items():
        values = list(per_pair.values())
        entry = {"entropy": float(np.mean([v["entropy"] for v in values])),
                 "volume_ratio": {region: float(np.median([v["volume_ratio"][region] for v in values]))
                                  for region in values[0]["volume_ratio"]}}
        if key != TEACHER.name:
            entry.update({measure: float(np.mean([v[measure] for v in values])) for measure in ("dice", "kl")})
        baseline = baseline_of(pooled, key)
        if baseline is not None:
            for measure in ("dice", "kl"):
                entry[f"{measure}_vs_baseline"] = replicate_comparison({p: v[measure] for p, v in per_pair.items()},
                                                                       {p: v[measure] for p, v in baseline.items()})
        summary[key] = entry
    return summary


def training_curves(experiment: Experiment, fold=0) -> dict:
    """{key: {"iterations": [...], "pseudo_dice": [...], "grad_norms": {term: [...]}}} from each model's
    checkpoint_final.pth of `fold` (nnU-Net's logger: mean_fg_dice is the epoch's pseudo Dice on validation patches)."""
    curves = {}
    # a model on every channel (modality dropout, LCKD) is trained once: its curve is that of all channels
    models = [(TEACHER.name, None)] + [(method, None) for method in every_channel_methods()
                                       if method in experiment.settings.methods] + experiment.students()
    for method, modality in models:
        trainer = method_trainer(method)
        configuration = experiment.schedule_configuration if modality is None else \
            experiment.student_configuration(modality, method)
        checkpoint_file = experiment.final_checkpoint(trainer, configuration, fold)
        if not os.path.isfile(checkpoint_file):  # a variant not trained on this seed
            continue
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
        logging = checkpoint["logging"]
        iterations = checkpoint["init_args"].get("num_iterations_per_epoch") or \
            experiment.settings.iterations_per_epoch or 250
        epochs = len(logging["mean_fg_dice"])
        curves[ModelKey(method, modality).text] = {
            "iterations": [(epoch + 1) * iterations for epoch in range(epochs)],
            "pseudo_dice": [float(v) for v in logging["mean_fg_dice"]],
            "grad_norms": {name[len("grad_norm_"):]: [float(v) for v in values]
                           for name, values in logging.items() if name.startswith("grad_norm_") and values}}
    return curves


def pool_curves(curves: dict) -> dict:
    """{key: {"iterations", "mean", "low", "high"}}: pseudo Dice per epoch, mean and range over seeds."""
    pooled = {}
    for per_key in curves.values():
        for key, curve in per_key.items():
            pooled.setdefault(key, []).append(curve)
    result = {}
    for key, seeds in pooled.items():
        length = min(len(c["pseudo_dice"]) for c in seeds)
        values = np.array([c["pseudo_dice"][:length] for c in seeds])
        result[key] = {"iterations": seeds[0]["iterations"][:length], "mean": values.mean(0).tolist(),
                       "low": values.min(0).tolist(), "high": values.max(0).tolist()}
    return result


def _keys(curves: dict) -> list:
    """Every model of any seed, in the order they first appear."""
    return list(dict.fromkeys(key for per_key in curves.values() for key in per_key))


def plateau_status(change: float) -> str:
    """"reached" when the pseudo Dice moved by less than PLATEAU_TOLERANCE over the last fifth of training, else
    "still rising" or "falling"."""
    if abs(change) < PLATEAU_TOLERANCE:
        return "reached"
    return "still rising" if change > 0 else "falling"


def plateaus(curves: dict, fraction: float = 0.2) -> dict:
    """Per model: mean pseudo Dice over the last `fraction` of the epochs, its change from the `fraction` before
    (mean over seeds) and whether that is a plateau (`plateau_status`)."""
    result = {}
    for key in _keys(curves):
        last, change = [], []
        for per_key in (c for c in curves.values() if key in c):
            values = np.array(per_key[key]["pseudo_dice"])
            window = max(1, int(round(fraction * len(values))))
            last.append(values[-window:].mean())
            change.append(values[-window:].mean() - values[-2 * window:-window].mean())
        result[key] = {"last_fifth_pseudo_dice": float(np.mean(last)), "change_over_last_fifth": float(np.mean(change)),
                       "status": plateau_status(float(np.mean(change)))}
    return result


def gradient_shares(curves: dict) -> dict:
    """Per distilling student: each term's share of the summed gradient norms at the student's parameters, in the
    first and the last epoch (mean over seeds)."""
    result = {}
    for key in _keys(curves):
        per_seed = [per_key[key]["grad_norms"] for per_key in curves.values() if key in per_key]
        if len(per_seed[0]) < 2:
            continue
        shares = {}
        for when, index in (("first_epoch", 0), ("last_epoch", -1)):
            totals = [sum(norms[t][index] for t in norms) or 1.0 for norms in per_seed]
            shares[when] = {term: float(np.mean([norms[term][index] / total for norms, total in zip(per_seed, totals)]))
                            for term in per_seed[0]}
        result[key] = shares
    return result


def _title(key: str) -> str:
    method, modality = ModelKey.parse(key)
    return title(method) + (f" ({modality})" if modality else "")


def headline(evidence: dict, reference: dict | None = None) -> str:
    """First whether there is knowledge to transfer (`knowledge_sentence`), then one line ("- ...", a Markdown
    list item) per method and modality against the unimodal baseline: `student_verdict`'s answer on mean Dice (or
    why there is none), the seed-level figures and the smallest difference the seeds could detect, and for a
    distilled student the same against modality dropout where it was trained; with one seed, "untested" and the
    case-level figures, marked as a description.
    With `reference` (reference_figures of an earlier run) its figures for the same comparison beside ours."""
    knowledge = evidence.get("knowledge") or {}
    sentences = [knowledge_sentence(knowledge) + "."] if knowledge else []
    for key, per_region in evidence["comparisons"].items():
        if ModelKey.parse(key).is_variant:
            continue
        c = per_region["mean"]
        sentence = f"{_title(key)}: {_stated(student_verdict(knowledge, key, 'mean', c), 'the unimodal baseline')}, " \
                   f"mean Dice {_figures(c)}"
        earlier = (reference or {}).get("comparisons", {}).get(key, {}).get("mean")
        if earlier is not None:
            sentence += (f" (the evidence run, seeds {', '.join(map(str, reference['settings']['seeds']))}: "
                         f"{_earlier_figures(earlier, key, reference.get('knowledge'))})")
        rival = (evidence.get("comparisons_with_modality_dropout") or {}).get(key, {}).get("mean")
        if rival is not None:
            decision = student_verdict(knowledge, key, "mean", rival)
            stated = _stated(decision, "modality dropout") if decision.knowledge else \
                "no verdict against modality dropout either"
            sentence += f"; {stated}, mean Dice {_figures(rival)}"
            earlier = (reference or {}).get("comparisons_with_modality_dropout", {}).get(key, {}).get("mean")
            if earlier is not None:
                sentence += (f" (the evidence run: {_earlier_figures(earlier, key, reference.get('knowledge'))})")
        sentences.append(f"- {sentence}.")
    return "\n".join(sentences)


def _stated(decision: Verdict, against: str) -> str:
    """'better than X', 'no significant difference at this budget (why) from X' or 'no knowledge to transfer at
    this budget (why), so no verdict against X'."""
    if decision.direction:
        return f"{decision.direction} than {against}"
    if not decision.tested:
        return f"{UNTESTED} against {against} ({decision.why})"
    if not decision.knowledge:
        return f"{decision.text}, so no verdict against {against}"
    return f"{decision.text} from {against}"


def _region_name(region: str) -> str:
    return "mean Dice" if region == "mean" else region


def knowledge_sentence(knowledge: dict) -> str:
    """Per modality: the regions where the teacher is better than the unimodal baseline (`verdict`, seed level)
    and those where it is not, whose student verdicts are "no knowledge to transfer at this budget"; with one
    trained model each, the teacher's case-level lead, untested."""
    parts = []
    for modality, per_region in knowledge.items():
        if per_region["mean"]["replicates"] < 2:
            parts.append(f"{modality}: untested with one trained model each (the teacher minus the baseline, "
                         f"descriptive: " + ", ".join(f"{_region_name(r)} {c['mean_difference']:+.3f}"
                                                     for r, c in per_region.items()) + ")")
            continue
        better = [r for r, c in per_region.items() if verdict(c).direction == "better"]
        lacking = [r for r in per_region if r not in better]
        text = f"{modality}: the teacher is better than the baseline on {', '.join(map(_region_name, better))}"
        if lacking:
            figures = "; ".join(f"{_region_name(r)} {_ci(per_region[r])}, seed-level p = "
                                f"{format_p(per_region[r]['seed_level']['p'])}" for r in lacking)
            text = (f"{text}, not on {', '.join(map(_region_name, lacking))}" if better else
                    f"{modality}: the teacher is not better than the baseline on any region or the mean")
            text += f" ({figures}): {NO_KNOWLEDGE} there, and no verdict for its distilled students"
        parts.append(text)
    return "Is there knowledge to transfer? " + "; ".join(parts)


def _figures(c: dict) -> str:
    """A comparison's figures in a sentence: seed-level with several trained models, case-level (descriptive) with
    one."""
    if c["replicates"] < 2:
        case = c["case_level"]
        return (f"{c['mean_difference']:+.3f} [95 % CI over its {c['n']} cases {case['ci95'][0]:+.3f}, "
                f"{case['ci95'][1]:+.3f}], Wilcoxon p = {format_p(case['wilcoxon_p'])} (descriptive: the cases share "
                f"one trained model)")
    level = c["seed_level"]
    holm = f" (Holm {format_p(c['holm_p'])})" if "holm_p" in c else ""
    detectable = level["detectable_difference"]
    return (f"{_ci(c)}, seed-level p = {format_p(level['p'])}{holm} over {c['replicates']} trained models "
            f"(per seed {_per_seed(c)})"
            + (f", smallest detectable difference {detectable:.3f}" if detectable is not None else ""))


def _earlier_figures(c: dict, key: str, knowledge: dict | None) -> str:
    """An earlier run's mean-Dice comparison of `key`, whichever report wrote it: one that predates the seed-level
    statistics kept only its per-seed means, from which the seed-level test is recomputed here; one that predates
    the knowledge check has no `knowledge`, and its verdict is the student's own."""
    if "seed_level" in c:
        return f"{student_verdict(knowledge, key, 'mean', c).word}, {_figures(c)}"
    level = seed_level_test(c["per_seed"].values())
    return (f"{c['mean_difference']:+.3f}, seed-level p = {format_p(level['p'])} over {level['replicates']} trained "
            f"models (per seed {', '.join(f'{d:+.3f}' for d in c['per_seed'].values())})")


def _per_seed(c: dict) -> str:
    return ", ".join(f"{d:+.3f}" for d in c["per_replicate"].values())


def _ci(c: dict) -> str:
    """Mean difference [hierarchical bootstrap 95 % CI]."""
    return f"{c['mean_difference']:+.3f} [{c['hierarchical_ci95'][0]:+.3f}, {c['hierarchical_ci95'][1]:+.3f}]"


def _ci_and_p(c: dict) -> str:
    """A paired difference in a table cell: mean [hierarchical 95 % CI] (seed-level p)."""
    return f"{_ci(c)} ({format_p(c['seed_level']['p'])})"


def _wall_times(settings: dict) -> str:
    """'; wall time 81 min, then 34 min (adding Modality dropout, v:T1, w:T1ce)': each invocation that trained this
    folder."""
    runs = settings.get("runs") or []
    if not runs:
        return ""
    parts = [f"{runs[0]['wall_time_seconds'] / 60:.0f} min"]
    for before, run in zip(runs, runs[1:]):
        # a run recorded before methods were (the committed one) trained the default methods
        methods_before = before.get("methods", DEFAULT_METHODS)
        added = [title(m) for m in run.get("methods", DEFAULT_METHODS) if m not in methods_before]
        added += [f"{v}:{m}" for v, m in run["variants"] if [v, m] not in [list(x) for x in before["variants"]]]
        parts.append(f"{run['wall_time_seconds'] / 60:.0f} min" + (f" (adding {', '.join(added)})" if added else ""))
    return "; wall time " + ", then ".join(parts)


def write_evidence_markdown(evidence: dict, path: str) -> None:
    regions, settings = evidence["regions"], evidence["settings"]
    seeds = ", ".join(map(str, settings["seeds"]))
    teacher = evidence["dice"].get(TEACHER.name) or next(iter(evidence["dice"].values()))
    if settings.get("folds"):  # each (seed, fold) model predicts the validation cases of its fold
        seeds += f" x folds {', '.join(map(str, settings['folds']))}"
        where = f"dataset {settings['dataset']}" if settings.get("dataset") else "the training phantoms"
        data = (f"(trainers; each (seed, fold) model is a replicate, and \"seed\" below reads \"(seed, fold) "
                f"model\"); {teacher['mean']['n'] // max(1, len(settings['seeds']))} cross-validation cases of "
                f"{where}, each predicted by its fold's model")
    elif settings.get("dataset"):  # the test set's cases, which every model of every seed predicts
        data = (f"(trainers); {teacher['mean']['n'] // max(1, len(settings['seeds']))} held-out test cases of "
                f"dataset {settings['dataset']}")
    else:
        held_out = settings["held_out_cases"]
        data = f"(phantoms and trainers); {held_out['num_hgg'] + held_out['num_lgg']} held-out phantoms per seed"
    schedule = ("nnU-Net's default" if not settings["epochs"] else
                f"{settings['epochs']} epochs x {settings['iterations_per_epoch']} iterations")
    lines = ["# Evidence: what distillation does for an nnU-Net student", "",
             f"Seeds {seeds} {data}, never seen in training; "
             f"configuration {settings['configuration']}, {schedule} for every model, teacher included; device "
             f"{settings['device']}" + _wall_times(settings) + ".", "",
             "**Result.** " + evidence["headline"], "",
             *headline_table(evidence), "",
             *knowledge_section(evidence), "",
             "## Dice on the held-out cases (mean ± std over (seed, case) pairs; per-seed means in evidence.json)", "",
             "| Modality | Method | " + " | ".join(regions) + " | Mean |", "|---|---|" + "---|" * (len(regions) + 1)]
    for key, per_region in _ordered(evidence["dice"]):
        method, modality = ModelKey.parse(key)
        lines.append(f"| {modality or 'all'} | {title(method)} | " + " | ".join(
            f"{per_region[r]['mean']:.3f} ± {per_region[r]['std']:.3f}" for r in list(regions) + ["mean"]) + " |")
    lines += ["", "## Paired difference to the unimodal baseline, the trained model as the unit (Dice)", "",
              "Each seed trains its own models, so a method's replicates are its seeds, not the cases one model "
              "predicts. Per cell: the mean difference [hierarchical bootstrap 95 % CI: seeds resampled, then cases "
              "within each] (seed-level p: one-sample t-test of the per-seed mean differences, df = seeds - 1). "
              "Holm: the seed-level p adjusted over the modality's comparisons of that region (against the baseline, "
              "the control and modality dropout together). Smallest detectable: the difference the seeds would "
              "detect with 80 % power at alpha 0.05, from the spread between seeds (a null rules out effects of "
              "about this size, not smaller ones). Verdict (mean Dice; a region's beside its cell when there is "
              "one): better or worse only with seed-level p < 0.05, the hierarchical CI excluding 0, and the mean, "
              "the median case difference and all seeds but at most one pointing the same way; for a distilled "
              "student, only where the teacher is better than the baseline (above), otherwise no knowledge to "
              "transfer.", "",
              *_comparison_table(evidence, "comparisons")]
    if evidence.get("comparisons_with_control"):
        lines += ["", "## Paired difference to the control (ProtoKDTrainer with both distillation terms at weight 0; "
                      "Dice, as above)", "", *_comparison_table(evidence, "comparisons_with_control")]
    if evidence.get("comparisons_with_modality_dropout"):
        lines += ["", "## Paired difference to modality dropout (each distilled student minus one nnU-Net trained "
                      "on every channel with random channels zeroed, predicting from the student's modality through "
                      "its sliced first convolution; trained once per seed; Dice, as above)", "",
                  *_comparison_table(evidence, "comparisons_with_modality_dropout")]
    lines += ["", "## Case-level figures (descriptive: the cases of one seed share a trained model, so these "
                  "p-values count them as independent and decide nothing)", "",
              "| Modality | Method | Against | n | Mean [bootstrap 95 % CI over pairs] | Wilcoxon p | Paired t p | "
              "Random-intercept p (cross-check) |", "|---|---|---|---|---|---|---|---|"]
    for against, comparisons in (("baseline", evidence["comparisons"]),
                                 ("control", evidence.get("comparisons_with_control") or {}),
                                 ("modality dropout", evidence.get("comparisons_with_modality_dropout") or {})):
        for key, per_region in _ordered(comparisons):
            method, modality = ModelKey.parse(key)
            c = per_region["mean"]
            case, mixed = c["case_level"], c["mixed_model"]
            lines.append(f"| {modality} | {title(method)} | {against} | {c['n']} | {c['mean_difference']:+.3f} "
                         f"[{case['ci95'][0]:+.3f}, {case['ci95'][1]:+.3f}] | {format_p(case['wilcoxon_p'])} | "
                         f"{format_p(case['ttest_p'])} | {format_p(mixed['p']) if mixed else 'n/a'} |")
    lines += ["", "## Knowledge transfer: agreement with the teacher on the held-out cases", "",
              "Dice between the student's and the teacher's segmentations (mean over regions) and the mean "
              "KL(teacher || student) of their region probabilities over brain voxels; the differences are paired "
              "against the unimodal baseline of the same modality (a student that distils agrees more: Dice up, "
              "KL down), as mean [hierarchical 95 % CI] (seed-level p).", "",
              "| Modality | Method | Dice to teacher | vs baseline (p) | KL to teacher | vs baseline (p) |",
              "|---|---|---|---|---|---|"]
    for key, entry in _ordered(evidence["teacher_agreement"]):
        method, modality = ModelKey.parse(key)
        if method == TEACHER.name:
            continue
        dice_change, kl_change = (_ci_and_p(entry[name]) if name in entry else "-"
                                  for name in ("dice_vs_baseline", "kl_vs_baseline"))
        lines.append(f"| {modality} | {title(method)} | {entry['dice']:.3f} | {dice_change} | "
                     f"{entry['kl']:.4f} | {kl_change} |")
    lines += ["", "## Calibration: how sure each model is, and how much it segments", "",
              "Mean entropy (nats) of the region probabilities over the reference tumour's voxels (higher: less "
              "certain), and the median over cases of predicted / reference volume per region (1: as much as the "
              "annotation; > 1: over-segmentation).", "",
              "| Modality | Method | Entropy in tumour | " + " | ".join(f"{r} volume ratio" for r in regions) + " |",
              "|---|---|---|" + "---|" * len(regions)]
    for key, entry in _ordered(evidence["teacher_agreement"]):
        method, modality = ModelKey.parse(key)
        lines.append(f"| {modality or 'all'} | {title(method)} | {entry['entropy']:.3f} | "
                     + " | ".join(f"{entry['volume_ratio'][r]:.2f}" for r in regions) + " |")
    lines += ["", "## Convergence: pseudo Dice (nnU-Net's, per epoch) over the last fifth of training and its change "
                  "from the fifth before (mean over seeds)", "",
              f"Plateau reached: a change below {PLATEAU_TOLERANCE} in absolute value. A model on every channel "
              "(the teacher, modality dropout) is validated with every channel.", "",
              "| Model | Pseudo Dice, last fifth | Change | Plateau |", "|---|---|---|---|"]
    for key, entry in _ordered(evidence["plateau"]):
        lines.append(f"| {_title(key)} | {entry['last_fifth_pseudo_dice']:.3f} | "
                     f"{entry['change_over_last_fifth']:+.3f} | {_plateau(entry)} |")
    lines += ["", "![learning curves](learning_curves.png)", "", "![paired differences](paired_differences.png)", "",
              "## Loss balance: each term's share of the gradient norm at the student's parameters", "",
              "| Student | First epoch | Last epoch |", "|---|---|---|"]
    for key, shares in _ordered(evidence["gradient_shares"]):
        lines.append(f"| {_title(key)} | " + " | ".join(
            ", ".join(f"{term} {share:.0%}" for term, share in shares[when].items())
            for when in ("first_epoch", "last_epoch")) + " |")
    audit = evidence["phantom_audit"]
    if audit is None:  # a user's dataset
        with open(path, "w") as f:
            f.write("\n".join(lines + [""]) + "\n")
        return
    lines += ["", f"## Phantom realism audit ({audit['cases']} high-grade cases of seed {audit['seed']}; "
                  f"phantoms.py gives the MRI facts)", "", "Contrast-to-noise ratio of each region boundary:", "",
              "| Boundary | " + " | ".join(next(iter(audit["cnr"].values()))) + " |",
              "|---|" + "---|" * len(next(iter(audit["cnr"].values())))]
    for boundary, per_modality in audit["cnr"].items():
        lines.append(f"| {boundary} | " + " | ".join(f"{v:.2f}" for v in per_modality.values()) + " |")
    lines += ["", "Agreement of two independent annotations of one phantom (Dice): " + ", ".join(
        f"{region} {value:.2f}" for region, value in audit["inter_rater_dice"].items()) + ".", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def headline_table(evidence: dict) -> list:
    """Markdown lines: per model, mean Dice (mean of the regions), its paired difference to the baseline with the
    seed-level figures and `student_verdict`'s answer, a distilled student's difference to modality dropout with
    its verdict, and the agreement with the teacher (KL change against the baseline's: negative = moved towards the
    teacher)."""
    knowledge = evidence.get("knowledge") or {}
    rivals = evidence.get("comparisons_with_modality_dropout") or {}
    lines = ["| Modality | Method | n | Mean Dice | vs baseline [hierarchical 95 % CI] | seed-level p (Holm) | "
             "per seed | smallest detectable | verdict |"
             + (" vs modality dropout [95 % CI] (p): verdict |" if rivals else "")
             + " KL to teacher | vs baseline [95 % CI] (p) |", "|---|---|---|---|---|---|---|---|---|---|---|"
             + ("---|" if rivals else "")]
    for key, per_region in _ordered(evidence["dice"]):
        method, modality = ModelKey.parse(key)
        comparison = evidence["comparisons"].get(key, {}).get("mean")
        agreement = evidence["teacher_agreement"].get(key, {})
        cells = [modality or "all", title(method), str(per_region["mean"]["n"]),
                 f"{per_region['mean']['mean']:.3f}"]
        cells += _seed_level_cells(comparison, student_verdict(knowledge, key, "mean", comparison)) \
            if comparison else ["-"] * 5
        if rivals:
            rival = rivals.get(key, {}).get("mean")
            cells.append(f"{_ci_and_p(rival)}: {student_verdict(knowledge, key, 'mean', rival).word}"
                         if rival else "-")
        cells += [f"{agreement['kl']:.3f}" if "kl" in agreement else "-",
                  _ci_and_p(agreement["kl_vs_baseline"]) if "kl_vs_baseline" in agreement else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def knowledge_section(evidence: dict) -> list:
    """Markdown lines: per modality and region, the teacher minus the unimodal baseline with the seed-level
    figures and whether the teacher is better (`verdict`), and whether the teacher and the baseline reached their
    plateau."""
    knowledge, regions = evidence.get("knowledge") or {}, evidence["regions"]
    if not knowledge:
        return []
    plateau = evidence.get("plateau") or {}
    lines = ["## Is there knowledge to transfer? The teacher against the unimodal baseline", "",
             "Distillation can only pass on what the teacher knows beyond the baseline. Per modality and region: the "
             "teacher (every channel) minus the unimodal baseline (that channel), mean [hierarchical 95 % CI] "
             "(seed-level p), judged by the same rule as the students. Where the teacher is not better, the "
             f"distilled students of that modality get \"{NO_KNOWLEDGE}\" there instead of a verdict; the "
             "plateau columns say whether a longer schedule could change that.", "",
             "| Modality | " + " | ".join(regions) + " | Mean | Teacher's plateau | Baseline's plateau |",
             "|---|" + "---|" * (len(regions) + 3)]
    for modality, per_region in knowledge.items():
        cells = []
        for region in list(regions) + ["mean"]:
            c = per_region[region]
            decision = verdict(c)
            answer = UNTESTED if not decision.tested else \
                ("teacher better" if decision.direction == "better" else NO_KNOWLEDGE)
            cells.append(f"{_ci(c)} (p {format_p(c['seed_level']['p'])}): {answer}")
        cells += [_plateau(plateau.get(TEACHER.name)), _plateau(plateau.get(ModelKey(BASELINE.name, modality).text))]
        lines.append(f"| {modality} | " + " | ".join(cells) + " |")
    return lines


def _plateau(entry: dict | None) -> str:
    return "-" if entry is None else f"{entry['status']} ({entry['change_over_last_fifth']:+.3f})"


def _seed_level_cells(c: dict, decision: Verdict) -> list:
    """[mean [CI], seed-level p (Holm), per seed, smallest detectable difference, verdict] of one comparison."""
    detectable = c["seed_level"]["detectable_difference"]
    return [_ci(c), f"{format_p(c['seed_level']['p'])} ({format_p(c.get('holm_p'))})", _per_seed(c),
            f"{detectable:.3f}" if detectable is not None else "n/a", decision.word]


def _comparison_table(evidence: dict, name: str) -> list:
    """Markdown lines: per model of evidence[name], each region's and the mean's difference with the seed-level
    figures; a region's verdict beside its cell where there is one (better, worse, no knowledge to transfer)."""
    regions, knowledge = evidence["regions"], evidence.get("knowledge") or {}
    lines = ["| Modality | Method | seeds | n | " + " | ".join(regions) + " | Mean | seed-level p (Holm) | per seed | "
             "smallest detectable | verdict |", "|---|---|---|---|" + "---|" * (len(regions) + 5)]
    for key, per_region in _ordered(evidence[name]):
        method, modality = ModelKey.parse(key)
        cells = []
        for region in regions:
            c, decision = per_region[region], student_verdict(knowledge, key, region, per_region[region])
            marked = decision.direction or (None if decision.knowledge else "no knowledge to transfer")
            cells.append(f"{_ci(c)} (p {format_p(c['seed_level']['p'])})" + (f": {marked}" if marked else ""))
        mean = per_region["mean"]
        lines.append(f"| {modality} | {title(method)} | {mean['replicates']} | {mean['n']} | " + " | ".join(cells)
                     + " | " + " | ".join(_seed_level_cells(mean, student_verdict(knowledge, key, "mean", mean)))
                     + " |")
    return lines


def forest_rows(evidence: dict) -> list:
    """The forest plot's rows, in report order: (label, {region: comparison}, {region: student_verdict}) of each
    model against its baseline, each distilled student followed by its row against modality dropout."""
    knowledge = evidence.get("knowledge") or {}
    rivals = evidence.get("comparisons_with_modality_dropout") or {}
    rows = []
    for key, per_region in _ordered(evidence["comparisons"]):
        for label, comparisons in ((_title(key), per_region),
                                   (f"{_title(key)} - {MODALITY_DROPOUT.title.lower()}", rivals.get(key))):
            if comparisons:
                rows.append((label, comparisons, {region: student_verdict(knowledge, key, region, c)
                                                  for region, c in comparisons.items()}))
    return rows


def _ordered(mapping: dict) -> list:
    """Teacher first, then per modality the baseline, each method and its variants (ModelKey.sort_key)."""
    return sorted(mapping.items(), key=lambda item: ModelKey.parse(item[0]).sort_key())
