"""`experiment`: the protocol's commands, --dry-run, and resuming a half-done experiment (commands recorded by a
stand-in for subprocess.run, so that no training runs here; the integration test trains for real)."""
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import BIN, nnunet_environment, run

from nnunet_protokd.data.brats import NNUNET_REGIONS
from nnunet_protokd.errors import UserError
from nnunet_protokd.protocol.experiment import Experiment, ExperimentSettings

DATASET = "Dataset777_Tiny"
CHANNELS = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
CASES = ("case_a", "case_b", "case_c")


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A raw dataset with a labelled held-out set (imagesTs + labelsTs) and the nnU-Net folders set."""
    for key, value in nnunet_environment(tmp_path).items():
        if key.startswith("nnUNet_"):
            monkeypatch.setenv(key, value)
    raw = tmp_path / "nnUNet_raw" / DATASET
    for folder in ("imagesTs", "labelsTs"):
        (raw / folder).mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": CHANNELS, "labels": NNUNET_REGIONS,
                                                  "regions_class_order": [1, 2, 3], "file_ending": ".nii.gz",
                                                  "numTraining": 10}))
    labels = np.zeros((4, 6, 6), np.uint8)
    labels[1:3, 1:5, 1:5] = 1
    labels[1:3, 2:4, 2:4] = 3
    for case in CASES:
        sitk.WriteImage(sitk.GetImageFromArray(labels), str(raw / "labelsTs" / f"{case}.nii.gz"))
        for channel in CHANNELS:
            sitk.WriteImage(sitk.GetImageFromArray(labels.astype(np.float32) + int(channel)),
                            str(raw / "imagesTs" / f"{case}_{int(channel):04d}.nii.gz"))
    return tmp_path


def settings(workspace, **overrides):
    return ExperimentSettings(**{"dataset": "777", "output_folder": str(workspace / "experiment"),
                                 "modalities": ("T1ce", "FLAIR"), "device": "cpu", "epochs": 3,
                                 "iterations_per_epoch": 5, **overrides})


def test_dry_run_prints_the_nnunet_commands_and_writes_nothing(workspace):
    result = run([BIN / "nnunet-protokd", "experiment", "-d", "777", "--modalities", "T1ce", "FLAIR", "--epochs",
                  "3", "--iterations-per-epoch", "5", "--device", "cpu", "-o", workspace / "experiment", "--dry-run"],
                 nnunet_environment(workspace))
    commands = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    steps = [line for line in result.stdout.splitlines() if line.startswith("#")]
    assert commands[0].endswith("nnUNetv2_plan_and_preprocess -d 777 -c 3d_fullres -np 2 --verify_dataset_integrity")
    # a step done in-process is a command too: experiment itself, with these settings, running that one step
    experiment = f"nnunet-protokd experiment -d 777 -c 3d_fullres -p nnUNetPlans --methods unimodal protokd kdnet " \
                 f"--folds 0 --device cpu -np 2 -o {workspace}/experiment --modalities T1ce FLAIR --epochs 3 " \
                 f"--iterations-per-epoch 5 --step"
    assert commands[1].endswith(f"{experiment} splits")
    assert commands[2].endswith("add-config -d 777 -p nnUNetPlans -c 3d_fullres --name 3d_fullres_3ep_5it "
                                "--epochs 3 --iterations-per-epoch 5")
    trainings = [c.split("nnUNetv2_train ")[1] for c in commands if "nnUNetv2_train " in c]
    assert trainings == ["777 3d_fullres_3ep_5it 0 -tr ProtoKDTeacherTrainer -p nnUNetPlans -device cpu"] + [
        f"777 3d_fullres_3ep_5it_{m} 0 -tr {t} -p nnUNetPlans -device cpu"
        for m in ("T1ce", "FLAIR") for t in ("UnimodalTrainer", "ProtoKDTrainer", "KDNetTrainer")]
    predictions = [c for c in commands if "nnunet-protokd predict " in c]
    assert len(predictions) == 7
    assert f"-i {workspace}/experiment/inputs/test/T1ce -o {workspace}/experiment/predictions/protokd_T1ce" in \
           predictions[2]
    assert any("symbolic links to the T1ce file(s) (as <case>_0000, ...)" in s for s in steps)
    assert commands[-1].endswith(f"{experiment} report") and any(c.endswith(f"{experiment} inputs_T1ce_test")
                                                                  for c in commands)
    assert steps[0] == "# [1/23] plan and preprocess" and not (workspace / "experiment").exists()


def fake_preprocessing(workspace):
    """Plans and a preprocessed folder of five training cases (nnU-Net's blosc2 files, empty)."""
    preprocessed = workspace / "nnUNet_preprocessed" / DATASET
    (preprocessed / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    (preprocessed / "nnUNetPlans.json").write_text("{}")
    for case in ("tr_1", "tr_2", "tr_3", "tr_4", "tr_5"):
        for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
            (preprocessed / "nnUNetPlans_3d_fullres" / f"{case}{suffix}").touch()


def fake_nnunet(workspace, commands):
    """A stand-in for subprocess.run that records each command and writes what it would have written."""
    results = workspace / "nnUNet_results" / DATASET

    def fake_run(command, **kwargs):
        commands.append(command)
        if command[1:2] == ["predict"]:  # one label map per input case
            output = command[command.index("-o") + 1]
            shutil.copytree(workspace / "nnUNet_raw" / DATASET / "labelsTs", output, dirs_exist_ok=True)
        if "nnUNetv2_train" in command[0]:  # a final checkpoint per trained model
            _, _, configuration, fold, _, trainer = command[:6]
            folder = results / f"{trainer}__nnUNetPlans__{configuration}" / f"fold_{fold}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "checkpoint_final.pth").write_bytes(b"trained")
        if "lckd-subset" in command:  # a model folder per subset (--all) or for the one given (-m)
            from nnunet_protokd.lckd.subsets import all_subsets
            names = list(CHANNELS.values())
            trainer = command[command.index("-tr") + 1] if "-tr" in command else "LCKDTrainer"
            labels = ["+".join(names[c] for c in subset) for subset in all_subsets(4)] if "--all" in command else \
                [command[command.index("-m") + 1]]
            for label in labels:
                folder = results / f"{trainer}__nnUNetPlans__{command[command.index('-c') + 1]}_{label}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "dataset.json").write_text("{}")
        return subprocess.CompletedProcess(command, 0)
    return fake_run


def test_resuming_skips_finished_work_and_continues_half_trained_models(workspace):
    experiment = Experiment(settings(workspace, methods=("unimodal", "protokd")))
    results = workspace / "nnUNet_results" / DATASET
    teacher = results / "ProtoKDTeacherTrainer__nnUNetPlans__3d_fullres_3ep_5it" / "fold_0"
    teacher.mkdir(parents=True)
    (teacher / "checkpoint_final.pth").write_bytes(b"finished")
    half = results / "ProtoKDTrainer__nnUNetPlans__3d_fullres_3ep_5it_T1ce" / "fold_0"
    half.mkdir(parents=True)
    torch.save({"current_epoch": 1}, half / "checkpoint_latest.pth")  # interrupted
    fake_preprocessing(workspace)

    commands = []
    fake_run = fake_nnunet(workspace, commands)
    experiment.run_command = fake_run
    messages = []
    experiment.run(log=messages.append)
    names = [" ".join(c[1:]) if "nnUNetv2" in c[0] else " ".join(c[1:3]) for c in commands]
    assert not any("plan_and_preprocess" in c[0] for c in commands)  # plans exist
    assert not any("ProtoKDTeacherTrainer" in n and "nnUNetv2_train" in c[0] for n, c in zip(names, commands))
    protokd_t1ce = [c for c in commands if "nnUNetv2_train" in c[0] and "ProtoKDTrainer" in c
                    and "3d_fullres_3ep_5it_T1ce" in c]
    assert protokd_t1ce and protokd_t1ce[0][-1] == "--c"  # the interrupted model continues
    assert all(c[-1] != "--c" for c in commands if "nnUNetv2_train" in c[0] and c not in protokd_t1ce)
    assert any(m.startswith("[") and "train ProtoKDTeacherTrainer" in m and "already done" in m for m in messages)
    linked = workspace / "experiment" / "inputs" / "test" / "FLAIR" / "case_b_0000.nii.gz"
    assert linked.resolve() == workspace / "nnUNet_raw" / DATASET / "imagesTs" / "case_b_0003.nii.gz"
    summary = json.loads((workspace / "experiment" / "report" / "summary.json").read_text())
    assert summary["n_cases"] == 3 and set(summary["results"]) == {
        "teacher", "unimodal:T1ce", "protokd:T1ce", "unimodal:FLAIR", "protokd:FLAIR"}
    assert summary["run"]["wall_time_seconds"]  # what ran, and how long
    # a second run finds everything done and runs no command
    commands.clear()
    again = Experiment(settings(workspace, methods=("unimodal", "protokd")))
    again.run_command = fake_run
    again.run(log=messages.append)
    assert commands == [c for c in commands if "add-config" in " ".join(c)]


def test_planning_runs_without_n_proc_da_0_which_trainings_keep(workspace, monkeypatch):
    """nnUNet_n_proc_DA=0 (augmentation in the training process, for repeatable seeds) is a valid setting for
    training, but nnU-Net's planner sets torch's thread count from it and fails at 0: the planning step runs
    without it, every other step with the user's environment."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    experiment = Experiment(settings(workspace, methods=("unimodal",), modalities=("T1ce",)))
    environments = {}

    def record(command, env=None):
        environments[os.path.basename(command[0])] = env
        raise SystemExit  # what ran, and in which environment, is all this test needs

    experiment.run_command = record
    plan = next(step for step in experiment.steps() if step.kind == "preprocess")
    with pytest.raises(SystemExit):
        experiment.execute(plan)
    planner = environments["nnUNetv2_plan_and_preprocess"]
    assert "nnUNet_n_proc_DA" not in planner and planner["nnUNet_raw"] == os.environ["nnUNet_raw"]
    teacher = next(step for step in experiment.steps() if step.continue_from)
    with pytest.raises(SystemExit):
        experiment.execute(teacher)
    assert environments["nnUNetv2_train"] is None  # the user's environment, nnUNet_n_proc_DA=0 included


def test_unknown_modality_or_method_is_refused(workspace):
    with pytest.raises(ValueError, match=r"modalities \['PD'\] are not channels of Dataset777_Tiny"):
        Experiment(settings(workspace, modalities=("PD",)))
    with pytest.raises(ValueError, match=r"unknown methods \['mmformer'\]"):
        Experiment(settings(workspace, methods=("mmformer",)))


def test_lckd_is_trained_once_and_predicts_from_every_subset(workspace):
    experiment = Experiment(settings(workspace, methods=("unimodal", "lckd"), modalities=("T1ce",)))
    fake_preprocessing(workspace)
    commands = []
    experiment.run_command = fake_nnunet(workspace, commands)
    experiment.run(log=lambda message: None)
    trainings = [" ".join(c[1:]) for c in commands if "nnUNetv2_train" in c[0]]
    assert trainings == ["777 3d_fullres_3ep_5it 0 -tr ProtoKDTeacherTrainer -p nnUNetPlans -device cpu",
                         "777 3d_fullres_3ep_5it 0 -tr LCKDTrainer -p nnUNetPlans -device cpu",
                         "777 3d_fullres_3ep_5it_T1ce 0 -tr UnimodalTrainer -p nnUNetPlans -device cpu"]
    assert any(c[1:] == ["lckd-subset", "-d", "777", "-c", "3d_fullres_3ep_5it", "--all", "-p", "nnUNetPlans"]
               for c in commands)
    lckd_predictions = [c for c in commands if c[1:2] == ["predict"] and "LCKDTrainer" in c]
    assert len(lckd_predictions) == 15
    pair = next(c for c in lckd_predictions if c[c.index("-c") + 1] == "3d_fullres_3ep_5it_T1ce+FLAIR")
    inputs = workspace / "experiment" / "inputs" / "test" / "T1ce+FLAIR"
    assert pair[pair.index("-i") + 1] == str(inputs)
    raw_images = workspace / "nnUNet_raw" / DATASET / "imagesTs"
    assert (inputs / "case_a_0000.nii.gz").resolve() == raw_images / "case_a_0001.nii.gz"  # T1ce
    assert (inputs / "case_a_0001.nii.gz").resolve() == raw_images / "case_a_0003.nii.gz"  # FLAIR
    summary = json.loads((workspace / "experiment" / "report" / "summary.json").read_text())
    assert {k for k in summary["results"] if k.startswith("lckd:")} == {
        "lckd:" + "+".join(s) for s in (("T1",), ("T1ce",), ("T2",), ("FLAIR",), ("T1", "T1ce"), ("T1", "T2"),
                                        ("T1", "FLAIR"), ("T1ce", "T2"), ("T1ce", "FLAIR"), ("T2", "FLAIR"),
                                        ("T1", "T1ce", "T2"), ("T1", "T1ce", "FLAIR"), ("T1", "T2", "FLAIR"),
                                        ("T1ce", "T2", "FLAIR"), ("T1", "T1ce", "T2", "FLAIR"))}
    report = (workspace / "experiment" / "report" / "report.md").read_text()
    table_one, subsets = report.split("## LCKD: one model given each subset")
    assert "| T1ce | LCKD |" in table_one and "| T1ce | Unimodal |" in table_one and "T1ce+FLAIR" not in table_one
    rows = [line for line in subsets.split("## ")[0].splitlines()[3:] if line.startswith("| ")]
    assert len(rows) == 15 and rows[0].startswith("| T1 |") and rows[-1].startswith("| T1+T1ce+T2+FLAIR |")
    comparisons = summary["comparisons_with_unimodal"]
    assert "protokd:T1ce" not in comparisons and "lckd:T1ce" in comparisons


def test_modality_dropout_is_trained_once_and_predicts_from_each_student_modality_through_its_subset_folder(
        workspace):
    experiment = Experiment(settings(workspace, methods=("unimodal", "moddrop"), modalities=("T1ce", "FLAIR")))
    fake_preprocessing(workspace)
    commands = []
    experiment.run_command = fake_nnunet(workspace, commands)
    experiment.run(log=lambda message: None)
    trainings = [" ".join(c[1:]) for c in commands if "nnUNetv2_train" in c[0]]
    assert "777 3d_fullres_3ep_5it 0 -tr ModalityDropoutTrainer -p nnUNetPlans -device cpu" in trainings
    subsets = [c[1:] for c in commands if "lckd-subset" in c]
    assert subsets == [["lckd-subset", "-d", "777", "-c", "3d_fullres_3ep_5it", "-tr", "ModalityDropoutTrainer",
                        "-m", modality, "-p", "nnUNetPlans", "--overwrite"] for modality in ("T1ce", "FLAIR")]
    predictions = [c for c in commands if c[1:2] == ["predict"] and "ModalityDropoutTrainer" in c]
    assert sorted(c[c.index("-c") + 1] for c in predictions) == ["3d_fullres_3ep_5it_FLAIR", "3d_fullres_3ep_5it_T1ce"]
    t1ce = next(c for c in predictions if c[c.index("-c") + 1] == "3d_fullres_3ep_5it_T1ce")
    assert t1ce[t1ce.index("-i") + 1] == str(workspace / "experiment" / "inputs" / "test" / "T1ce")
    summary = json.loads((workspace / "experiment" / "report" / "summary.json").read_text())
    assert {"moddrop:T1ce", "moddrop:FLAIR"} <= set(summary["results"])
    assert {"moddrop:T1ce", "moddrop:FLAIR"} <= set(summary["comparisons_with_unimodal"])
    report = (workspace / "experiment" / "report" / "report.md").read_text()
    assert "| T1ce | Modality dropout |" in report


def test_a_label_based_conversion_runs_the_protocol_and_is_scored_as_brats_regions(workspace):
    """`convert_brats2018.py --labels` (the ProtoKD authors' four disjoint labels, softmax): the same steps and a
    report on WT/TC/ET, as for the region dataset."""
    from nnunet_protokd.data.brats import NNUNET_LABELS
    raw = workspace / "nnUNet_raw" / DATASET
    dataset_json = json.loads((raw / "dataset.json").read_text())
    del dataset_json["regions_class_order"]
    (raw / "dataset.json").write_text(json.dumps({**dataset_json, "labels": NNUNET_LABELS,
                                                  "brats_naming": "brats2018"}))
    dry_run = run([BIN / "nnunet-protokd", "experiment", "-d", "777", "--modalities", "T1ce", "--methods", "protokd",
                   "kdnet", "lckd", "--epochs", "3", "--iterations-per-epoch", "5", "--device", "cpu", "-o",
                   workspace / "experiment", "--dry-run"], nnunet_environment(workspace)).stdout
    assert "-tr ProtoKDTrainer" in dry_run and "-tr KDNetTrainer" in dry_run and "-tr LCKDTrainer" in dry_run
    experiment = Experiment(settings(workspace, methods=("unimodal", "protokd", "kdnet", "lckd"), modalities=("T1ce",)))
    fake_preprocessing(workspace)
    experiment.run_command = fake_nnunet(workspace, [])
    experiment.run(log=lambda message: None)
    summary = json.loads((workspace / "experiment" / "report" / "summary.json").read_text())
    assert summary["regions"] == ["WT", "TC", "ET"]
    assert {"teacher", "unimodal:T1ce", "protokd:T1ce", "kdnet:T1ce", "lckd:T1ce"} <= set(summary["results"])
    # the fake predictions are the references: every region scores 1 (ET is present, TC = ET here)
    assert all(summary["results"][key]["summary"][region]["dice_mean"] == 1.0
               for key in ("protokd:T1ce", "lckd:T1ce") for region in ("WT", "TC", "ET"))
    assert "| T1ce | ProtoKD |" in (workspace / "experiment" / "report" / "report.md").read_text()


def test_a_model_folder_without_final_or_latest_checkpoint_is_trained_anew_never_continued_from_best(workspace):
    """After a finished training nnU-Net keeps checkpoint_final.pth and checkpoint_best.pth; with the final one
    deleted, nnU-Net's --c would silently continue from the best one (another model): train from scratch."""
    results = workspace / "nnUNet_results" / DATASET
    teacher = results / "ProtoKDTeacherTrainer__nnUNetPlans__3d_fullres_3ep_5it" / "fold_0"
    teacher.mkdir(parents=True)
    (teacher / "checkpoint_best.pth").write_bytes(b"best of a finished training")
    fake_preprocessing(workspace)
    experiment = Experiment(settings(workspace, methods=("unimodal",), modalities=("T1ce",)))
    commands, messages = [], []
    experiment.run_command = fake_nnunet(workspace, commands)
    experiment.run(log=messages.append)
    teacher_training = [c for c in commands if "nnUNetv2_train" in c[0] and "ProtoKDTeacherTrainer" in c]
    assert teacher_training and "--c" not in teacher_training[0]
    assert any("train ProtoKDTeacherTrainer" in m and "from scratch" in m for m in messages)
    # nnU-Net's own split of the preprocessed cases, written before any training could race for it
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    splits = json.loads((workspace / "nnUNet_preprocessed" / DATASET / "splits_final.json").read_text())
    assert splits == generate_crossval_split(["tr_1", "tr_2", "tr_3", "tr_4", "tr_5"], seed=12345, n_splits=5)


def test_students_wait_for_their_folds_teacher_and_every_training_for_the_split(workspace):
    experiment = Experiment(settings(workspace, folds=(0, 1), methods=("unimodal", "protokd", "lckd")))
    steps = {step.name: step for step in experiment.steps()}
    teacher = {fold: steps[f"train_ProtoKDTeacherTrainer_3d_fullres_3ep_5it_fold_{fold}"].outputs[0] for fold in (0, 1)}
    for fold in (0, 1):
        student = steps[f"train_ProtoKDTrainer_3d_fullres_3ep_5it_FLAIR_fold_{fold}"]
        assert teacher[fold] in student.inputs and teacher[1 - fold] not in student.inputs
        assert student.continue_from.endswith(f"fold_{fold}/checkpoint_latest.pth")
        for independent in (f"train_UnimodalTrainer_3d_fullres_3ep_5it_FLAIR_fold_{fold}",
                            f"train_LCKDTrainer_3d_fullres_3ep_5it_fold_{fold}"):  # no teacher: in parallel with it
            assert not set(teacher.values()) & set(steps[independent].inputs)
    trainings = [step for step in steps.values() if step.kind == "train"]
    assert len(trainings) == 2 * (1 + 1 + 2 * 2)  # teacher, LCKD, two modalities x two students; per fold
    assert all(experiment.splits_file() in step.inputs for step in trainings)
    assert all(steps["plan_and_preprocess"].outputs[0] in step.after for step in trainings)
    # each add-config waits for the one before: they edit one plans file
    configure = [step for step in steps.values() if step.name.startswith("configure_")]
    assert [c.after[1:] for c in configure] == [[]] + [previous.outputs for previous in configure[:-1]]
    assert steps["report"].inputs == [s.output_folders[0] for s in steps.values() if s.kind == "predict"]


def test_settings_survive_the_command_line_that_runs_one_step(workspace):
    from nnunet_protokd.cli import build_parser
    from nnunet_protokd.commands import experiment_settings
    original = settings(workspace, folds=(0, 3), methods=("protokd", "lckd"), val_iterations_per_epoch=2,
                        final_validation=False, plans="nnUNetResEncUNetMPlans", num_processes=4)
    assert experiment_settings(build_parser().parse_args(["experiment", *original.arguments()])) == original
    with pytest.raises(ValueError, match="Dataset777_Tiny's experiment has no step 'train_teacher'; its steps: "
                                         "plan_and_preprocess, splits, configure_3d_fullres_3ep_5it_2val_nofv, "):
        Experiment(original).run_step("train_teacher")


def test_workflow_without_snakemake_is_one_line_saying_what_to_install(workspace, monkeypatch, capsys):
    import importlib.util

    from nnunet_protokd.cli import main
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "snakemake" else find_spec(name, *a))
    assert main(["experiment", "-d", "777", "--workflow", str(workspace / "workflow")]) == 1
    assert capsys.readouterr().err == "error: the workflow needs Snakemake: pip install 'nnunet-protokd[cluster]' " \
                                      "(snakemake and its SLURM executor plugin)\n"
    assert not (workspace / "workflow").exists()


def test_cross_validation_folds_predict_into_folders_of_their_own_gathered_for_the_report(workspace):
    """Each fold's models predict that fold's validation cases; one folder per job (two jobs writing one folder
    would clash on a cluster), and the report reads one folder per method linking to every fold's files: without
    a labelled test set, or with one when asked for (--cross-validation)."""
    assert Experiment(settings(workspace)).evaluate_on_test_set
    assert not Experiment(settings(workspace, cross_validation=True)).evaluate_on_test_set
    shutil.rmtree(workspace / "nnUNet_raw" / DATASET / "labelsTs")
    fake_preprocessing(workspace)
    experiment = Experiment(settings(workspace, folds=(0, 1), methods=("unimodal",), modalities=("T1ce",)))
    experiment.write_splits()
    predictions = workspace / "experiment" / "predictions"
    assert [step.output_folders[0] for step in experiment.steps() if step.kind == "predict"] == [
        str(predictions / f"fold_{fold}" / name) for fold in (0, 1) for name in ("teacher", "unimodal_T1ce")]
    for fold in (0, 1):
        for case in experiment.evaluation_cases(fold):
            (predictions / f"fold_{fold}" / "unimodal_T1ce").mkdir(parents=True, exist_ok=True)
            (predictions / f"fold_{fold}" / "unimodal_T1ce" / f"{case}.nii.gz").write_text(f"fold {fold}")
    experiment.gather_fold_predictions()
    gathered = predictions / "all_folds" / "unimodal_T1ce"
    assert str(gathered) in [s.folder for s in experiment.prediction_sets()]
    assert {p.name: p.read_text() for p in gathered.iterdir()} == {
        f"{case}.nii.gz": f"fold {fold}" for fold in (0, 1) for case in experiment.evaluation_cases(fold)}


def test_a_student_started_from_modality_dropout_trains_after_that_model_which_it_needs(workspace):
    """The variant protokd-from_moddrop (start_from=modality_dropout): its training waits for the modality-dropout
    model of its fold and comes after it in the sequential order; without moddrop among the methods it is refused
    before anything runs."""
    experiment = Experiment(settings(workspace, modalities=("T1ce",), methods=("unimodal", "protokd", "moddrop"),
                                     variants=(("protokd-from_moddrop", "T1ce"),)))
    steps = experiment.steps()
    moddrop = experiment.final_checkpoint("ModalityDropoutTrainer", experiment.schedule_configuration, 0)
    trainings = [step for step in steps if step.kind == "train"]
    started = [step for step in trainings if moddrop in step.inputs]
    assert [step.title for step in started] == [
        f"train ProtoKDTrainer {experiment.schedule_configuration}_T1ce-protokd-from_moddrop fold 0"]
    assert steps.index(started[0]) > steps.index(next(s for s in trainings if moddrop in s.outputs))
    assert any("--set ProtoKDTrainer.start_from=modality_dropout" in " ".join(map(str, step.command)) for step in steps)
    with pytest.raises(ValueError, match=r"the variants \['protokd-from_moddrop'\] start from the modality-dropout "
                                         r"model: add moddrop to the methods"):
        Experiment(settings(workspace, modalities=("T1ce",), variants=(("protokd-from_moddrop", "T1ce"),)))


def test_variants_and_seed_train_on_configurations_of_their_own_with_recorded_settings(workspace):
    """The evidence protocol's ablations: each variant is a configuration of its own (so no model folder is
    shared with the paper's setting), its settings go through add-config --set, the seed into every schedule."""
    experiment = Experiment(settings(workspace, modalities=("T1ce",), seed=3,
                                     variants=(("protokd-no_kd", "T1ce"), ("kdnet-kl_mean", "T1ce"))))
    commands = [" ".join(map(str, step.command)) for step in experiment.steps()]
    assert any(c.endswith("add-config -d 777 -p nnUNetPlans -c 3d_fullres --name 3d_fullres_3ep_5it_3seed "
                          "--epochs 3 --iterations-per-epoch 5 --seed 3") for c in commands)
    assert any(c.endswith("add-config -d 777 -p nnUNetPlans -c 3d_fullres_3ep_5it_3seed -m T1ce --name "
                          "3d_fullres_3ep_5it_3seed_T1ce-protokd-no_kd --set ProtoKDTrainer.alpha=0.0")
               for c in commands)
    trainings = [c.split("nnUNetv2_train ")[1].split(" -p")[0] for c in commands if "nnUNetv2_train " in c]
    assert trainings[-2:] == ["777 3d_fullres_3ep_5it_3seed_T1ce-protokd-no_kd 0 -tr ProtoKDTrainer",
                              "777 3d_fullres_3ep_5it_3seed_T1ce-kdnet-kl_mean 0 -tr KDNetTrainer"]
    assert [(p.method, p.modality) for p in experiment.prediction_sets()][-2:] == [
        ("protokd-no_kd", "T1ce"), ("kdnet-kl_mean", "T1ce")]
    with pytest.raises(ValueError, match=r"unknown variants \['protokd-no_kd:FLAIR'\]"):
        Experiment(settings(workspace, modalities=("T1ce",), variants=(("protokd-no_kd", "FLAIR"),)))
    from nnunet_protokd.cli import build_parser
    from nnunet_protokd.commands import experiment_settings
    original = settings(workspace, modalities=("T1ce",), seed=0, variants=(("protokd-intra", "T1ce"),),
                        predict_in_process=True, cross_validation=True)
    assert experiment_settings(build_parser().parse_args(["experiment", *original.arguments()])) == original


def test_a_custom_configuration_inheriting_a_planned_one_reads_the_parents_preprocessed_data(workspace):
    """nnU-Net's documented way to vary a configuration: `3d_custom` inherits `3d_fullres` and its data_identifier;
    there is no nnUNetPlans_3d_custom folder (the splits step died looking for one)."""
    fake_preprocessing(workspace)
    preprocessed = workspace / "nnUNet_preprocessed" / DATASET
    (preprocessed / "nnUNetPlans.json").write_text(json.dumps({"plans_name": "nnUNetPlans", "configurations": {
        "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "architecture": {}},
        "3d_custom": {"inherits_from": "3d_fullres", "batch_size": 4}}}))
    experiment = Experiment(settings(workspace, configuration="3d_custom", epochs=None, iterations_per_epoch=None))
    assert experiment.data_folder() == str(preprocessed / "nnUNetPlans_3d_fullres")
    assert experiment.steps()[0].done()  # preprocessed already: not planned again
    experiment.write_splits()
    splits = json.loads((preprocessed / "splits_final.json").read_text())
    assert sorted(splits[0]["train"] + splits[0]["val"]) == ["tr_1", "tr_2", "tr_3", "tr_4", "tr_5"]


def test_a_truncated_checkpoint_latest_is_named_with_what_to_do(workspace):
    """A training killed while nnU-Net wrote checkpoint_latest.pth: every rerun with --c failed in nnU-Net's
    loader with a traceback."""
    fake_preprocessing(workspace)
    experiment = Experiment(settings(workspace, methods=("unimodal",), modalities=("T1ce",)))
    folder = workspace / "nnUNet_results" / DATASET / "ProtoKDTeacherTrainer__nnUNetPlans__3d_fullres_3ep_5it"
    folder = folder / "fold_0"
    folder.mkdir(parents=True)
    torch.save({"network_weights": {"w": torch.zeros(1000)}}, folder / "checkpoint_latest.pth")
    whole = (folder / "checkpoint_latest.pth").read_bytes()
    (folder / "checkpoint_latest.pth").write_bytes(whole[:len(whole) // 2])
    commands = []
    experiment.run_command = fake_nnunet(workspace, commands)
    with pytest.raises(UserError, match=re.escape(
            f"{folder / 'checkpoint_latest.pth'} is damaged (a training stopped while writing it): delete it to train "
            f"ProtoKDTeacherTrainer 3d_fullres_3ep_5it fold 0 from the start, or put back a copy of it, then run "
            f"again")):
        experiment.run(log=lambda _: None)
    assert not any("nnUNetv2_train" in c[0] for c in commands)
