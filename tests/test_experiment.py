"""`experiment`: the protocol's commands, --dry-run, and resuming a half-done experiment (commands recorded by a
stand-in for subprocess.run, so that no training runs here; the integration test trains for real)."""
import json
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import BIN, nnunet_environment, run
from nnunet_protokd.brats import NNUNET_REGIONS
from nnunet_protokd.experiment import Experiment, ExperimentSettings

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
    assert commands[1].endswith("add-config -d 777 -p nnUNetPlans -c 3d_fullres --name 3d_fullres_3ep_5it "
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
    assert "--prediction kdnet:FLAIR=" in commands[-1]
    assert steps[0] == "# [1/22] plan and preprocess" and not (workspace / "experiment").exists()


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
        if "lckd-subset" in command:  # a model folder per subset
            from nnunet_protokd.lckd import all_subsets
            names = list(CHANNELS.values())
            for subset in all_subsets(4):
                label = "+".join(names[c] for c in subset)
                folder = results / f"LCKDTrainer__nnUNetPlans__{command[command.index('-c') + 1]}_{label}"
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
    (half / "checkpoint_latest.pth").write_bytes(b"interrupted")
    preprocessed = workspace / "nnUNet_preprocessed" / DATASET
    (preprocessed / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    (preprocessed / "nnUNetPlans.json").write_text("{}")

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


def test_unknown_modality_or_method_is_refused(workspace):
    with pytest.raises(ValueError, match=r"modalities \['PD'\] are not channels of Dataset777_Tiny"):
        Experiment(settings(workspace, modalities=("PD",)))
    with pytest.raises(ValueError, match=r"unknown methods \['mmformer'\]"):
        Experiment(settings(workspace, methods=("mmformer",)))


def test_lckd_is_trained_once_and_predicts_from_every_subset(workspace):
    experiment = Experiment(settings(workspace, methods=("unimodal", "lckd"), modalities=("T1ce",)))
    preprocessed = workspace / "nnUNet_preprocessed" / DATASET
    (preprocessed / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    (preprocessed / "nnUNetPlans.json").write_text("{}")
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
    assert "protokd:T1ce" not in summary["comparisons_with_unimodal"] and "lckd:T1ce" in summary["comparisons_with_unimodal"]


def test_a_label_based_conversion_runs_the_protocol_and_is_scored_as_brats_regions(workspace):
    """`convert_brats2018.py --labels` (the ProtoKD authors' four disjoint labels, softmax): the same steps and a
    report on WT/TC/ET, as for the region dataset."""
    from nnunet_protokd.brats import NNUNET_LABELS
    raw = workspace / "nnUNet_raw" / DATASET
    dataset_json = json.loads((raw / "dataset.json").read_text())
    del dataset_json["regions_class_order"]
    (raw / "dataset.json").write_text(json.dumps({**dataset_json, "labels": NNUNET_LABELS, "brats_naming": "brats2018"}))
    dry_run = run([BIN / "nnunet-protokd", "experiment", "-d", "777", "--modalities", "T1ce", "--methods", "protokd",
                   "kdnet", "lckd", "--epochs", "3", "--iterations-per-epoch", "5", "--device", "cpu", "-o",
                   workspace / "experiment", "--dry-run"], nnunet_environment(workspace)).stdout
    assert "-tr ProtoKDTrainer" in dry_run and "-tr KDNetTrainer" in dry_run and "-tr LCKDTrainer" in dry_run
    experiment = Experiment(settings(workspace, methods=("unimodal", "protokd", "kdnet", "lckd"), modalities=("T1ce",)))
    preprocessed = workspace / "nnUNet_preprocessed" / DATASET
    (preprocessed / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    (preprocessed / "nnUNetPlans.json").write_text("{}")
    experiment.run_command = fake_nnunet(workspace, [])
    experiment.run(log=lambda message: None)
    summary = json.loads((workspace / "experiment" / "report" / "summary.json").read_text())
    assert summary["regions"] == ["WT", "TC", "ET"]
    assert {"teacher", "unimodal:T1ce", "protokd:T1ce", "kdnet:T1ce", "lckd:T1ce"} <= set(summary["results"])
    # the fake predictions are the references: every region scores 1 (ET is present, TC = ET here)
    assert all(summary["results"][key]["summary"][region]["dice_mean"] == 1.0
               for key in ("protokd:T1ce", "lckd:T1ce") for region in ("WT", "TC", "ET"))
    assert "| T1ce | ProtoKD |" in (workspace / "experiment" / "report" / "report.md").read_text()
