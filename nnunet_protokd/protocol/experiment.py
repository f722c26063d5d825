"""The ProtoKD paper's Table-1 protocol as one resumable sequence of nnU-Net commands.

plan/preprocess -> the multi-modality teacher -> per modality the unimodal baseline and each distilling
student -> prediction of held-out single-modality images (`nnunet-protokd predict`: nnUNetv2_predict after
checking each case's files) -> report. Each step is data (`Step`): an nnU-Net
(or plugin) command that a user could type, the files it reads and writes, and its resource class. `experiment`
runs the steps in order, skipping those whose outputs exist; `--dry-run` prints the commands; `--workflow`
writes the same steps as a Snakemake workflow (protocol/workflow.py), one rule per step.

A training continues (nnU-Net's `--c`) only from `checkpoint_latest.pth`: after a finished training nnU-Net keeps
`checkpoint_final.pth` and `checkpoint_best.pth` only, and `--c` without the final one would silently continue
from the best one, a different model; a model folder without either final or latest checkpoint trains anew.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import sys
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import nnunetv2.paths as nnunet_paths  # read at call time: tests and commands set them late
import torch
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.crossval_split import generate_crossval_split

from nnunet_protokd.channels import ChannelSubset
from nnunet_protokd.deploy.prediction import check_and_predict
from nnunet_protokd.errors import StepFailed, UserError
from nnunet_protokd.evaluation.report import PredictionSet, build_report
from nnunet_protokd.io import held_exclusively, write_json_atomically
from nnunet_protokd.lckd.subsets import every_channel_subset, subset_configuration_name
from nnunet_protokd.methods import (
    DEFAULT_METHODS,
    METHODS,
    MODALITY_SEPARATOR,
    TEACHER,
    VARIANTS,
    distilling_trainers,
    every_channel_methods,
    method_trainer,
)
from nnunet_protokd.plans import dataset_name, preprocessed_data_folder
from nnunet_protokd.protocol.running import run_command
from nnunet_protokd.settings import schedule_arguments, setting_assignment

LCKD = METHODS["lckd"]  # trained once on every channel, predicted from every subset of them
# trained once on every channel, predicted from each student modality through its sliced subset folder
MODALITY_DROPOUT = METHODS["moddrop"]
TRAINING_LOCK = ".training.lock"  # in a model's fold folder while a training of it runs (Experiment.training_lock)


# What a job of each kind of step needs on a cluster (Snakemake resources; `runtime` in minutes). Defaults for
# nnU-Net's 3d_fullres on one GPU: nnU-Net uses 12 data-augmentation processes per GPU (nnUNet_n_proc_DA) and a
# 1000-epoch training takes one to two days, so a training gets 48 h and its retries continue from
# checkpoint_latest.pth (written every 50 epochs). The workflow's config.yaml holds them for the user to change.
STEP_RESOURCES = {
    "preprocess": {"threads": 8, "mem_mb": 64000, "runtime": 360, "gpu": 0, "retries": 1},
    "small": {"threads": 1, "mem_mb": 2000, "runtime": 10, "gpu": 0, "retries": 0},  # plans edits, links, splits
    "train": {"threads": 12, "mem_mb": 64000, "runtime": 2880, "gpu": 1, "retries": 2},
    "predict": {"threads": 8, "mem_mb": 32000, "runtime": 240, "gpu": 1, "retries": 1},
    "report": {"threads": 2, "mem_mb": 16000, "runtime": 120, "gpu": 0, "retries": 0},
}


def planner_environment() -> dict | None:
    """The environment for nnU-Net's planning: without nnUNet_n_proc_DA when it is 0. That value is valid for training
    (augmentation in the training process, which the seed then covers), but nnU-Net's planner sets torch's thread
    count from it and fails at 0. None (this process's environment) otherwise."""
    if os.environ.get("nnUNet_n_proc_DA", "").strip() != "0":
        return None
    return {name: value for name, value in os.environ.items() if name != "nnUNet_n_proc_DA"}


@dataclass
class Step:
    """One command of the protocol, as data that both `experiment` (runs it unless it is done) and the Snakemake
    workflow (one rule: inputs, outputs, resources, shell command) read."""
    name: str  # an identifier: the rule's name, and `experiment --step NAME`
    title: str  # what the progress line says
    kind: str  # its resource class, a key of STEP_RESOURCES
    command: list  # the nnU-Net or plugin command that does the step (shown by --dry-run)
    inputs: list = field(default_factory=list)  # files/folders of earlier steps it reads: newer ones make it stale
    after: list = field(default_factory=list)  # outputs of earlier steps it needs to exist, whatever their age
    outputs: list = field(default_factory=list)  # files it writes
    output_folders: list = field(default_factory=list)  # folders it writes
    markers: bool = False  # its outputs are empty files saying it ran (the command itself writes nothing to test)
    done_check: Callable[[], bool] | None = None  # a finer test than "its outputs exist" (every case predicted)
    action: Callable[[], None] | None = None  # `experiment` does this in-process instead of running the command
    continue_from: str = ""  # a training's checkpoint_latest.pth: when it exists the command gets nnU-Net's --c
    # the environment its command needs when this process's does not do (None: inherit it)
    environment: Callable[[], dict | None] | None = None
    note: str = ""  # what an in-process action does, for --dry-run

    def done(self) -> bool:
        if self.done_check is not None:
            return self.done_check()
        return all(os.path.exists(p) for p in self.outputs + self.output_folders)

    def resumes(self) -> bool:
        return bool(self.continue_from) and os.path.isfile(self.continue_from)


def _identifier(*parts) -> str:
    """A step name from its parts (letters, digits, underscores): "3d_fullres_T1ce+FLAIR" -> "3d_fullres_T1ce_FLAIR"."""
    return re.sub(r"\W+", "_", "_".join(str(p) for p in parts)).strip("_")


@dataclass
class ExperimentSettings:
    dataset: str
    output_folder: str
    configuration: str = "3d_fullres"
    modalities: tuple = ()
    methods: tuple = DEFAULT_METHODS
    folds: tuple = (0,)
    device: str = "cuda"
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    val_iterations_per_epoch: int | None = None
    final_validation: bool = True
    plans: str = "nnUNetPlans"
    num_processes: int = 2
    variants: tuple = ()  # (variant of methods.VARIANTS, modality) pairs trained beside `methods`
    seed: int | None = None  # the trainers' seed (configurations.py: "seed")
    # run each prediction step in this process, nnU-Net's predictor without worker processes: on a small machine
    # starting nnUNetv2_predict costs about a minute, more than predicting a few small cases
    predict_in_process: bool = False
    # evaluate on each fold's validation cases even when the dataset has a held-out test set (imagesTs/labelsTs)
    cross_validation: bool = False
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        self.output_folder = os.path.abspath(self.output_folder)

    def schedule(self) -> dict:
        """The schedule settings of every training ({"num_epochs": ..., ...}; None: nnU-Net's own)."""
        return {"num_epochs": self.epochs, "num_iterations_per_epoch": self.iterations_per_epoch,
                "num_val_iterations_per_epoch": self.val_iterations_per_epoch, "seed": self.seed}

    def arguments(self) -> list:
        """The `nnunet-protokd experiment` arguments that recreate these settings (notes aside)."""
        arguments = ["-d", self.dataset, "-c", self.configuration, "-p", self.plans, "--methods", *self.methods,
                     "--folds", *map(str, self.folds), "--device", self.device, "-np", str(self.num_processes),
                     "-o", self.output_folder]
        arguments += ["--modalities", *self.modalities] if self.modalities else []
        arguments += ["--variants", *(f"{v}:{m}" for v, m in self.variants)] if self.variants else []
        arguments += schedule_arguments(self.schedule())
        arguments += ["--predict-in-process"] if self.predict_in_process else []
        arguments += ["--cross-validation"] if self.cross_validation else []
        return arguments + ([] if self.final_validation else ["--no-final-validation"])


def predict_in_this_process(dataset: str, trainer: str, plans: str, configuration: str, input_folder: str,
                            arguments: list) -> None:
    """`nnunet-protokd predict ARGUMENTS` (the input check, then nnU-Net's predictor) in this process, with no
    worker processes (nnU-Net's -npp 0 -nps 0: its sequential path)."""
    check_and_predict(dataset, trainer, plans, configuration, input_folder,
                      [*arguments, "-npp", "0", "-nps", "0", "--disable_progress_bar"])


def _symlinks(folder: str, links: dict) -> None:
    """folder/<name> -> source for each item (those already there are kept)."""
    os.makedirs(folder, exist_ok=True)
    for name, source in links.items():
        if not os.path.lexists(os.path.join(folder, name)):
            os.symlink(source, os.path.join(folder, name))


def _bin(name: str) -> str:
    """A console script of this environment (works without activating it)."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.exists(candidate) else name


# nnU-Net's cross-validation (nnUNetTrainer.do_split): five folds
CROSS_VALIDATION_FOLDS = (0, 1, 2, 3, 4)


def has_labelled_test_set(raw_dataset_folder: str) -> bool:
    """Whether a raw dataset has held-out cases to evaluate on (labelsTs beside imagesTs)."""
    return os.path.isdir(os.path.join(raw_dataset_folder, "labelsTs"))


class Experiment:
    def __init__(self, settings: ExperimentSettings):
        nnUNet_raw, nnUNet_preprocessed, nnUNet_results = (nnunet_paths.nnUNet_raw, nnunet_paths.nnUNet_preprocessed,
                                                           nnunet_paths.nnUNet_results)
        for variable, value in (("nnUNet_raw", nnUNet_raw), ("nnUNet_preprocessed", nnUNet_preprocessed),
                                ("nnUNet_results", nnUNet_results)):
            if not value:
                raise ValueError(f"set the environment variable {variable} (see README)")
        self.settings = s = settings
        self.dataset_name = dataset_name(s.dataset)
        self.dataset_id = self.dataset_name[len("Dataset"):len("Dataset") + 3]
        self.raw = os.path.join(str(nnUNet_raw), self.dataset_name)
        self.preprocessed = os.path.join(str(nnUNet_preprocessed), self.dataset_name)
        self.results = os.path.join(str(nnUNet_results), self.dataset_name)
        with open(os.path.join(self.raw, "dataset.json")) as f:
            self.dataset_json = json.load(f)
        channel_names = list(self.dataset_json["channel_names"].values())
        unknown = [m for m in s.modalities if m not in channel_names]
        if unknown:
            raise ValueError(f"modalities {unknown} are not channels of {self.dataset_name}: {channel_names}")
        self.modalities = tuple(s.modalities) or tuple(channel_names)
        unknown = [m for m in s.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {sorted(METHODS)}")
        unknown = [f"{v}:{m}" for v, m in s.variants if v not in VARIANTS or m not in self.modalities]
        if unknown:
            raise ValueError(f"unknown variants {unknown}: give VARIANT:MODALITY with a variant of "
                             f"{sorted(VARIANTS)} and a student modality of {list(self.modalities)}")
        # variants whose students start from the modality-dropout model (start_from), which trains first
        self.started_from_modality_dropout = sorted({v for v, _ in s.variants
                                                     if VARIANTS[v].starts_from_modality_dropout})
        if self.started_from_modality_dropout and MODALITY_DROPOUT.name not in s.methods:
            raise ValueError(f"the variants {self.started_from_modality_dropout} start from the modality-dropout "
                             f"model: add {MODALITY_DROPOUT.name} to the methods, which trains it first")
        units = {"num_epochs": "ep", "num_iterations_per_epoch": "it", "num_val_iterations_per_epoch": "val",
                 "seed": "seed"}
        suffix = "_".join(f"{v}{units[key]}" for key, v in s.schedule().items() if v is not None) + \
            ("" if s.final_validation else "_nofv")
        # a schedule is its own configuration, so short runs never share a model folder with full ones; the
        # teacher and every student inherit it
        self.schedule_configuration = f"{s.configuration}_{suffix.strip('_')}" if suffix else s.configuration
        self.student_methods = tuple(m for m in s.methods if m not in every_channel_methods())
        # LCKD predicts from every non-empty subset of the channels, singles first ("T1ce", ..., "T1+T1ce+T2+FLAIR")
        self.lckd_subsets = [subset.label for subset in every_channel_subset(self.dataset_json)] \
            if LCKD.name in s.methods else []
        self.modality_dropout_modalities = self.modalities if MODALITY_DROPOUT.name in s.methods else ()
        self.evaluate_on_test_set = not s.cross_validation and has_labelled_test_set(self.raw)
        self.timings: dict = {}
        # how a step's command is run: a child stopped with this process (protocol/running.py); tests record them
        self.run_command = run_command

    # ----- names and folders
    def student_configuration(self, modality: str, method: str | None = None) -> str:
        """`<teacher configuration>_<modality>`, and `...-<suffix>` for a variant of a method."""
        base = f"{self.schedule_configuration}_{modality}"
        return f"{base}-{method}" if method in VARIANTS else base

    def students(self) -> list:
        """(method or variant, modality) of every single-modality student, modality by modality."""
        return [(method, modality) for modality in self.modalities
                for method in self.student_methods + tuple(v for v, m in self.settings.variants if m == modality)]

    def model_folder(self, trainer: str, configuration: str, fold) -> str:
        return os.path.join(self.results, f"{trainer}__{self.settings.plans}__{configuration}", f"fold_{fold}")

    def prediction_folder(self, method: str, modality: str | None, fold=None) -> str:
        """nnUNetv2_predict's output folder: predictions/<name> for the held-out set (every fold's model). In
        cross-validation each fold's model predicts its own cases into predictions/fold_<f>/<name> (a folder per
        job), and the report reads predictions/all_folds/<name> (fold=None), links to all of them."""
        name = "teacher" if modality is None else f"{method}_{modality}"
        if self.evaluate_on_test_set:
            return os.path.join(self.settings.output_folder, "predictions", name)
        return os.path.join(self.settings.output_folder, "predictions", "all_folds" if fold is None else f"fold_{fold}",
                            name)

    def evaluation_cases(self, fold=None) -> list:
        if self.evaluate_on_test_set:
            folder = os.path.join(self.raw, "labelsTs")
        else:
            with open(os.path.join(self.preprocessed, "splits_final.json")) as f:
                return sorted(json.load(f)[int(fold)]["val"])
        ending = self.dataset_json["file_ending"]
        return sorted(f[:-len(ending)] for f in os.listdir(folder) if f.endswith(ending))

    # ----- the protocol
    def steps(self) -> list:
        s = self.settings
        steps = []
        plans_file = os.path.join(self.preprocessed, f"{s.plans}.json")
        steps.append(Step("plan_and_preprocess", "plan and preprocess", "preprocess", [
            _bin("nnUNetv2_plan_and_preprocess"), "-d", self.dataset_id, "-c", s.configuration, "-np",
            str(s.num_processes), "--verify_dataset_integrity"],
            # the plans file stands for the preprocessed data: a workflow engine's mark in the data folder (Snakemake
            # writes .snakemake_timestamp into folders it makes) would break nnU-Net's look at its file endings.
            # add-config edits the plans later, so later steps need it to exist, whatever its age
            inputs=[os.path.join(self.raw, "dataset.json")], outputs=[plans_file],
            done_check=lambda: os.path.isfile(plans_file) and os.path.isdir(self.data_folder()),
            environment=planner_environment))
        # nnU-Net's trainers write splits_final.json when it is missing: parallel folds would race for it
        steps.append(Step("splits", "cross-validation splits", "small", self.step_command("splits"),
                          after=[plans_file], outputs=[self.splits_file()], action=self.write_splits,
                          note=f"nnU-Net's seeded 5-fold split of the preprocessed cases into {self.splits_file()}"))
        schedule = schedule_arguments(s.schedule()) + ([] if s.final_validation else ["--no-final-validation"])
        add_config = [_bin("nnunet-protokd"), "add-config", "-d", self.dataset_id, "-p", s.plans]
        configurations = []
        if self.schedule_configuration != s.configuration:
            configurations.append((self.schedule_configuration, ["-c", s.configuration, "--name",
                                                                self.schedule_configuration] + schedule))
        configurations += [(self.student_configuration(m), ["-c", self.schedule_configuration, "-m", m])
                           for m in self.modalities]
        # a variant inherits the teacher configuration, the default teacher of the student it varies
        for variant, modality in s.variants:
            name = self.student_configuration(modality, variant)
            arguments = ["-c", self.schedule_configuration, "-m", modality, "--name", name]
            for trainer, values in VARIANTS[variant].settings.items():
                for key, value in values.items():
                    arguments += ["--set", setting_assignment(trainer, key, value)]
            configurations.append((name, arguments))
        configured = {}  # configuration -> marker of the step that added it
        for configuration, arguments in configurations:
            # add-config edits the one plans file: each waits for the one before, so that no edit is lost;
            # experiment re-applies them every time (they are idempotent), hence done_check
            previous = list(configured.values())[-1:]
            configured[configuration] = self.marker(_identifier("configure", configuration))
            steps.append(Step(_identifier("configure", configuration), f"configuration {configuration}",
                              "small", add_config + arguments, after=[plans_file] + previous,
                              outputs=[configured[configuration]], markers=True, done_check=lambda: False))
        trainings = [(TEACHER.trainer, self.schedule_configuration, fold) for fold in s.folds]
        trainings += [(LCKD.trainer, self.schedule_configuration, fold)
                      for fold in s.folds if self.lckd_subsets]
        trainings += [(MODALITY_DROPOUT.trainer, self.schedule_configuration, fold)
                      for fold in s.folds if self.modality_dropout_modalities]
        # a student started from the modality-dropout model (a variant's start_from) waits for that model
        starts = {self.student_configuration(modality, method) for method, modality in self.students()
                  if method in self.started_from_modality_dropout}
        trainings += [(method_trainer(method), self.student_configuration(modality, method), fold)
                      for method, modality in self.students() for fold in s.folds]
        for trainer, configuration, fold in trainings:
            folder = self.model_folder(trainer, configuration, fold)
            # a distilling student of fold f starts after the teacher of fold f
            waits_for = [self.final_checkpoint(TEACHER.trainer, self.schedule_configuration, fold)] \
                if trainer in distilling_trainers() else []
            if configuration in starts:
                waits_for.append(self.final_checkpoint(MODALITY_DROPOUT.trainer, self.schedule_configuration, fold))
            steps.append(Step(
                _identifier("train", trainer, configuration, "fold", fold),
                f"train {trainer} {configuration} fold {fold}", "train",
                [_bin("nnUNetv2_train"), self.dataset_id, configuration, str(fold), "-tr", trainer, "-p", s.plans,
                 "-device", s.device],
                inputs=[self.splits_file()] + waits_for,
                after=[plans_file] + ([configured[configuration]] if configuration in configured else []),
                outputs=[os.path.join(folder, "checkpoint_final.pth")],
                continue_from=os.path.join(folder, "checkpoint_latest.pth")))
        lckd_folders = [os.path.join(os.path.dirname(self.model_folder(
            LCKD.trainer, self.lckd_configuration(subset), 0)), "dataset.json")
            for subset in self.lckd_subsets]
        if self.lckd_subsets:
            steps.append(Step("lckd_subsets", "LCKD model folders for every subset of modalities", "small", [
                _bin("nnunet-protokd"), "lckd-subset", "-d", self.dataset_id, "-c", self.schedule_configuration,
                "--all", "-p", s.plans],
                inputs=[self.final_checkpoint(LCKD.trainer, self.schedule_configuration, fold)
                        for fold in s.folds], outputs=lckd_folders))
        # {modality: its subset folder's dataset.json}: one lckd-subset step each (-m takes one subset); its
        # checkpoints are sliced copies, so a retrained model's replace them (--overwrite)
        modality_dropout_folders = {modality: os.path.join(os.path.dirname(self.model_folder(
            MODALITY_DROPOUT.trainer, self.lckd_configuration(modality), 0)), "dataset.json")
            for modality in self.modality_dropout_modalities}
        for modality, folder in modality_dropout_folders.items():
            steps.append(Step(
                _identifier("subset", MODALITY_DROPOUT.trainer, modality),
                f"{MODALITY_DROPOUT.title} model folder for {modality}", "small", [
                    _bin("nnunet-protokd"), "lckd-subset", "-d", self.dataset_id, "-c", self.schedule_configuration,
                    "-tr", MODALITY_DROPOUT.trainer, "-m", modality, "-p", s.plans, "--overwrite"],
                inputs=[self.final_checkpoint(MODALITY_DROPOUT.trainer, self.schedule_configuration, fold)
                        for fold in s.folds], outputs=[folder]))
        predictions = [(TEACHER.name, None, TEACHER.trainer, self.schedule_configuration)]
        predictions += [(method, modality, method_trainer(method), self.student_configuration(modality, method))
                        for method, modality in self.students()]
        predictions += [(LCKD.name, subset, LCKD.trainer, self.lckd_configuration(subset))
                        for subset in self.lckd_subsets]
        predictions += [(MODALITY_DROPOUT.name, modality, MODALITY_DROPOUT.trainer, self.lckd_configuration(modality))
                        for modality in self.modality_dropout_modalities]
        input_sets = list(dict.fromkeys((None,) + self.modalities + tuple(self.lckd_subsets)))
        # held-out test cases: every fold's model predicts them (nnU-Net ensembles the folds); otherwise each
        # fold's model predicts its own validation cases
        prediction_folders = []
        for fold_group in ([s.folds] if self.evaluate_on_test_set else [[f] for f in s.folds]):
            where = "test" if self.evaluate_on_test_set else f"fold_{fold_group[0]}"
            for modality in input_sets:
                files = "every channel file" if modality is None else \
                    f"the {' and '.join(modality.split(MODALITY_SEPARATOR))} file(s) (as <case>_0000, ...)"
                name = _identifier("inputs", modality or "all_channels", where)
                steps.append(Step(
                    name, f"prediction inputs {modality or 'all channels'}"
                          f"{'' if self.evaluate_on_test_set else ' fold ' + str(fold_group[0])}",
                    "small", self.step_command(name),
                    inputs=[] if self.evaluate_on_test_set else [self.splits_file()],
                    output_folders=[self.input_folder(modality, fold_group[0])],
                    action=lambda modality=modality, fold=fold_group[0]: self.link_inputs(modality, fold),
                    done_check=lambda modality=modality, fold=fold_group[0]: self.inputs_ready(modality, fold),
                    note=f"symbolic links to {files} of each evaluation case in "
                         f"{self.input_folder(modality, fold_group[0])}"))
            for method, modality, trainer, configuration in predictions:
                inputs = self.input_folder(modality, fold_group[0])
                output = self.prediction_folder(method, modality, fold_group[0])
                models = lckd_folders if method == LCKD.name else \
                    [modality_dropout_folders[modality]] if method == MODALITY_DROPOUT.name else \
                    [self.final_checkpoint(trainer, configuration, fold) for fold in fold_group]
                prediction_folders.append(output)
                # probabilities too: the report measures each student's agreement with the teacher (mean KL)
                arguments = ["-i", inputs, "-o", output, "-d", self.dataset_id, "-c", configuration, "-tr", trainer,
                             "-p", s.plans, "-f", *map(str, fold_group), "-device", s.device, "--save_probabilities"]
                steps.append(Step(
                    _identifier("predict", trainer, configuration, where),
                    f"predict {trainer} {configuration} folds {' '.join(map(str, fold_group))}", "predict",
                    [_bin("nnunet-protokd"), "predict", *arguments],
                    action=(lambda arguments=arguments, trainer=trainer, configuration=configuration, inputs=inputs:
                            predict_in_this_process(self.dataset_id, trainer, s.plans, configuration, inputs,
                                                    arguments))
                    if s.predict_in_process else None,
                    inputs=[inputs] + models, output_folders=[output],
                    done_check=lambda output=output, fold=fold_group[0]: self.predictions_ready(output, fold)))
        report_folder = os.path.join(s.output_folder, "report")
        steps.append(Step("report", "report", "report", self.step_command("report"), inputs=prediction_folders,
                          outputs=[os.path.join(report_folder, name) for name in ("report.md", "summary.json")],
                          action=self.write_report, done_check=lambda: False,
                          note=f"Table 1 of the prediction folders against the reference labels, in {report_folder}"))
        names = [step.name for step in steps]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"two steps of {self.dataset_name} would share the name(s) {repeated}: rename a "
                             f"modality or configuration so that they differ in letters or digits")
        written = [path for step in steps for path in step.outputs + step.output_folders]
        assert len(written) == len(set(written)), "two steps of the protocol write the same file or folder"
        return steps

    def step_command(self, name: str) -> list:
        """The command that does one in-process step (linking inputs, splits, report) on its own."""
        return [_bin("nnunet-protokd"), "experiment", *self.settings.arguments(), "--step", name]

    def marker(self, name: str) -> str:
        return os.path.join(self.settings.output_folder, "done", name)

    def final_checkpoint(self, trainer: str, configuration: str, fold) -> str:
        return os.path.join(self.model_folder(trainer, configuration, fold), "checkpoint_final.pth")

    def data_folder(self) -> str:
        """The preprocessed data of the experiment's configuration (that of its parent for a configuration that
        inherits one)."""
        return preprocessed_data_folder(self.preprocessed, self.settings.plans, self.settings.configuration)

    def splits_file(self) -> str:
        return os.path.join(self.preprocessed, "splits_final.json")

    def write_splits(self) -> None:
        """nnU-Net's own split (nnUNetTrainer.do_split: 5 folds seeded 12345 over the sorted case identifiers)."""
        if os.path.isfile(self.splits_file()):
            return
        folder = self.data_folder()
        identifiers = sorted(infer_dataset_class(folder).get_identifiers(folder))
        write_json_atomically(generate_crossval_split(identifiers, seed=12345,
                                                     n_splits=len(CROSS_VALIDATION_FOLDS)), self.splits_file())

    def lckd_configuration(self, subset: str) -> str:
        """The configuration of a subset model folder (LCKD's, modality dropout's): <schedule>_<A+B>."""
        return subset_configuration_name(self.schedule_configuration, subset)

    # ----- held-out inputs: one folder per modality (or subset "A+B") holding <case>_0000 = A, <case>_0001 = B
    def input_folder(self, modality: str | None, fold) -> str:
        fold_part = "test" if self.evaluate_on_test_set else f"fold_{fold}"
        return os.path.join(self.settings.output_folder, "inputs", fold_part, modality or "all_channels")

    def _source(self, case: str, channel: int) -> str:
        kind = "imagesTs" if self.evaluate_on_test_set else "imagesTr"
        return os.path.join(self.raw, kind, f"{case}_{channel:04d}{self.dataset_json['file_ending']}")

    def _links(self, modality: str | None, fold) -> dict:
        channel_names = self.dataset_json["channel_names"]
        channels = ChannelSubset.of_names(self.dataset_json, channel_names.values() if modality is None
                                          else modality.split(MODALITY_SEPARATOR)).channel_indices
        ending = self.dataset_json["file_ending"]
        return {f"{case}_{i:04d}{ending}": self._source(case, c)
                for case in self.evaluation_cases(fold) for i, c in enumerate(channels)}

    def inputs_ready(self, modality, fold) -> bool:
        folder = self.input_folder(modality, fold)
        return os.path.isdir(folder) and all(os.path.exists(os.path.join(folder, n))
                                             for n in self._links(modality, fold))

    def link_inputs(self, modality, fold) -> None:
        _symlinks(self.input_folder(modality, fold), self._links(modality, fold))

    def predictions_ready(self, output: str, fold) -> bool:
        ending = self.dataset_json["file_ending"]
        return os.path.isdir(output) and all(os.path.isfile(os.path.join(output, c + ending))
                                             for c in self.evaluation_cases(fold))

    # ----- report
    def ground_truth_folder(self) -> str:
        if self.evaluate_on_test_set:
            return os.path.join(self.raw, "labelsTs")
        folder = os.path.join(self.settings.output_folder, "ground_truth")
        ending = self.dataset_json["file_ending"]
        _symlinks(folder, {case + ending: os.path.join(self.raw, "labelsTr", case + ending)
                           for fold in self.settings.folds for case in self.evaluation_cases(fold)})
        return folder

    def gather_fold_predictions(self) -> None:
        """Cross-validation: predictions/all_folds/<name> links to each fold's predictions of its own cases."""
        ending = self.dataset_json["file_ending"]
        for prediction_set in self.prediction_sets():
            method, modality = prediction_set.method, prediction_set.modality
            _symlinks(prediction_set.folder, {
                case + ending: os.path.join(self.prediction_folder(method, modality, fold), case + ending)
                for fold in self.settings.folds for case in self.evaluation_cases(fold)})

    def run_info(self) -> dict:
        s = self.settings
        return {"dataset": self.dataset_name, "folds": list(s.folds), "base_configuration": s.configuration,
                "teacher_configuration": self.schedule_configuration, "modalities": list(self.modalities),
                "methods": list(s.methods), "epochs": s.epochs or 1000,
                "iterations_per_epoch": s.iterations_per_epoch or 250,
                "evaluation": "imagesTs/labelsTs (held out)" if self.evaluate_on_test_set else "cross-validation cases",
                "device": s.device, "hardware": {"machine": platform.machine(), "processor": platform.processor(),
                                                 "cpu_count": os.cpu_count(), "cuda": torch.cuda.get_device_name(0)
                                                 if torch.cuda.is_available() else None},
                "seeds": "nnU-Net's training is not seeded (data augmentation draws its own random numbers)"
                if s.seed is None else f"trainers seeded {s.seed} (initial weights, the main process); nnU-Net's "
                                       f"augmentation workers draw their own random numbers",
                "wall_time_seconds": self.wall_times(), **s.notes}

    def benchmark_file(self, step_name: str) -> str:
        """Where the workflow has Snakemake record a step's wall time and memory."""
        return os.path.join(self.settings.output_folder, "benchmarks", f"{step_name}.tsv")

    def wall_times(self) -> dict:
        """Seconds per step title: from experiment runs (wall_times.json) and workflow jobs (Snakemake's
        benchmark files), the latest winning."""
        times = {}
        timings_file = os.path.join(self.settings.output_folder, "wall_times.json")
        if os.path.isfile(timings_file):
            with open(timings_file) as f:
                times.update(json.load(f))
        for step in self.steps():
            if os.path.isfile(self.benchmark_file(step.name)):
                with open(self.benchmark_file(step.name)) as f:
                    header, values = f.read().splitlines()[:2]
                times[step.title] = round(float(values.split("\t")[header.split("\t").index("s")]), 1)
        return {**times, **self.timings}

    def prediction_sets(self) -> list:
        sets = [PredictionSet(TEACHER.name, None, self.prediction_folder(TEACHER.name, None))]
        sets += [PredictionSet(m, modality, self.prediction_folder(m, modality)) for m, modality in self.students()]
        sets += [PredictionSet(MODALITY_DROPOUT.name, modality, self.prediction_folder(MODALITY_DROPOUT.name, modality))
                 for modality in self.modality_dropout_modalities]
        return sets + [PredictionSet(LCKD.name, subset, self.prediction_folder(LCKD.name, subset))
                       for subset in self.lckd_subsets]

    def images_folder(self) -> str:
        return os.path.join(self.raw, "imagesTs" if self.evaluate_on_test_set else "imagesTr")

    def write_report(self) -> None:
        # cross-validation: each fold's model predicts its own cases, so with several folds the fold is the trained
        # model the comparisons count as a replicate; the test set is predicted by the folds' ensemble, one model
        model_of_case = None
        if not self.evaluate_on_test_set:
            self.gather_fold_predictions()
            model_of_case = {case: f"fold {fold}" for fold in self.settings.folds
                             for case in self.evaluation_cases(fold)}
        build_report(self.ground_truth_folder(), self.dataset_json, self.prediction_sets(),
                     os.path.join(self.settings.output_folder, "report"), self.images_folder(), self.run_info(),
                     model_of_case=model_of_case)

    # ----- running
    def execute(self, step: Step, log=print) -> None:
        """Does one step: its in-process action, or its command (a training with --c if it can continue)."""
        if step.action is not None:
            step.action()
        else:
            with self.training_lock(step, log):
                # nnU-Net writes checkpoint_latest.pth in place: a run killed while writing it leaves a truncated
                # file (torch writes zip archives), on which every rerun with --c would fail in nnU-Net's loader
                if step.resumes() and not zipfile.is_zipfile(step.continue_from):
                    raise UserError(f"{step.continue_from} is damaged (a training stopped while writing it): delete "
                                    f"it to {step.title} from the start, or put back a copy of it, then run again")
                command = step.command + (["--c"] if step.resumes() else [])
                completed = self.run_command(command, env=step.environment() if step.environment else None)
            if completed.returncode != 0:
                raise StepFailed(f"step {step.name} ({step.title}) failed with exit status "
                                 f"{completed.returncode}: {shlex.join(command)}")
        for marker in step.outputs if step.markers else []:
            if not os.path.exists(marker):  # its age is what Snakemake compares: keep the first one
                os.makedirs(os.path.dirname(marker), exist_ok=True)
                open(marker, "w").close()

    @contextmanager
    def training_lock(self, step: Step, log=print):
        """A training holds its model folder's lock file (io.held_exclusively: the owner's pid and host) from before
        it decides on --c until nnUNetv2_train has ended: a second experiment, a workflow job's `--step` or a rerun
        while an earlier training of the same model still runs is refused instead of training it a second time."""
        if not step.continue_from:
            yield
            return
        folder = os.path.dirname(step.continue_from)
        os.makedirs(folder, exist_ok=True)
        with held_exclusively(os.path.join(folder, TRAINING_LOCK), f"the model folder {folder}", log):
            yield

    def run_step(self, name: str, log=print) -> None:
        """One step by name, whatever its outputs say (the workflow engine decided that it must run)."""
        steps = {step.name: step for step in self.steps()}
        if name not in steps:
            raise ValueError(f"{self.dataset_name}'s experiment has no step {name!r}; its steps: {', '.join(steps)}")
        self.execute(steps[name], log)

    def run(self, dry_run: bool = False, log=print) -> None:
        steps = self.steps()
        start = time.time()
        timings_file = os.path.join(self.settings.output_folder, "wall_times.json")
        if not dry_run:
            os.makedirs(self.settings.output_folder, exist_ok=True)
            if os.path.isfile(timings_file):  # times of steps done by an earlier, interrupted run
                with open(timings_file) as f:
                    self.timings = json.load(f)
        for number, step in enumerate(steps, 1):
            if dry_run:
                log(f"# [{number}/{len(steps)}] {step.title}" + (f": {step.note}" if step.note else ""))
                log(shlex.join(step.command))
                continue
            elapsed = time.strftime("%H:%M:%S", time.gmtime(time.time() - start))
            if step.done():
                log(f"[{number}/{len(steps)}] {step.title}: already done ({elapsed})")
                continue
            how = ""
            if step.resumes():
                how = " (continuing from checkpoint_latest.pth)"
            elif step.continue_from and os.path.isdir(os.path.dirname(step.continue_from)):
                how = " (from scratch: the model folder has neither checkpoint_final.pth nor checkpoint_latest.pth)"
            log(f"[{number}/{len(steps)}] {step.title}{how} ({elapsed})")
            step_start = time.time()
            self.execute(step, log)
            self.timings[step.title] = round(time.time() - step_start, 1)
            write_json_atomically(self.timings, timings_file, indent=1)
        if not dry_run:
            log(f"done in {time.strftime('%H:%M:%S', time.gmtime(time.time() - start))}; report: "
                f"{os.path.join(self.settings.output_folder, 'report', 'report.md')}")
