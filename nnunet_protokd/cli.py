"""`nnunet-protokd`: the plugin's own commands (nnU-Net's commands do planning, training and prediction)."""
from __future__ import annotations

import argparse
import os
import sys


def _dataset_paths(dataset: str, plans: str) -> tuple[str, str]:
    """(plans file, dataset.json) of a preprocessed dataset, by id or name."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    if not nnUNet_preprocessed:
        raise SystemExit("error: set the environment variable nnUNet_preprocessed (see README)")
    folder = os.path.join(nnUNet_preprocessed, maybe_convert_to_dataset_name(dataset))
    plans_file = os.path.join(folder, f"{plans}.json")
    if not os.path.isfile(plans_file):
        raise SystemExit(f"error: {plans_file} not found; run nnUNetv2_plan_and_preprocess -d {dataset} first")
    return plans_file, os.path.join(folder, "dataset.json")


def add_config(args) -> int:
    import json
    from nnunet_protokd.configurations import ConfigurationError, add_configuration
    plans_file, dataset_json_file = _dataset_paths(args.dataset, args.plans)
    with open(dataset_json_file) as f:
        dataset_json = json.load(f)
    schedule = {"num_epochs": args.epochs, "num_iterations_per_epoch": args.iterations_per_epoch,
                "num_val_iterations_per_epoch": args.val_iterations_per_epoch}
    teacher = {"trainer": args.teacher_trainer, "configuration": args.teacher_configuration,
               "plans": args.teacher_plans, "checkpoint": args.teacher_checkpoint}
    try:
        methods = parse_method_settings(args.set)
        name = add_configuration(plans_file, dataset_json, args.configuration, args.modality, args.name,
                                 schedule, args.overwrite, teacher, methods)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"configuration {name} (inherits {args.configuration}) is in {plans_file}")
    return 0


def parse_method_settings(assignments) -> dict:
    """["ProtoKDTrainer.beta=0", ...] -> {"ProtoKDTrainer": {"beta": 0}}; values are JSON (numbers, true/false)."""
    import json
    from nnunet_protokd.configurations import ConfigurationError
    methods = {}
    for assignment in assignments or []:
        key, sep, text = assignment.partition("=")
        method, dot, setting = key.partition(".")
        if not (sep and dot and method and setting):
            raise ConfigurationError(f"--set expects TRAINER.SETTING=VALUE, got {assignment!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigurationError(f"--set {assignment}: {text!r} is not a number or true/false") from None
        methods.setdefault(method, {})[setting] = value
    return methods


def phantoms(args) -> int:
    from nnunet_protokd.phantoms import generate_brats_phantoms
    try:
        cases = generate_brats_phantoms(args.output_folder, args.hgg, args.lgg, args.seed, tuple(args.shape),
                                        tuple(args.spacing), not args.no_seg, args.naming, args.first_case_index)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(cases)} phantom cases to {args.output_folder}")
    return 0


def register_trainers(args) -> int:
    from nnunet_protokd import trainer_path
    if args.remove:
        print("removed " + trainer_path.pth_file() if trainer_path.unregister() else "nothing to remove")
        return 0
    path = trainer_path.register()
    print(f"wrote {path}: nnUNetv2_train/nnUNetv2_predict of this environment now find {trainer_path.TRAINERS_FOLDER}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-protokd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("add-config", help="add a student (one modality) or schedule configuration to the plans",
                            description="Adds a configuration inheriting -c (and its preprocessed data) to the "
                                        "plans: with -m a one-modality student configuration <c>_<modality>; "
                                        "without, a variant named --name (e.g. a short schedule).")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="base configuration (default 3d_fullres)")
    p.add_argument("-m", "--modality", default=None, help="student modality: a channel name of the dataset (T1ce, ...)")
    p.add_argument("--name", default=None, help="configuration name (default <configuration>_<modality>)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--epochs", type=int, default=None, help="num_epochs for the plugin's trainers")
    p.add_argument("--iterations-per-epoch", type=int, default=None, help="training iterations per epoch")
    p.add_argument("--val-iterations-per-epoch", type=int, default=None, help="validation iterations per epoch")
    p.add_argument("--teacher-trainer", default=None,
                   help="trainer of the student's teacher model (default ProtoKDTeacherTrainer)")
    p.add_argument("--teacher-configuration", default=None,
                   help="configuration of the teacher model (default: the base configuration -c)")
    p.add_argument("--teacher-plans", default=None, help="plans of the teacher model (default: -p)")
    p.add_argument("--teacher-checkpoint", default=None,
                   help="checkpoint file name in the teacher's fold folder (default checkpoint_final.pth), "
                        "or the path of any nnU-Net checkpoint")
    p.add_argument("--set", action="append", metavar="TRAINER.SETTING=VALUE",
                   help="a distilling trainer's setting, e.g. ProtoKDTrainer.beta=0 (repeatable); see README")
    p.add_argument("--overwrite", action="store_true", help="replace a configuration of that name")
    p.set_defaults(func=add_config)

    p = commands.add_parser("phantoms", help="write synthetic BraTS-like cases in the BraTS folder layout",
                            description="Synthetic skull-stripped 4-modality glioma phantoms for tests and demos.")
    p.add_argument("output_folder")
    p.add_argument("--hgg", type=int, default=8, help="number of high-grade cases (default 8)")
    p.add_argument("--lgg", type=int, default=4, help="number of low-grade cases (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=(32, 48, 48), metavar=("Z", "Y", "X"))
    p.add_argument("--spacing", type=float, nargs=3, default=(1.2, 1.2, 2.0), metavar=("X", "Y", "Z"))
    p.add_argument("--naming", choices=("brats2018", "brats2023"), default="brats2018")
    p.add_argument("--no-seg", action="store_true", help="validation/test layout: images only")
    p.add_argument("--first-case-index", type=int, default=0, help="number of the first case (held-out sets)")
    p.set_defaults(func=phantoms)

    p = commands.add_parser("register-trainers", help="let nnUNetv2_train/-predict of this environment find "
                                                      "the plugin's trainers (done by bootstrap.sh)")
    p.add_argument("--remove", action="store_true", help="undo")
    p.set_defaults(func=register_trainers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
