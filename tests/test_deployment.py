"""A student where only nnU-Net is installed (README "At a site with nnU-Net only"), and nnU-Net's own tools on
students.

`nnunet-protokd export` -> `nnUNetv2_install_pretrained_model_from_zip` -> `nnUNetv2_predict` in a plugin-free
environment: a fresh virtual environment (`python -m venv`) that sees this environment's installed packages
(nnunetv2, torch, ...) through one .pth line but runs none of its .pth hooks (so neither the plugin's editable
install nor its trainer-path hook), with `nnUNet_extTrainer` unset and a sitecustomize that refuses, and records,
any import of `nnunet_protokd` or of a module of trainers/. Its prediction must equal, voxel for voxel, the
plugin's own prediction from the student's model folder.

One small phantom dataset, a 4-channel teacher and two T1ce students (ProtoKD, Unimodal), one epoch of two
iterations each, trained without final validation; then `nnUNetv2_train --val --npz` without the teacher,
`nnUNetv2_find_best_configuration` and `nnUNetv2_apply_postprocessing`; `nnUNetv2_ensemble` of the two
installed students' predictions runs in the plugin-free environment.
"""
import json
import os
import shutil
import stat
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import BIN, REPO, copy_phantoms, nnunet_environment, protokd_in_process, run, train_in_process

import nnunet_protokd

DATASET = "Dataset501_BraTS2018"
STUDENT_CONFIGURATION = "3d_tiny_T1ce"
PROTOKD = f"ProtoKDTrainer__nnUNetPlans__{STUDENT_CONFIGURATION}"
UNIMODAL = f"UnimodalTrainer__nnUNetPlans__{STUDENT_CONFIGURATION}"
TEACHER = "ProtoKDTeacherTrainer__nnUNetPlans__3d_tiny"
EXPORTED = {"ProtoKDTrainer": f"nnUNetTrainer__nnUNetPlans__{STUDENT_CONFIGURATION}_ProtoKD",
            "UnimodalTrainer": f"nnUNetTrainer__nnUNetPlans__{STUDENT_CONFIGURATION}_Unimodal"}
T1CE = 1


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, preprocessed_phantoms) -> Path:
    root = tmp_path_factory.mktemp("deployment")
    copy_phantoms(preprocessed_phantoms, root)  # converted, planned and preprocessed once per session
    protokd_in_process(root, "add-config", "-d", "501", "-c", "3d_fullres", "--name", "3d_tiny", "--epochs", "1",
                       "--iterations-per-epoch", "2", "--val-iterations-per-epoch", "1", "--no-final-validation",
                       "--set", "LCKDTrainer.election_batches=1")
    protokd_in_process(root, "add-config", "-d", "501", "-c", "3d_tiny", "-m", "T1ce")
    train_in_process(root, "501", "3d_tiny", "0", "-tr", "ProtoKDTeacherTrainer", "-device", "cpu")
    for student in ("ProtoKDTrainer", "UnimodalTrainer"):
        train_in_process(root, "501", STUDENT_CONFIGURATION, "0", "-tr", student, "-device", "cpu")
    single = root / "t1ce_only"
    single.mkdir()
    for image in sorted((root / "nnUNet_raw" / DATASET / "imagesTr").glob(f"*_{T1CE:04d}.nii.gz"))[:2]:
        shutil.copy(image, single / image.name.replace(f"_{T1CE:04d}.nii.gz", "_0000.nii.gz"))
    return root


def export(workspace, trainer, output, expect_success=True):
    return run([BIN / "nnunet-protokd", "export", "-d", "501", "-c", STUDENT_CONFIGURATION, "-tr", trainer, "-f", "0",
                "-o", output], nnunet_environment(workspace), expect_success=expect_success)


@pytest.fixture(scope="module")
def exported(workspace) -> dict:
    """Both students' zips, exported before anything validated them (the command in this process; the tests of
    its refusals run it as a user does)."""
    zips = {trainer: workspace / f"{trainer}.zip" for trainer in EXPORTED}
    for trainer, output in zips.items():
        protokd_in_process(workspace, "export", "-d", "501", "-c", STUDENT_CONFIGURATION, "-tr", trainer, "-f", "0",
                           "-o", output)
    return zips


def members(zip_file) -> dict:
    with zipfile.ZipFile(zip_file) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def load_checkpoint_bytes(data: bytes) -> dict:
    import io

    from nnunet_protokd.io import load_checkpoint_weights_only
    return load_checkpoint_weights_only(io.BytesIO(data))


def test_export_writes_a_plain_nnunet_model_folder_with_its_card(workspace, exported):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_protokd.io import sha256_of
    files = members(exported["ProtoKDTrainer"])
    folder = f"{DATASET}/{EXPORTED['ProtoKDTrainer']}/"
    assert {folder + f for f in ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth", "model_card.md",
                                 "model_card.json", "convert_predictions_to_brats.py")} <= set(files)
    assert all(name.startswith(folder) for name in files)
    assert not any("validation" in name for name in files)  # trained without final validation: none to ship
    dataset_json = json.loads(files[folder + "dataset.json"])
    plans = json.loads(files[folder + "plans.json"])
    assert dataset_json["channel_names"] == {"0": "T1ce"}
    checkpoint = load_checkpoint_bytes(files[folder + "fold_0/checkpoint_final.pth"])
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    assert checkpoint["init_args"]["configuration"] == f"{STUDENT_CONFIGURATION}_ProtoKD"
    # the weights are exactly nnU-Net's own one-channel network: nothing of the teacher
    plans_manager = PlansManager(plans)
    network = nnUNetTrainer.build_network_architecture(
        plans_manager, plans_manager.get_configuration(f"{STUDENT_CONFIGURATION}_ProtoKD"), 1, 3, False)
    assert set(checkpoint["network_weights"]) == set(network.state_dict())
    assert checkpoint["network_weights"]["encoder.stages.0.0.convs.0.conv.weight"].shape[1] == 1
    original = load_checkpoint_bytes((workspace / "nnUNet_results" / DATASET / PROTOKD / "fold_0" /
                                      "checkpoint_final.pth").read_bytes())
    for key, value in original["network_weights"].items():
        assert np.array_equal(checkpoint["network_weights"][key].numpy(), value.numpy())

    card = json.loads(files[folder + "model_card.json"])
    teacher_checkpoint = workspace / "nnUNet_results" / DATASET / TEACHER / "fold_0" / "checkpoint_final.pth"
    assert card["model"]["needs_plugin"] is False and card["model"]["configuration"] == "3d_tiny_T1ce_ProtoKD"
    record = json.loads((workspace / "nnUNet_results" / DATASET / PROTOKD / "fold_0" / "distillation.json").read_text())
    assert card["method"] == {"name": "ProtoKD", "trainer": "ProtoKDTrainer", "modality": "T1ce",
                              "settings": record["settings"], "trained_with_plugin_version": nnunet_protokd.__version__}
    assert record["settings"]["alpha"] == 10.0  # the resolved settings, defaults included
    assert card["input"]["files"] == {"<case>_0000.nii.gz": "T1ce"}
    assert "skull-stripped" in card["input"]["rule"] and card["input"]["normalization"][0]["scheme"] == \
           "ZScoreNormalization"
    assert card["teacher"]["0"]["sha256"] == sha256_of(str(teacher_checkpoint))
    assert card["teacher"]["0"]["checkpoint"] == str(teacher_checkpoint)
    assert card["training_data"]["cases"] == 5 and card["training_data"]["folds"] == [0]
    assert card["validation"] == {"0": None}
    assert card["labels"]["brats_back_conversion"]["nnunet_to_brats"] == {"0": 0, "1": 2, "2": 1, "3": 4}
    assert card["versions"]["nnunetv2"] == "2.8.1" and card["usage"][0] == "pip install nnunetv2==2.8.1"
    assert card["usage"][-1].startswith(f"nnUNetv2_predict -d {DATASET} -c 3d_tiny_T1ce_ProtoKD -tr nnUNetTrainer")
    markdown = files[folder + "model_card.md"].decode()
    assert "`<case>_0000.nii.gz` = T1ce" in markdown and "final validation did not run" in markdown
    # a unimodal student of the same modality goes to another folder, with no teacher on its card
    unimodal = members(exported["UnimodalTrainer"])
    assert all(name.startswith(f"{DATASET}/{EXPORTED['UnimodalTrainer']}/") for name in unimodal)
    assert json.loads(unimodal[f"{DATASET}/{EXPORTED['UnimodalTrainer']}/model_card.json"])["teacher"] is None


BLOCKER = '''"""Installed by the test: this interpreter must not use the nnunet-protokd plugin."""
import sys

BLOCKED = {blocked!r}
LOG = {log!r}


class PluginImportBlocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            with open(LOG, "a") as f:
                f.write(name + "\\n")
            raise ImportError(f"plugin-free environment: import of {{name}} refused")
        return None


sys.meta_path.insert(0, PluginImportBlocker())
'''


def plugin_free_environment(folder: Path, results: Path) -> tuple[dict, Path, Path]:
    """(environment, bin folder, blocked-import log) of a fresh venv that has nnU-Net but not the plugin."""
    venv = folder / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    site_packages = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    # nnunetv2 and its dependencies as installed here; the .pth files in there (the plugin's editable install and
    # its trainer-path hook) are not run, because that folder is appended to sys.path, not added as a site dir
    (site_packages / "nnunet_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for script in ("nnUNetv2_install_pretrained_model_from_zip", "nnUNetv2_predict", "nnUNetv2_ensemble"):
        body = (BIN / script).read_text().split("\n", 1)[1]
        (venv / "bin" / script).write_text(f"#!{venv / 'bin' / 'python'}\n{body}")
        (venv / "bin" / script).chmod(stat.S_IRWXU)
    guard, log = folder / "guard", folder / "blocked_imports.txt"
    guard.mkdir()
    blocked = {"nnunet_protokd"} | {path.stem for path in (REPO / "trainers").glob("*.py")}
    (guard / "sitecustomize.py").write_text(BLOCKER.format(blocked=sorted(blocked), log=str(log)))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("nnUNet_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(guard), PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
               nnUNet_results=str(results), OMP_NUM_THREADS="1", nnUNet_def_n_proc="1", PYTHONWARNINGS="ignore")
    return env, venv / "bin", log


def labels_of(folder: Path) -> dict:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*.nii.gz"))}


def test_nnunet_alone_installs_the_zips_and_predicts_what_the_plugin_predicts(workspace, exported, tmp_path):
    clinic = tmp_path / "clinic"
    clinic.mkdir()
    results = clinic / "nnUNet_results"
    env, bin_folder, blocked_log = plugin_free_environment(clinic, results)
    # the environment is what it claims: no plugin, no trainer folder, nnU-Net present
    probe = run([bin_folder / "python", "-c", "import os, nnunetv2; print(os.environ.get('nnUNet_extTrainer')); "
                                              "import nnunet_protokd"], env, expect_success=False, cwd=clinic)
    assert probe.stdout.strip() == "None" and "import of nnunet_protokd refused" in probe.stderr
    blocked_log.unlink()

    for trainer in ("ProtoKDTrainer", "UnimodalTrainer"):  # two students of one modality, side by side
        run([bin_folder / "nnUNetv2_install_pretrained_model_from_zip", exported[trainer]], env, cwd=clinic)
    installed = results / DATASET
    assert sorted(os.listdir(installed)) == sorted(EXPORTED.values())
    for method in ("ProtoKD", "Unimodal"):
        run([bin_folder / "nnUNetv2_predict", "-d", "501", "-c", f"{STUDENT_CONFIGURATION}_{method}", "-f", "0",
             "-i", workspace / "t1ce_only", "-o", clinic / method, "-device", "cpu", "-npp", "0", "-nps", "0",
             "--save_probabilities"], env, cwd=clinic)
    run([BIN / "nnUNetv2_predict", "-d", "501", "-c", STUDENT_CONFIGURATION, "-tr", "ProtoKDTrainer", "-f", "0",
         "-i", workspace / "t1ce_only", "-o", tmp_path / "plugin", "-device", "cpu", "-npp", "0", "-nps", "0"],
        nnunet_environment(workspace))
    plain, plugin = labels_of(clinic / "ProtoKD"), labels_of(tmp_path / "plugin")
    assert len(plain) == 2 and plain.keys() == plugin.keys()
    for case in plain:
        assert np.array_equal(plain[case], plugin[case]), case

    # BraTS labels with the script shipped in the model folder, in the same plugin-free environment
    script = installed / EXPORTED["ProtoKDTrainer"] / "convert_predictions_to_brats.py"
    run([bin_folder / "python", script, clinic / "ProtoKD", clinic / "brats"], env, cwd=clinic)
    from nnunet_protokd.data.brats import nnunet_to_brats_labels
    brats = labels_of(clinic / "brats")
    for case in plain:
        assert np.array_equal(brats[case], nnunet_to_brats_labels(plain[case]))
    # nnU-Net's ensembling of the two students' predictions (method ensemble), also without the plugin
    run([bin_folder / "nnUNetv2_ensemble", "-i", clinic / "ProtoKD", clinic / "Unimodal", "-o", clinic / "ensemble",
         "-np", "1"], env, cwd=clinic)
    ensemble = labels_of(clinic / "ensemble")
    assert ensemble.keys() == plain.keys()
    assert all(ensemble[c].shape == plain[c].shape and set(np.unique(ensemble[c])) <= {0, 1, 2, 3} for c in plain)
    assert not blocked_log.exists(), blocked_log.read_text()  # nothing tried to use the plugin


@pytest.fixture(scope="module")
def validated(workspace, exported):
    """nnU-Net's validation of the ProtoKD student with its teacher moved away (after the exports above), then
    nnUNetv2_find_best_configuration on it."""
    env = nnunet_environment(workspace)
    teacher = workspace / "nnUNet_results" / DATASET / TEACHER
    hidden = teacher.with_name(teacher.name + ".moved")
    os.rename(teacher, hidden)
    try:
        run([BIN / "nnUNetv2_train", "501", STUDENT_CONFIGURATION, "0", "-tr", "ProtoKDTrainer", "--val", "--npz",
             "-device", "cpu"], env)
        # training the student again does need its teacher: refused before any step
        train_again = run([BIN / "nnUNetv2_train", "501", STUDENT_CONFIGURATION, "0", "-tr", "ProtoKDTrainer",
                           "-device", "cpu"], env, expect_success=False)
    finally:
        os.rename(hidden, teacher)
    best = run([BIN / "nnUNetv2_find_best_configuration", "501", "-c", STUDENT_CONFIGURATION, "-tr", "ProtoKDTrainer",
                "-f", "0", "-np", "1", "--disable_ensembling"], env)
    return {"train_again": train_again, "find_best": best}


def test_a_student_validates_without_its_teacher(workspace, validated):
    train_again = validated["train_again"]
    assert train_again.returncode != 0 and "checkpoint_final.pth does not exist. Train it first" in train_again.stderr
    validation = workspace / "nnUNet_results" / DATASET / PROTOKD / "fold_0" / "validation"
    summary = json.loads((validation / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 1 and set(summary["mean"]) == {"(1, 2, 3)", "(2, 3)", "(3,)"}
    assert len(list(validation.glob("*.npz"))) == 1
    logs = (workspace / "nnUNet_results" / DATASET / PROTOKD / "fold_0").glob("training_log_*.txt")
    assert any("no teacher (validation and prediction only)" in log.read_text() for log in logs)


def test_nnunet_finds_the_best_configuration_and_postprocesses_a_student(workspace, validated, tmp_path):
    results = workspace / "nnUNet_results" / DATASET
    assert f"*Best*: {PROTOKD}" in validated["find_best"].stdout
    postprocessing = results / PROTOKD / "crossval_results_folds_0" / "postprocessing.pkl"
    instructions = json.loads((results / "inference_information.json").read_text())
    assert instructions["best_model_or_ensemble"]["postprocessing_file"] == str(postprocessing)
    run([BIN / "nnUNetv2_apply_postprocessing", "-i", results / PROTOKD / "fold_0" / "validation", "-o",
         tmp_path / "postprocessed", "-pp_pkl_file", postprocessing, "-np", "1", "-plans_json",
         results / PROTOKD / "plans.json", "-dataset_json", results / PROTOKD / "dataset.json"],
        nnunet_environment(workspace))
    reference = labels_of(workspace / "nnUNet_preprocessed" / DATASET / "gt_segmentations")
    postprocessed = labels_of(tmp_path / "postprocessed")
    assert len(postprocessed) == 1
    for case, label_map in postprocessed.items():
        assert label_map.shape == reference[case].shape and set(np.unique(label_map)) <= {0, 1, 2, 3}


def test_export_after_validation_carries_the_validation_dice_and_postprocessing(workspace, validated, tmp_path):
    export(workspace, "ProtoKDTrainer", tmp_path / "validated.zip")
    files = members(tmp_path / "validated.zip")
    folder = f"{DATASET}/{EXPORTED['ProtoKDTrainer']}/"
    source = workspace / "nnUNet_results" / DATASET / PROTOKD
    summary = json.loads((source / "fold_0" / "validation" / "summary.json").read_text())
    assert json.loads(files[folder + "fold_0/validation/summary.json"]) == summary
    assert files[folder + "crossval_results_folds_0/postprocessing.pkl"] == \
           (source / "crossval_results_folds_0" / "postprocessing.pkl").read_bytes()
    card = json.loads(files[folder + "model_card.json"])
    assert card["validation"]["0"]["cases"] == 1
    assert card["validation"]["0"]["dice"] == {"whole tumor": summary["mean"]["(1, 2, 3)"]["Dice"],
                                               "tumor core": summary["mean"]["(2, 3)"]["Dice"],
                                               "enhancing tumor": summary["mean"]["(3,)"]["Dice"],
                                               "foreground mean": summary["foreground_mean"]["Dice"]}


@pytest.mark.parametrize("trainer, configuration, fold, message", [
    ("ProtoKDTrainer", STUDENT_CONFIGURATION, "1", "fold 1 of .* is not trained: .*fold_1/checkpoint_final.pth does "
                                                   "not exist"),
    ("ProtoKDTeacherTrainer", "3d_tiny", "0", "is a 4-channel model \\(T1, T1ce, T2, FLAIR\\), not a student"),
    ("ProtoKDTrainer", "3d_fullres_T1ce", "0", "no model folder .*ProtoKDTrainer__nnUNetPlans__3d_fullres_T1ce"),
])
def test_bad_exports_stop_with_one_line_and_write_nothing(workspace, tmp_path, trainer, configuration, fold, message):
    import re
    output = tmp_path / "model.zip"
    result = run([BIN / "nnunet-protokd", "export", "-d", "501", "-c", configuration, "-tr", trainer, "-f", fold,
                  "-o", output], nnunet_environment(workspace), expect_success=False)
    assert result.returncode == 1 and re.search(message, result.stderr), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and os.listdir(tmp_path) == []


def test_an_existing_output_is_not_overwritten(workspace, exported):
    before = exported["UnimodalTrainer"].read_bytes()
    result = export(workspace, "ProtoKDTrainer", exported["UnimodalTrainer"], expect_success=False)
    assert result.returncode == 1 and "exists; pass --overwrite to replace it" in result.stderr
    assert exported["UnimodalTrainer"].read_bytes() == before
    assert not [f for f in os.listdir(workspace) if f.startswith(".tmp_")]


def test_an_lckd_subset_model_exports_unchanged_with_a_card_that_asks_for_the_plugin(workspace, tmp_path):
    env = nnunet_environment(workspace)
    run([BIN / "nnUNetv2_train", "501", "3d_tiny", "0", "-tr", "LCKDTrainer", "-device", "cpu"], env)
    protokd_in_process(workspace, "lckd-subset", "-d", "501", "-c", "3d_tiny", "-m", "T1ce")
    run([BIN / "nnunet-protokd", "export", "-d", "501", "-c", "3d_tiny_T1ce", "-tr", "LCKDTrainer", "-o",
         tmp_path / "lckd.zip"], env)
    folder = f"{DATASET}/LCKDTrainer__nnUNetPlans__3d_tiny_T1ce/"
    files = members(tmp_path / "lckd.zip")
    trained = workspace / "nnUNet_results" / DATASET / "LCKDTrainer__nnUNetPlans__3d_tiny" / "fold_0"
    assert files[folder + "fold_0/checkpoint_final.pth"] == (trained / "checkpoint_final.pth").read_bytes()
    assert files[folder + "fold_0/lckd_elections.json"] == (trained / "lckd_elections.json").read_bytes()
    assert json.loads(files[folder + "dataset.json"])["channel_names"] == {"0": "T1ce"}
    card = json.loads(files[folder + "model_card.json"])
    assert card["model"]["needs_plugin"] is True and card["method"]["modality"] == "T1ce"
    # the settings LCKD trained with (its record), not the subset configuration's
    assert card["method"]["settings"] == json.loads((trained / "distillation.json").read_text())["settings"]
    assert card["method"]["settings"]["election_batches"] == 1
    assert "nnunet-protokd register-trainers" in card["usage"] and card["usage"][-1].startswith(
        f"nnUNetv2_predict -d {DATASET} -c 3d_tiny_T1ce -tr LCKDTrainer")
    assert "needs the nnunet-protokd plugin installed" in files[folder + "model_card.md"].decode()
