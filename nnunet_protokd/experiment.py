"""The ProtoKD paper's Table-1 protocol as one resumable sequence of nnU-Net commands.

plan/preprocess -> the multi-modality teacher -> per modality the unimodal baseline and each distilling
student -> prediction of held-out single-modality images (`nnunet-protokd predict`: nnUNetv2_predict after
checking each case's files) -> report. Each step is an nnU-Net (or plugin)
command that a user could type; a step whose result exists is skipped, a half-trained model is continued with
nnU-Net's `--c`, and `--dry-run` prints the commands instead of running them.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from nnunet_protokd.configurations import LABEL_SEPARATOR

METHOD_TRAINERS = {"unimodal": "UnimodalTrainer", "protokd": "ProtoKDTrainer", "kdnet": "KDNetTrainer",
                   "lckd": "LCKDTrainer"}
# methods that train one model on every channel instead of one student per modality
MULTI_MODALITY_METHODS = ("lckd",)
TEACHER_TRAINER = "ProtoKDTeacherTrainer"


class StepFailed(RuntimeError):
    """A command of the protocol exited with an error (its own output says why)."""


@dataclass
class Step:
    title: str
    command: list = field(default_factory=list)  # shell command, shown by --dry-run
    done: Callable[[], bool] = lambda: False
    action: Callable[[], None] | None = None  # in-process work instead of a command
    continue_if: Callable[[], bool] = lambda: False  # a half-finished training: add --c
    note: str = ""  # what an in-process action does, for --dry-run


@dataclass
class ExperimentSettings:
    dataset: str
    output_folder: str
    configuration: str = "3d_fullres"
    modalities: tuple = ()
    methods: tuple = ("unimodal", "protokd", "kdnet")
    folds: tuple = (0,)
    device: str = "cuda"
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    val_iterations_per_epoch: int | None = None
    final_validation: bool = True
    plans: str = "nnUNetPlans"
    num_processes: int = 2
    notes: dict = field(default_factory=dict)


def _bin(name: str) -> str:
    """A console script of this environment (works without activating it)."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.exists(candidate) else name


class Experiment:
    def __init__(self, settings: ExperimentSettings):
        from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw, nnUNet_results
        from nnunet_protokd.configurations import dataset_name
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
        unknown = [m for m in s.methods if m not in METHOD_TRAINERS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {sorted(METHOD_TRAINERS)}")
        schedule = [(s.epochs, "ep"), (s.iterations_per_epoch, "it"), (s.val_iterations_per_epoch, "val")]
        suffix = "_".join(f"{v}{unit}" for v, unit in schedule if v) + ("" if s.final_validation else "_nofv")
        # a schedule is its own configuration, so short runs never share a model folder with full ones
        self.teacher_configuration = f"{s.configuration}_{suffix.strip('_')}" if suffix else s.configuration
        self.student_methods = tuple(m for m in s.methods if m not in MULTI_MODALITY_METHODS)
        # LCKD predicts from every non-empty subset of the channels, singles first ("T1ce", ..., "T1+T1ce+T2+FLAIR")
        from nnunet_protokd.lckd import every_channel_subset
        self.lckd_subsets = [subset.label for subset in every_channel_subset(self.dataset_json)] \
            if "lckd" in s.methods else []
        self.evaluate_on_test_set = os.path.isdir(os.path.join(self.raw, "labelsTs"))
        self.timings: dict = {}
        self.run_command = subprocess.run  # how a step's command is run (tests record the commands instead)

    # ----- names and folders
    def student_configuration(self, modality: str) -> str:
        return f"{self.teacher_configuration}_{modality}"

    def model_folder(self, trainer: str, configuration: str, fold) -> str:
        return os.path.join(self.results, f"{trainer}__{self.settings.plans}__{configuration}", f"fold_{fold}")

    def prediction_folder(self, method: str, modality: str | None) -> str:
        name = "teacher" if modality is None else f"{method}_{modality}"
        return os.path.join(self.settings.output_folder, "predictions", name)

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
        steps.append(Step("plan and preprocess", [
            _bin("nnUNetv2_plan_and_preprocess"), "-d", self.dataset_id, "-c", s.configuration, "-np",
            str(s.num_processes), "--verify_dataset_integrity"],
            done=lambda: os.path.isfile(plans_file) and os.path.isdir(
                os.path.join(self.preprocessed, f"{s.plans}_{s.configuration}"))))
        schedule = []
        for flag, value in (("--epochs", s.epochs), ("--iterations-per-epoch", s.iterations_per_epoch),
                            ("--val-iterations-per-epoch", s.val_iterations_per_epoch)):
            schedule += [flag, str(value)] if value else []
        schedule += [] if s.final_validation else ["--no-final-validation"]
        add_config = [_bin("nnunet-protokd"), "add-config", "-d", self.dataset_id, "-p", s.plans]
        if self.teacher_configuration != s.configuration:
            steps.append(Step(f"configuration {self.teacher_configuration}", add_config + [
                "-c", s.configuration, "--name", self.teacher_configuration] + schedule))
        for modality in self.modalities:
            steps.append(Step(f"configuration {self.student_configuration(modality)}",
                              add_config + ["-c", self.teacher_configuration, "-m", modality]))
        trainings = [(TEACHER_TRAINER, self.teacher_configuration, fold) for fold in s.folds]
        trainings += [(METHOD_TRAINERS["lckd"], self.teacher_configuration, fold)
                      for fold in s.folds if self.lckd_subsets]
        trainings += [(METHOD_TRAINERS[method], self.student_configuration(modality), fold)
                      for modality in self.modalities for method in self.student_methods for fold in s.folds]
        for trainer, configuration, fold in trainings:
            folder = self.model_folder(trainer, configuration, fold)
            steps.append(Step(f"train {trainer} {configuration} fold {fold}", [
                _bin("nnUNetv2_train"), self.dataset_id, configuration, str(fold), "-tr", trainer, "-p", s.plans,
                "-device", s.device],
                done=lambda folder=folder: os.path.isfile(os.path.join(folder, "checkpoint_final.pth")),
                continue_if=lambda folder=folder: os.path.isdir(folder)))
        if self.lckd_subsets:
            steps.append(Step("LCKD model folders for every subset of modalities", [
                _bin("nnunet-protokd"), "lckd-subset", "-d", self.dataset_id, "-c", self.teacher_configuration,
                "--all", "-p", s.plans],
                done=lambda: all(os.path.isfile(os.path.join(os.path.dirname(self.model_folder(
                    METHOD_TRAINERS["lckd"], self.lckd_configuration(subset), 0)), "dataset.json"))
                    for subset in self.lckd_subsets)))
        predictions = [("teacher", None, TEACHER_TRAINER, self.teacher_configuration)]
        predictions += [(method, modality, METHOD_TRAINERS[method], self.student_configuration(modality))
                        for modality in self.modalities for method in self.student_methods]
        predictions += [("lckd", subset, METHOD_TRAINERS["lckd"], self.lckd_configuration(subset))
                        for subset in self.lckd_subsets]
        input_sets = list(dict.fromkeys((None,) + self.modalities + tuple(self.lckd_subsets)))
        # held-out test cases: every fold's model predicts them (nnU-Net ensembles the folds); otherwise each
        # fold's model predicts its own validation cases
        for fold_group in ([s.folds] if self.evaluate_on_test_set else [[f] for f in s.folds]):
            for modality in input_sets:
                where = "" if self.evaluate_on_test_set else f" fold {fold_group[0]}"
                files = "every channel file" if modality is None else \
                    f"the {' and '.join(modality.split(LABEL_SEPARATOR))} file(s) (as <case>_0000, ...)"
                steps.append(Step(f"prediction inputs {modality or 'all channels'}{where}",
                                  action=lambda modality=modality, fold=fold_group[0]: self.link_inputs(modality, fold),
                                  done=lambda modality=modality, fold=fold_group[0]: self.inputs_ready(modality, fold),
                                  note=f"symbolic links to {files} of each evaluation case in "
                                       f"{self.input_folder(modality, fold_group[0])}"))
            for method, modality, trainer, configuration in predictions:
                inputs = self.input_folder(modality, fold_group[0])
                output = self.prediction_folder(method, modality)
                steps.append(Step(f"predict {trainer} {configuration} folds {' '.join(map(str, fold_group))}", [
                    _bin("nnunet-protokd"), "predict", "-i", inputs, "-o", output, "-d", self.dataset_id, "-c",
                    configuration, "-tr", trainer, "-p", s.plans, "-f", *map(str, fold_group), "-device", s.device],
                    done=lambda output=output, fold=fold_group[0]: self.predictions_ready(output, fold)))
        steps.append(Step("report", action=self.write_report, command=self.report_command()))
        return steps

    def lckd_configuration(self, subset: str) -> str:
        from nnunet_protokd.lckd import subset_configuration_name
        return subset_configuration_name(self.teacher_configuration, subset)

    # ----- held-out inputs: one folder per modality (or subset "A+B") holding <case>_0000 = A, <case>_0001 = B
    def input_folder(self, modality: str | None, fold) -> str:
        fold_part = "test" if self.evaluate_on_test_set else f"fold_{fold}"
        return os.path.join(self.settings.output_folder, "inputs", fold_part, modality or "all_channels")

    def _source(self, case: str, channel: int) -> str:
        kind = "imagesTs" if self.evaluate_on_test_set else "imagesTr"
        return os.path.join(self.raw, kind, f"{case}_{channel:04d}{self.dataset_json['file_ending']}")

    def _links(self, modality: str | None, fold) -> dict:
        from nnunet_protokd.modality import ChannelSubset
        channel_names = self.dataset_json["channel_names"]
        channels = ChannelSubset.of_names(self.dataset_json, channel_names.values() if modality is None
                                          else modality.split(LABEL_SEPARATOR)).channel_indices
        ending = self.dataset_json["file_ending"]
        return {f"{case}_{i:04d}{ending}": self._source(case, c)
                for case in self.evaluation_cases(fold) for i, c in enumerate(channels)}

    def inputs_ready(self, modality, fold) -> bool:
        folder = self.input_folder(modality, fold)
        return os.path.isdir(folder) and all(os.path.exists(os.path.join(folder, n)) for n in self._links(modality, fold))

    def link_inputs(self, modality, fold) -> None:
        folder = self.input_folder(modality, fold)
        os.makedirs(folder, exist_ok=True)
        for name, source in self._links(modality, fold).items():
            if not os.path.exists(os.path.join(folder, name)):
                os.symlink(source, os.path.join(folder, name))

    def predictions_ready(self, output: str, fold) -> bool:
        ending = self.dataset_json["file_ending"]
        return os.path.isdir(output) and all(os.path.isfile(os.path.join(output, c + ending))
                                             for c in self.evaluation_cases(fold))

    # ----- report
    def ground_truth_folder(self) -> str:
        if self.evaluate_on_test_set:
            return os.path.join(self.raw, "labelsTs")
        folder = os.path.join(self.settings.output_folder, "ground_truth")
        os.makedirs(folder, exist_ok=True)
        ending = self.dataset_json["file_ending"]
        for fold in self.settings.folds:
            for case in self.evaluation_cases(fold):
                if not os.path.exists(os.path.join(folder, case + ending)):
                    os.symlink(os.path.join(self.raw, "labelsTr", case + ending), os.path.join(folder, case + ending))
        return folder

    def run_info(self) -> dict:
        import torch
        s = self.settings
        return {"dataset": self.dataset_name, "folds": list(s.folds), "base_configuration": s.configuration,
                "teacher_configuration": self.teacher_configuration, "modalities": list(self.modalities),
                "methods": list(s.methods), "epochs": s.epochs or 1000, "iterations_per_epoch": s.iterations_per_epoch or 250,
                "evaluation": "imagesTs/labelsTs (held out)" if self.evaluate_on_test_set else "cross-validation cases",
                "device": s.device, "hardware": {"machine": platform.machine(), "processor": platform.processor(),
                                                 "cpu_count": os.cpu_count(), "cuda": torch.cuda.get_device_name(0)
                                                 if torch.cuda.is_available() else None},
                "seeds": "nnU-Net's training is not seeded (data augmentation draws its own random numbers)",
                "wall_time_seconds": self.timings, **s.notes}

    def prediction_sets(self) -> list:
        from nnunet_protokd.report import PredictionSet
        sets = [PredictionSet("teacher", None, self.prediction_folder("teacher", None))]
        sets += [PredictionSet(m, modality, self.prediction_folder(m, modality))
                 for modality in self.modalities for m in self.student_methods]
        return sets + [PredictionSet("lckd", subset, self.prediction_folder("lckd", subset)) for subset in self.lckd_subsets]

    def images_folder(self) -> str:
        return os.path.join(self.raw, "imagesTs" if self.evaluate_on_test_set else "imagesTr")

    def report_command(self) -> list:
        """The equivalent `nnunet-protokd report` call (the experiment runs it in-process, adding run_info)."""
        ground_truth = os.path.join(self.raw, "labelsTs") if self.evaluate_on_test_set else \
            os.path.join(self.settings.output_folder, "ground_truth")
        command = [_bin("nnunet-protokd"), "report", "--ground-truth", ground_truth, "--dataset-json",
                   os.path.join(self.raw, "dataset.json"), "-o", os.path.join(self.settings.output_folder, "report"),
                   "--images", self.images_folder()]
        for prediction_set in self.prediction_sets():
            command += ["--prediction", f"{prediction_set.key}={prediction_set.folder}"]
        return command

    def write_report(self) -> None:
        from nnunet_protokd.report import build_report
        build_report(self.ground_truth_folder(), self.dataset_json, self.prediction_sets(),
                     os.path.join(self.settings.output_folder, "report"), self.images_folder(), self.run_info())

    # ----- running
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
            command = step.command + (["--c"] if not dry_run and step.continue_if() and not step.done() else [])
            if dry_run:
                log(f"# [{number}/{len(steps)}] {step.title}" + (f": {step.note}" if step.note else ""))
                if step.command:
                    log(shlex.join(command))
                continue
            elapsed = time.strftime("%H:%M:%S", time.gmtime(time.time() - start))
            if step.done():
                log(f"[{number}/{len(steps)}] {step.title}: already done ({elapsed})")
                continue
            log(f"[{number}/{len(steps)}] {step.title}{' (continuing)' if '--c' in command else ''} ({elapsed})")
            step_start = time.time()
            if step.action is not None:
                step.action()
            else:
                completed = self.run_command(command)
                if completed.returncode != 0:
                    raise StepFailed(f"step {number} ({step.title}) failed with exit status "
                                       f"{completed.returncode}: {shlex.join(command)}")
            self.timings[step.title] = round(time.time() - step_start, 1)
            with open(timings_file, "w") as f:
                json.dump(self.timings, f, indent=1)
        if not dry_run:
            log(f"done in {time.strftime('%H:%M:%S', time.gmtime(time.time() - start))}; report: "
                f"{os.path.join(self.settings.output_folder, 'report', 'report.md')}")
