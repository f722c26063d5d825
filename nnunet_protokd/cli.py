"""`nnunet-protokd`: the plugin's own commands (nnU-Net's commands do planning, training and prediction).

This module only parses: each command's work is a function of commands.py, imported when a command runs, so that
`--help` and a mistyped option answer at once instead of after loading PyTorch and nnU-Net (seconds)."""
from __future__ import annotations

import argparse
import sys

from nnunet_protokd.errors import StepFailed, is_user_error
from nnunet_protokd.methods import DEFAULT_METHODS, VARIANTS, describe_method_settings
from nnunet_protokd.settings import SCHEDULE_FLAGS, SCHEDULE_SETTINGS


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    """nnUNetv2_predict's options (nnunetv2 2.8), passed to it unchanged; declared here so that they parse
    exactly as there (argparse would read an undeclared -device as -d evice) and show in --help."""
    p.add_argument("-i", required=True, help="input folder: <case>_XXXX files, checked against the model")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-d", required=True, help="dataset id or name")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-tr", default="nnUNetTrainer", help="trainer (default nnUNetTrainer)")
    p.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres_T1ce")
    p.add_argument("-f", nargs="+", default=("0", "1", "2", "3", "4"), help="folds (default 0 1 2 3 4)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step (default 0.5)")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring at test time")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--save_probabilities", action="store_true")
    p.add_argument("--continue_prediction", action="store_true", help="keep existing outputs")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint (default checkpoint_final.pth)")
    p.add_argument("-npp", type=int, default=None, help="preprocessing processes (nnU-Net default 3)")
    p.add_argument("-nps", type=int, default=None, help="export processes (nnU-Net default 3)")
    p.add_argument("-prev_stage_predictions", default=None, help="cascade: previous stage's predictions")
    p.add_argument("-num_parts", type=int, default=1)
    p.add_argument("-part_id", type=int, default=0)
    p.add_argument("-device", default="cuda", help="cuda, cpu or mps (default cuda)")
    p.add_argument("--disable_progress_bar", action="store_true")
    p.add_argument("--not_on_device", action="store_true")


def add_schedule_arguments(p: argparse.ArgumentParser, what: str = "") -> None:
    """--epochs, --iterations-per-epoch, --val-iterations-per-epoch (settings.SCHEDULE_FLAGS)."""
    for key, flag in SCHEDULE_FLAGS.items():
        if key != "seed":
            p.add_argument(flag, type=int, default=None, help=f"{SCHEDULE_SETTINGS[key].meaning}{what} (>= 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-protokd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("add-config", help="add a student (one modality) or schedule configuration to the plans",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Adds a configuration inheriting -c (and its preprocessed data) to the\n"
                                        "plans: with -m a one-modality student configuration <c>_<modality>;\n"
                                        "without, a variant named --name (e.g. a short schedule). The plans\n"
                                        "before the change are kept in <plans>.json.bak.",
                            epilog="settings of --set (TRAINER.SETTING=VALUE; JSON numbers or true/false):\n"
                                   + describe_method_settings())
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="base configuration (default 3d_fullres)")
    p.add_argument("-m", "--modality", default=None, help="student modality: a channel name of the dataset (T1ce, ...)")
    p.add_argument("--name", default=None, help="configuration name (default <configuration>_<modality>)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    add_schedule_arguments(p, " for the plugin's trainers")
    p.add_argument("--seed", type=int, default=None,
                   help="seed the plugin's trainers when they start (initial weights, the main process's random "
                        "numbers; nnU-Net seeds nothing)")
    p.add_argument("--no-final-validation", action="store_true",
                   help="the plugin's trainers skip nnU-Net's final validation (when evaluating on held-out cases)")
    p.add_argument("--teacher-trainer", default=None,
                   help="trainer of the student's teacher model (default ProtoKDTeacherTrainer)")
    p.add_argument("--teacher-configuration", default=None,
                   help="configuration of the teacher model (default: the base configuration -c)")
    p.add_argument("--teacher-plans", default=None, help="plans of the teacher model (default: -p)")
    p.add_argument("--teacher-checkpoint", default=None,
                   help="checkpoint file name in the teacher's fold folder (default checkpoint_final.pth), "
                        "or the path of any nnU-Net checkpoint. A teacher named by any --teacher-... option must "
                        "exist already")
    p.add_argument("--set", action="append", metavar="TRAINER.SETTING=VALUE",
                   help="a distilling trainer's setting, e.g. ProtoKDTrainer.beta=0 (repeatable); the settings "
                        "and their valid ranges are listed below")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a configuration of that name that add-config made (never one nnU-Net planned)")
    p.set_defaults(func="add_config")

    p = commands.add_parser("phantoms", help="write synthetic BraTS-like cases in the BraTS folder layout",
                            description="Synthetic skull-stripped 4-modality glioma phantoms for tests and demos.")
    p.add_argument("output_folder")
    p.add_argument("--hgg", type=int, default=8, help="number of high-grade cases (default 8)")
    p.add_argument("--lgg", type=int, default=4, help="number of low-grade cases (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=(48, 48, 32), metavar=("X", "Y", "Z"),
                   help="voxels along x, y, z, as in the NIfTI header (default 48 48 32)")
    p.add_argument("--spacing", type=float, nargs=3, default=(1.2, 1.2, 2.0), metavar=("X", "Y", "Z"),
                   help="voxel size in mm along x, y, z (default 1.2 1.2 2.0)")
    p.add_argument("--naming", choices=("brats2018", "brats2023", "brats2024"), default="brats2018",
                   help="file names and labels: BraTS 2018-2021, 2023 or 2024 post-treatment glioma (2023 names, "
                        "a small resection cavity, label 4, in every case)")
    p.add_argument("--no-seg", action="store_true", help="validation/test layout: images only")
    p.add_argument("--first-case-index", type=int, default=0, help="number of the first case (held-out sets)")
    p.set_defaults(func="phantoms")

    p = commands.add_parser("demo", help="the whole protocol on built-in phantoms (CPU, under 20 minutes)",
                            description="One seed of the evidence protocol: phantoms in the BraTS 2018 layout -> "
                                        "conversion -> teacher, unimodal, ProtoKD and KD-Net students and one "
                                        "nnU-Net trained with modality dropout (2d, the evidence run's schedule) -> "
                                        "predictions on held-out phantoms -> report, "
                                        "with the committed evidence run's figures beside the demo's. Running it "
                                        "again continues where it stopped.")
    p.add_argument("-o", "--output", default="demo_output", help="demo folder (default ./demo_output)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    p.add_argument("--modalities", nargs="+", default=["T1ce"],
                   help="student modalities (default T1ce; each one more adds about 9 minutes on a 2-core CPU)")
    p.add_argument("--all-modalities", action="store_true", help="students for T1, T1ce, T2 and FLAIR")
    p.add_argument("--methods", nargs="+", default=None,
                   help="as for experiment (default, as evidence: unimodal protokd kdnet moddrop); add lckd for LCKD "
                        "and its 15-subset table (about 15 more minutes on CPU, mostly its 15 predictions)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every model (default: the evidence run's, 15)")
    p.add_argument("--iterations-per-epoch", type=int, default=None,
                   help="training iterations per epoch (default: the evidence run's, 25)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.set_defaults(func="demo")

    p = commands.add_parser("evidence", help="does distillation help? seeds x methods x ablations on phantoms, with "
                                             "paired statistics, learning curves and teacher agreement; resumable",
                            description="For each seed: phantoms -> conversion -> experiment (seeded trainers: "
                                        "teacher, per modality the unimodal baseline, ProtoKD, KD-Net and the "
                                        "variants, one schedule) -> predictions of held-out cases; then one report "
                                        "pooling the seeds (report/evidence.md). Running it again continues where "
                                        "it stopped.")
    p.add_argument("-o", "--output", default="evidence_output", help="evidence folder (default ./evidence_output)")
    p.add_argument("-d", "--dataset", default=None,
                   help="an already converted dataset (id or name in nnUNet_raw) instead of the phantoms: each seed "
                        "trains every model on it and predicts its held-out test set (imagesTs with labelsTs), or, "
                        "without one, each fold of the cross-validation predicts its validation cases (--folds); "
                        "the nnU-Net folders are the environment's")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="phantom and training seeds (default 0 1 2 3 4)")
    p.add_argument("--folds", type=int, nargs="+", default=None,
                   help="with -d: take these cross-validation folds as replicates, a (seed, fold) model each, each "
                        "predicting its own validation cases (default for a dataset without a test set: 0 1 2 3 4; "
                        "given, also for one with a test set)")
    p.add_argument("--modalities", nargs="+", default=["T1", "T1ce"], help="student modalities (default T1 T1ce)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="as for experiment (default unimodal protokd kdnet moddrop: moddrop is one nnU-Net trained "
                        "with modality dropout per seed, predicted from each student modality and compared with the "
                        "baseline and each distilled student)")
    p.add_argument("--variants", nargs="*", default=None, metavar="VARIANT:MODALITY",
                   help="method variants to train beside the papers' settings (default none)")
    p.add_argument("--ablations", action="store_true",
                   help="also train ProtoKD's ablations on T1 (without L_kd, without L_proto, intra-class only; "
                        "about 8 minutes more per seed on 2 cores)")
    p.add_argument("--diagnosis", action="store_true",
                   help="also train the diagnosis variants: ProtoKD with KD at T = 1 and ProtoKDTrainer without "
                        "either distillation term (the control) on T1; KD-Net with L_KL averaged and without L_KD on "
                        "T1ce (about 35 min more on 2 cores; on an earlier run's folder only these are trained)")
    p.add_argument("--schedule", choices=("cpu", "full"), default="cpu",
                   help="cpu: 2d, 15 epochs x 25 iterations (a seed of the default methods: 22-45 minutes on 2 "
                        "cores, as the machine goes); full: 3d_fullres with "
                        "nnU-Net's 1000 x 250 (a GPU)")
    p.add_argument("-c", "--configuration", default=None, help="override the schedule's configuration")
    add_schedule_arguments(p, ", overriding the schedule's")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--report-only", nargs="?", const=True, default=False, metavar="EVIDENCE_JSON",
                   help="pool the finished seeds of -o into the report again; with an evidence.json, recompute the "
                        "report from its per-case values alone into -o (nothing trained, no seed folders read)")
    p.set_defaults(func="evidence")

    p = commands.add_parser("experiment", help="the paper's Table-1 protocol on a converted dataset, resumable",
                            description="plan/preprocess -> teacher -> per modality the unimodal baseline and the "
                                        "distilling students -> nnunet-protokd predict on held-out single-modality "
                                        "images (imagesTs with labelsTs, else each fold's validation cases) -> "
                                        "report. Finished steps are skipped, half-trained models continued (--c).")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name (in nnUNet_raw)")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="base nnU-Net configuration")
    p.add_argument("--modalities", nargs="+", default=None, help="student modalities (default: every channel)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="unimodal, protokd, kdnet (a student per modality), lckd (one model, predicted from "
                        "every subset of modalities) and/or moddrop (one model trained with modality dropout, "
                        "predicted from each student modality) (default: unimodal protokd kdnet)")
    p.add_argument("--folds", nargs="+", default=[0], type=lambda f: f if f == "all" else int(f),
                   help="folds (default 0)")
    p.add_argument("--device", default=None, help="passed to nnU-Net's -device (default: cuda if available)")
    add_schedule_arguments(p, ": a shorter schedule, a configuration of its own")
    p.add_argument("--no-final-validation", action="store_true", help="skip nnU-Net's final validation")
    p.add_argument("--variants", nargs="+", default=None, metavar="VARIANT:MODALITY",
                   help="also train these method variants, each on its own configuration: "
                        + ", ".join(f"{variant.name} ({variant.title})" for variant in VARIANTS.values()))
    p.add_argument("--seed", type=int, default=None, help="seed of every training (a configuration of its own)")
    p.add_argument("--predict-in-process", action="store_true",
                   help="predict in this process without nnU-Net's worker processes (saves a start per model on a "
                        "small machine)")
    p.add_argument("--cross-validation", action="store_true",
                   help="evaluate each fold's model on its validation cases even when the dataset has a held-out "
                        "test set")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-np", "--num-processes", type=int, default=2, help="preprocessing processes (default 2)")
    p.add_argument("-o", "--output", default=None, help="predictions and report (default protokd_experiment_<d>)")
    p.add_argument("--dry-run", action="store_true", help="print the exact commands without running anything")
    p.add_argument("--workflow", metavar="DIR", default=None,
                   help="write the protocol as a Snakemake workflow (DIR/Snakefile, resources in DIR/config.yaml, a "
                        "SLURM profile in DIR/slurm) instead of running it; needs the extra [cluster]")
    p.add_argument("--step", metavar="NAME", default=None,
                   help="run one step of the protocol by name (a rule of the workflow), whatever exists")
    p.set_defaults(func="experiment")

    p = commands.add_parser("report", help="Table 1: Dice/HD95 of prediction folders, paired tests, figures",
                            description="Scores labelled prediction folders against a ground-truth folder and "
                                        "writes report.md, summary.json, dice.png (and overlays.png with --images).")
    p.add_argument("--ground-truth", required=True, help="folder of reference label maps (<case>.nii.gz)")
    p.add_argument("--dataset-json", required=True, help="the dataset's dataset.json (labels/regions, file ending)")
    p.add_argument("--prediction", action="append", required=True, metavar="METHOD[:MODALITY]=FOLDER",
                   help="e.g. teacher=DIR, unimodal:T1ce=DIR, protokd:T1ce=DIR, kdnet:T1ce=DIR, lckd:T1ce=DIR, "
                        "lckd:T1ce+FLAIR=DIR (repeat; several modalities go to the subset table)")
    p.add_argument("-o", "--output", required=True, help="report folder")
    p.add_argument("--images", default=None, help="folder of the cases' images (<case>_XXXX) for overlays.png")
    p.add_argument("--run-info", default=None, help="JSON describing what ran, copied into the report")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--hd95-exclude-one-empty", action="store_true",
                   help="leave out of HD95 the cases where exactly one of reference and prediction is empty "
                        "(default: score them the penalty of the dataset's BraTS generation, as the challenges do: "
                        "373.13 mm for 2018-2021, 374 mm for 2023, 337 mm for 2024); the report counts them")
    p.set_defaults(func="report")

    p = commands.add_parser("benchmark", help="step time and peak memory of the students vs the unimodal baseline",
                            description="Unimodal, ProtoKD, KD-Net and LCKD (both stages) train_step on the same "
                                        "cached batches (each trainer in its own process), the teacher's forward, "
                                        "and single-modality inference against a plain nnU-Net network; ratios to "
                                        "UnimodalTrainer.")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name (preprocessed, with a trained teacher "
                                                          "unless --teacher-checkpoint)")
    p.add_argument("-c", "--configuration", required=True, help="a student configuration (e.g. 3d_fullres_T1ce)")
    p.add_argument("--teacher-checkpoint", default=None, help="default: the fold-0 teacher a student would use")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--steps", type=int, default=20, help="measured steps per trainer (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (default 3)")
    p.add_argument("--inference-cases", type=int, default=3,
                   help="training cases predicted by sliding window, student vs plain nnU-Net network (default 3)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-o", "--output", default=None, help="write the figures as JSON")
    p.add_argument("--precision", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="CPU only: run the steps under CPU autocast of this type with a GradScaler, a stand-in for "
                        "nnU-Net's CUDA autocast (on CUDA nnU-Net's float16 autocast always applies)")
    p.add_argument("--compile", choices=("nnunet", "on", "off"), default="nnunet",
                   help="torch.compile of student and teacher: nnU-Net's choice (on for CUDA), forced on (also on "
                        "CPU) or off; LCKDTrainer keeps its own (off)")
    p.add_argument("--trainers", nargs="+", default=None,
                   help="which of UnimodalTrainer ProtoKDTrainer KDNetTrainer LCKDTrainer LCKDTrainer:subsets "
                        "ProtoKDTeacherTrainer teacher (its forward) inference to measure (default all; the ratios "
                        "need UnimodalTrainer)")
    p.add_argument("--patch-size", type=int, nargs="+", default=None,
                   help="measure at this patch size (z y x) instead of the configuration's, e.g. a BraTS-size "
                        "patch on small data or a tiny one for a quick check; in memory only, the plans are not "
                        "changed (each axis a multiple of the network's total stride)")
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="address-space limit of each measuring process: a trainer that needs more is reported as "
                        "failed (did not fit) instead of exhausting the machine")
    p.add_argument("--paired-rounds", type=int, default=None,
                   help="each distilling trainer also measures its limit in its own process: rounds of its step, "
                        "its student's unimodal step and its teacher's forward on the same batch, in rotating "
                        "order (default: --steps; 0: none)")
    p.add_argument("--cpu-allocator", choices=("system", "retain"), default="system",
                   help="CPU only: 'retain' keeps freed memory in each measuring process (glibc malloc tunables), "
                        "as PyTorch's CUDA allocator does, instead of glibc returning large blocks to the kernel "
                        "after every step: faster, steadier CPU step times at BraTS size; the peak memory column "
                        "is then what the allocator held (default: system)")
    p.set_defaults(func="benchmark")

    p = commands.add_parser("lckd-subset", help="model folder(s) of a trained LCKD or modality-dropout model for a "
                                                "subset of the modalities, to predict from",
                            description="Writes <trainer>__<plans>__<configuration>_<A+B> next to the trained "
                                        "model: its dataset.json lists only those channels. LCKDTrainer: its "
                                        "checkpoints link to the trained ones (the plugin predicts them). "
                                        "ModalityDropoutTrainer: its checkpoints are nnU-Net's own network with the "
                                        "first convolution sliced to those channels (plain nnUNetv2_predict and "
                                        "export). Then: nnunet-protokd predict -c <configuration>_<A+B> -tr TRAINER "
                                        "-i <folder with only those files per case> ...")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    p.add_argument("-c", "--configuration", required=True, help="the configuration the model was trained on")
    p.add_argument("-m", "--modalities", nargs="+", default=None, help="the modalities available at prediction")
    p.add_argument("--all", action="store_true", help="a folder for every non-empty subset (15 for BraTS)")
    p.add_argument("-tr", "--trainer", default="LCKDTrainer",
                   help="LCKDTrainer (default) or ModalityDropoutTrainer")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--overwrite", action="store_true", help="replace a different folder of that name")
    p.set_defaults(func="lckd_subset")

    p = commands.add_parser("predict", help="nnUNetv2_predict, after checking that every case has exactly the "
                                            "model's input files",
                            description="Checks the input folder against the model folder's dataset.json (a "
                                        "single-modality student reads <case>_0000 only, an LCKD subset model "
                                        "exactly its channels; every file readable, without NaN/inf, not empty) "
                                        "and lists every case and file at fault without predicting anything; "
                                        "then runs nnU-Net's nnUNetv2_predict with the same arguments. Plain "
                                        "nnUNetv2_predict cannot check file names: it gives the model each case's "
                                        "files in the order of their numbers, so <case>_0003 alone is read as "
                                        "<case>_0000.")
    add_predict_arguments(p)
    p.set_defaults(func="predict")

    p = commands.add_parser("export", help="a trained student as an nnU-Net model zip for sites with nnU-Net only, "
                                           "with a model card",
                            description="Writes a zip for nnUNetv2_install_pretrained_model_from_zip: the student's "
                                        "single-channel model folder as "
                                        "nnUNetTrainer__<plans>__<configuration>_<method> (checkpoints without "
                                        "teacher, naming nnU-Net's own trainer), model_card.md/.json and, for BraTS, "
                                        "convert_predictions_to_brats.py. LCKD subset folders export unchanged and "
                                        "need the plugin.")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    p.add_argument("-c", "--configuration", required=True, help="the student's configuration, e.g. 3d_fullres_T1ce")
    p.add_argument("-tr", "--trainer", required=True, help="ProtoKDTrainer, KDNetTrainer, UnimodalTrainer, LCKDTrainer")
    p.add_argument("-f", "--folds", nargs="+", default=["0"], help="folds to export (default 0)")
    p.add_argument("-o", "--output", required=True, help="zip file to write")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-chk", "--checkpoints", nargs="+", default=["checkpoint_final.pth"],
                   help="checkpoint files per fold (default checkpoint_final.pth)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func="export")

    p = commands.add_parser("register-trainers", help="let nnUNetv2_train/-predict of this environment find "
                                                      "the plugin's trainers (done by bootstrap.sh)",
                            description="Writes a one-line .pth file into this Python environment's site-packages "
                                        "that adds the plugin's trainers/ folder to nnUNet_extTrainer at every "
                                        "start of Python, so that nnU-Net's commands find -tr ProtoKDTrainer etc. "
                                        "without shell set-up. Alternative: export nnUNet_extTrainer yourself.")
    p.add_argument("--remove", action="store_true", help="delete that .pth file again")
    p.set_defaults(func="register_trainers")
    return parser


def run_reporting_errors(command, args) -> int:
    """Runs a command; bad input (a UserError: ConversionError, ConfigurationError, TeacherError, ...; or another
    ValueError) or a failed experiment step becomes one `error: ...` message and exit status 1 instead of a
    traceback."""
    try:
        return command(args)
    except Exception as exc:
        if not (is_user_error(exc) or isinstance(exc, (ValueError, StepFailed))):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    # the commands' modules bring PyTorch and nnU-Net (seconds to import): only once the arguments parsed
    from nnunet_protokd import commands  # noqa: PLC0415
    if args.command == "predict":  # its arguments are nnUNetv2_predict's, passed on as given
        args.nnunet_arguments = argv[argv.index("predict") + 1:]
    return run_reporting_errors(getattr(commands, args.func), args)


if __name__ == "__main__":
    sys.exit(main())
