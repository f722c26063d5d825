"""What each `nnunet-protokd` command does with its parsed arguments (cli.py parses them): one function per
command, each a call into the stage that does the work."""
from __future__ import annotations

import json
import os

import nnunetv2.paths as nnunet_paths  # read at call time: tests and commands set them late
import torch

from nnunet_protokd import trainer_path
from nnunet_protokd.channels import ChannelSubset
from nnunet_protokd.data.phantoms import generate_brats_phantoms
from nnunet_protokd.deploy.export import export_student
from nnunet_protokd.deploy.prediction import check_and_predict
from nnunet_protokd.errors import ConfigurationError
from nnunet_protokd.evaluation.report import DATASET_DEFAULT, PredictionSet, build_report
from nnunet_protokd.io import read_json, write_json_atomically
from nnunet_protokd.lckd.subsets import every_channel_subset, subset_configuration_name, write_subset_model_folder
from nnunet_protokd.methods import ModelKey
from nnunet_protokd.plans import add_configuration, dataset_name, load_preprocessed, preprocessed_files
from nnunet_protokd.protocol.benchmark import format_table, run_benchmark
from nnunet_protokd.protocol.demo import run_demo
from nnunet_protokd.protocol.evidence import (
    CPU_SCHEDULE,
    EVIDENCE_METHODS,
    EVIDENCE_SEEDS,
    FULL_SCHEDULE,
    Evidence,
    EvidenceSettings,
    report_from_evidence,
    requested_variants,
)
from nnunet_protokd.protocol.experiment import Experiment, ExperimentSettings
from nnunet_protokd.protocol.workflow import write_workflow
from nnunet_protokd.settings import SCHEDULE_FLAGS, parse_setting_assignments
from nnunet_protokd.training.teacher import locate_teacher


def add_config(args) -> int:
    plans_file, dataset_json_file = preprocessed_files(args.dataset, args.plans)
    with open(dataset_json_file) as f:
        dataset_json = json.load(f)
    schedule = {**schedule_of(args), "seed": args.seed}
    checkpoint = args.teacher_checkpoint
    if checkpoint is not None and os.sep in checkpoint:  # a path (not a file name inside the teacher's fold_X)
        checkpoint = os.path.abspath(checkpoint)
    teacher = {"trainer": args.teacher_trainer, "configuration": args.teacher_configuration,
               "plans": args.teacher_plans, "checkpoint": checkpoint}
    name = add_configuration(plans_file, dataset_json, args.configuration, args.modality, args.name, schedule,
                             args.overwrite, teacher, parse_setting_assignments(args.set),
                             False if args.no_final_validation else None, nnunet_paths.nnUNet_results)
    print(f"configuration {name} (inherits {args.configuration}) is in {plans_file}")
    return 0


def lckd_subset(args) -> int:
    if not nnunet_paths.nnUNet_results:
        raise ConfigurationError("set the environment variable nnUNet_results (see README)")
    with open(preprocessed_files(args.dataset, args.plans)[1]) as f:
        dataset_json = json.load(f)
    if args.all == bool(args.modalities):
        raise ConfigurationError("give either -m MODALITY [MODALITY ...] or --all")
    subsets = every_channel_subset(dataset_json) if args.all else \
        [ChannelSubset.of_names(dataset_json, args.modalities)]
    results = os.path.join(str(nnunet_paths.nnUNet_results), dataset_name(args.dataset))
    for subset in subsets:
        folder = write_subset_model_folder(results, args.trainer, args.plans, args.configuration, subset,
                                           args.overwrite)
        files = " ".join(f"<case>_{c:04d} ({name})" for c, name in enumerate(subset.names))
        configuration = subset_configuration_name(args.configuration, subset.label)
        print(f"{folder}\n  nnunet-protokd predict -d {args.dataset} -c {configuration} -tr {args.trainer} "
              f"-p {args.plans} -i INPUT -o OUTPUT   # INPUT holds {files} per case")
    return 0


def predict(args) -> int:
    """Checks the input folder against the model folder, then runs nnU-Net's nnUNetv2_predict with the same
    arguments (all of them: this command's own are nnUNetv2_predict's)."""
    check_and_predict(args.d, args.tr, args.p, args.c, args.i, args.nnunet_arguments)
    return 0


def schedule_of(args) -> dict:
    """The schedule flags of a command ({"num_epochs": ..., ...}; None where not given)."""
    return {key: getattr(args, flag[2:].replace("-", "_")) for key, flag in SCHEDULE_FLAGS.items() if key != "seed"}


def phantoms(args) -> int:
    cases = generate_brats_phantoms(args.output_folder, args.hgg, args.lgg, args.seed, tuple(reversed(args.shape)),
                                    tuple(args.spacing), not args.no_seg, args.naming, args.first_case_index)
    print(f"wrote {len(cases)} phantom cases to {args.output_folder}")
    return 0


def parse_prediction_sets(specifications) -> list:
    """["teacher=DIR", "protokd:T1ce=DIR", ...] -> PredictionSets."""
    sets = []
    for specification in specifications:
        key, sep, folder = specification.partition("=")
        method, modality = ModelKey.parse(key)
        if not sep or not method or not folder:
            raise ValueError(f"--prediction expects METHOD[:MODALITY]=FOLDER, got {specification!r}")
        if not os.path.isdir(folder):
            raise ValueError(f"--prediction {specification}: {folder} is not a folder")
        sets.append(PredictionSet(method.lower(), modality or None, folder))
    return sets


def report(args) -> int:
    dataset_json = read_json(args.dataset_json)
    run_info = read_json(args.run_info) if args.run_info else None
    build_report(args.ground_truth, dataset_json, parse_prediction_sets(args.prediction), args.output,
                 args.images, run_info, args.seed, None if args.hd95_exclude_one_empty else DATASET_DEFAULT)
    print(f"report: {os.path.join(args.output, 'report.md')}")
    return 0


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def variant_pairs(words) -> tuple:
    """VARIANT:MODALITY words as (variant, modality) pairs; a word without a modality gets "" (refused later)."""
    return tuple((key.method, key.modality or "") for key in map(ModelKey.parse, words))


def experiment_settings(args):
    return ExperimentSettings(
        dataset=args.dataset, output_folder=args.output or f"protokd_experiment_{args.dataset}",
        configuration=args.configuration, modalities=tuple(args.modalities or ()), methods=tuple(args.methods),
        folds=tuple(args.folds), device=args.device or _default_device(), epochs=args.epochs,
        iterations_per_epoch=args.iterations_per_epoch, val_iterations_per_epoch=args.val_iterations_per_epoch,
        final_validation=not args.no_final_validation, plans=args.plans, num_processes=args.num_processes,
        variants=variant_pairs(args.variants or ()),
        seed=args.seed, predict_in_process=args.predict_in_process, cross_validation=args.cross_validation)


def experiment(args) -> int:
    if args.workflow:
        write_workflow(experiment_settings(args), args.workflow)
    elif args.step:
        Experiment(experiment_settings(args)).run_step(args.step)
    else:
        Experiment(experiment_settings(args)).run(dry_run=args.dry_run)
    return 0


def evidence_settings(args) -> EvidenceSettings:
    """The EvidenceSettings of parsed `evidence` arguments."""
    schedule = dict(FULL_SCHEDULE if args.schedule == "full" else CPU_SCHEDULE)
    for key in ("configuration", "epochs", "iterations_per_epoch", "val_iterations_per_epoch"):
        if getattr(args, key) is not None:
            schedule[key] = getattr(args, key)
    variants = requested_variants(variant_pairs(args.variants) if args.variants is not None else None,
                                  args.ablations, args.diagnosis, tuple(args.modalities))
    return EvidenceSettings(output_folder=args.output, seeds=tuple(args.seeds or EVIDENCE_SEEDS),
                            modalities=tuple(args.modalities), methods=tuple(args.methods or EVIDENCE_METHODS),
                            variants=variants, device=args.device or _default_device(), dataset=args.dataset,
                            folds=tuple(args.folds) if args.folds else None, **schedule)


def evidence(args) -> int:
    if isinstance(args.report_only, str):
        print(f"The evidence report is {report_from_evidence(args.report_only, args.output)}")
        return 0
    runner = Evidence(evidence_settings(args))
    report = runner.aggregate() if args.report_only else runner.run()
    print(f"The evidence report is {report}")
    return 0


def demo(args) -> int:
    modalities = ("T1", "T1ce", "T2", "FLAIR") if args.all_modalities else tuple(args.modalities)
    report_file = run_demo(args.output, args.seed, modalities, args.epochs, args.iterations_per_epoch,
                           args.device or _default_device(), tuple(args.methods or EVIDENCE_METHODS))
    table_1 = os.path.join(os.path.abspath(args.output), f"seed_{args.seed}", "experiment", "report", "report.md")
    print(f"\nThe report is {report_file} (figures beside it); the paper's Table 1 with HD95 and overlays: {table_1}")
    return 0


def benchmark(args) -> int:
    teacher_checkpoint = args.teacher_checkpoint
    if teacher_checkpoint is None:  # the teacher a fold-0 student of this configuration would train with
        plans, dataset_json = load_preprocessed(args.dataset, args.plans)
        teacher_checkpoint = locate_teacher(plans, args.configuration, 0, dataset_json,
                                            nnunet_paths.nnUNet_results.get()).checkpoint_path
    # the JSON is rewritten after each trainer, so that a run stopped half-way keeps what it measured
    write = (lambda report: write_json_atomically(report, args.output, indent=2, allow_nan=True)) if args.output \
        else None
    report = run_benchmark(args.dataset, args.configuration, teacher_checkpoint, args.device or _default_device(),
                           args.steps, args.warmup, args.plans, args.inference_cases, args.precision, args.compile,
                           args.trainers, args.memory_limit_gb, args.patch_size, args.paired_rounds,
                           args.cpu_allocator, on_result=write)
    print(format_table(report))
    if args.output:
        print(f"wrote {args.output}")
    return 0


def export(args) -> int:
    exported = export_student(args.dataset, args.configuration, args.trainer, args.folds, args.output, args.plans,
                              tuple(args.checkpoints), args.overwrite)
    print(f"wrote {exported.zip_file}: model folder {exported.model_folder} with model_card.md\n"
          f"where it is used:\n  " + "\n  ".join(exported.card["usage"]))
    return 0


def register_trainers(args) -> int:
    if args.remove:
        print("removed " + trainer_path.pth_file() if trainer_path.unregister() else "nothing to remove")
        return 0
    path = trainer_path.register()
    print(f"wrote {path}: nnUNetv2_train/nnUNetv2_predict of this environment now find {trainer_path.TRAINERS_FOLDER}")
    return 0
