"""End to end on CPU, as a user runs it: phantoms -> conversion -> plan/preprocess -> teacher, unimodal,
ProtoKD and KD-Net students and an LCKD model (a few iterations) -> nnUNetv2_predict on single-modality files
and on a subset of modalities.

On the session's converted and preprocessed phantoms (conftest); about ten minutes on a 2-core CPU. The commands
are the README's, with a short schedule. The benchmark's real steps (mixed precision, compile) are
test_benchmark's, nnU-Net's ResEnc plans test_resenc's.
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import BIN, copy_phantoms, nnunet_environment, protokd_in_process, run, train_in_process

DATASET = "Dataset501_BraTS2018"
TEACHER = "ProtoKDTeacherTrainer__nnUNetPlans__3d_smoke"
STUDENT = "UnimodalTrainer__nnUNetPlans__3d_smoke_T1ce"
PROTOKD = "ProtoKDTrainer__nnUNetPlans__3d_smoke_T1ce"
KDNET = "KDNetTrainer__nnUNetPlans__3d_smoke_T1ce"
LCKD = "LCKDTrainer__nnUNetPlans__3d_lckd"
DISTILLED = {PROTOKD: ("kd_loss", "proto_loss"), KDNET: ("kd_loss", "kl_loss")}
T1CE = 1  # channel of T1ce in the converted dataset


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, preprocessed_phantoms) -> Path:
    """The session's converted and preprocessed phantoms (5 training cases, 3 held out: conftest), then the README's
    commands."""
    root = tmp_path_factory.mktemp("integration")
    env = nnunet_environment(root)
    copy_phantoms(preprocessed_phantoms, root)
    protokd_in_process(root, "add-config", "-d", "501", "-c", "3d_fullres", "--name", "3d_smoke", "--epochs", "2",
                       "--iterations-per-epoch", "4", "--val-iterations-per-epoch", "2")
    protokd_in_process(root, "add-config", "-d", "501", "-c", "3d_smoke", "-m", "T1ce")
    run([BIN / "nnUNetv2_train", "501", "3d_smoke", "0", "-tr", "ProtoKDTeacherTrainer", "-device", "cpu"], env)
    for student in ("UnimodalTrainer", "ProtoKDTrainer", "KDNetTrainer"):  # nnU-Net's entry point, in this process
        train_in_process(root, "501", "3d_smoke_T1ce", "0", "-tr", student, "-device", "cpu")
    # LCKD: epoch 0 with every modality, epochs 1-2 with random subsets; an election before each epoch
    protokd_in_process(root, "add-config", "-d", "501", "-c", "3d_fullres", "--name", "3d_lckd", "--epochs", "3",
                       "--iterations-per-epoch", "4", "--val-iterations-per-epoch", "2",
                       "--set", "LCKDTrainer.election_interval=1", "--set", "LCKDTrainer.full_modality_fraction=0.34",
                       "--set", "LCKDTrainer.election_batches=2")
    train_in_process(root, "501", "3d_lckd", "0", "-tr", "LCKDTrainer", "-device", "cpu")
    single = root / "t1ce_only"
    single.mkdir()
    for image in sorted((root / "nnUNet_raw" / DATASET / "imagesTs").glob(f"*_{T1CE:04d}.nii.gz")):
        shutil.copy(image, single / image.name.replace(f"_{T1CE:04d}.nii.gz", "_0000.nii.gz"))
    return root


def predict(workspace, input_folder, output_folder, configuration, trainer, expect_success=True):
    return run([BIN / "nnUNetv2_predict", "-i", input_folder, "-o", output_folder, "-d", "501", "-c", configuration,
                "-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0"],
               nnunet_environment(workspace), expect_success=expect_success)


def test_teacher_and_student_trained_with_the_configured_schedule(workspace):
    results = workspace / "nnUNet_results" / DATASET
    for model in (TEACHER, STUDENT, PROTOKD, KDNET):
        debug = json.loads((results / model / "fold_0" / "debug.json").read_text())
        assert debug["num_epochs"] == "2" and debug["num_iterations_per_epoch"] == "4"
        assert (results / model / "fold_0" / "checkpoint_final.pth").is_file()
        summary = json.loads((results / model / "fold_0" / "validation" / "summary.json").read_text())
        assert len(summary["metric_per_case"]) == 1  # nnU-Net's final validation ran on fold 0's case
        assert set(summary["mean"]) == {"(1, 2, 3)", "(2, 3)", "(3,)"}  # regions WT, TC, ET


def test_student_model_folder_is_single_channel(workspace):
    folder = workspace / "nnUNet_results" / DATASET / STUDENT
    dataset_json = json.loads((folder / "dataset.json").read_text())
    plans = json.loads((folder / "plans.json").read_text())
    preprocessed = json.loads((workspace / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    assert dataset_json["channel_names"] == {"0": "T1ce"}
    assert plans["configurations"]["3d_smoke_T1ce"]["protokd"]["modality"] == "T1ce"
    # T1ce is normalised with T1ce's statistics
    assert plans["foreground_intensity_properties_per_channel"]["0"] == \
           preprocessed["foreground_intensity_properties_per_channel"][str(T1CE)]
    log = next((folder / "fold_0").glob("training_log_*.txt")).read_text()
    assert "student modality: T1ce (channel 1" in log


@pytest.fixture(scope="module")
def t1ce_predictions(workspace) -> Path:
    """nnUNetv2_predict of the unimodal student on the held-out cases' T1ce files."""
    output = workspace / "predicted_t1ce"
    predict(workspace, workspace / "t1ce_only", output, "3d_smoke_T1ce", "UnimodalTrainer")
    return output


def test_single_modality_prediction_keeps_geometry_and_labels(workspace, t1ce_predictions):
    output = t1ce_predictions
    inputs = sorted((workspace / "t1ce_only").glob("*_0000.nii.gz"))
    assert len(inputs) == 3
    for image_path in inputs:
        prediction = sitk.ReadImage(str(output / image_path.name.replace("_0000.nii.gz", ".nii.gz")))
        image = sitk.ReadImage(str(image_path))
        assert prediction.GetSize() == image.GetSize() and prediction.GetSpacing() == image.GetSpacing()
        assert prediction.GetOrigin() == image.GetOrigin() and prediction.GetDirection() == image.GetDirection()
        assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1, 2, 3}


def test_student_refuses_four_channel_input(workspace):
    four = workspace / "four_channels"
    shutil.copytree(workspace / "nnUNet_raw" / DATASET / "imagesTs", four)
    result = predict(workspace, four, workspace / "bad1", "3d_smoke_T1ce", "UnimodalTrainer", expect_success=False)
    assert result.returncode != 0
    assert "takes 1 input channel(s) per case (<case>_0000 = T1ce only) but received 4" in result.stderr


def test_predict_command_checks_file_names_then_predicts_as_nnunet_does(workspace, t1ce_predictions):
    env = nnunet_environment(workspace)
    arguments = ["-d", "501", "-c", "3d_smoke_T1ce", "-tr", "UnimodalTrainer", "-f", "0", "-device", "cpu", "-npp",
                 "0", "-nps", "0"]
    result = run([BIN / "nnunet-protokd", "predict", "-i", workspace / "t1ce_only", "-o", workspace / "checked",
                  *arguments], env)
    assert f"3 case(s) in {workspace / 't1ce_only'}, each with exactly the files this model reads" in result.stdout
    predictions = sorted(p.name for p in t1ce_predictions.glob("*.nii.gz"))  # plain nnUNetv2_predict's
    assert len(predictions) == 3 and sorted(p.name for p in (workspace / "checked").glob("*.nii.gz")) == predictions
    for name in predictions:  # nnU-Net's own prediction, voxel for voxel
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(workspace / "checked" / name))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(t1ce_predictions / name))))
    # FLAIR numbered as in the 4-channel dataset: plain nnUNetv2_predict cannot tell and reads it as T1ce
    flair = workspace / "flair_as_0003"
    flair.mkdir()
    for image in sorted((workspace / "nnUNet_raw" / DATASET / "imagesTs").glob("*_0003.nii.gz")):
        shutil.copy(image, flair / image.name)
    predict(workspace, flair, workspace / "flair_plain", "3d_smoke_T1ce", "UnimodalTrainer")
    assert len(list((workspace / "flair_plain").glob("*.nii.gz"))) == 3
    result = run([BIN / "nnunet-protokd", "predict", "-i", flair, "-o", workspace / "flair_checked", *arguments], env,
                 expect_success=False)
    case = sorted(flair.iterdir())[0].name[:-len("_0003.nii.gz")]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"case {case}: unexpected file {flair}/{case}_0003.nii.gz (this model reads <case>_0000.nii.gz = T1ce " \
           f"only per case)" in result.stderr
    assert f"case {case}: missing {case}_0000.nii.gz (T1ce; " in result.stderr
    assert not (workspace / "flair_checked").exists()


def test_teacher_refuses_single_channel_input(workspace):
    result = predict(workspace, workspace / "t1ce_only", workspace / "bad2", "3d_smoke", "ProtoKDTeacherTrainer",
                     expect_success=False)
    assert result.returncode != 0
    assert "takes 4 input channel(s) per case (<case>_0000 <case>_0001 <case>_0002 <case>_0003) but received 1" \
           in result.stderr


def preprocess(files, plans, configuration, dataset_json):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans_manager = PlansManager(plans)
    data, _, properties = DefaultPreprocessor(verbose=False).run_case(
        [str(f) for f in files], None, plans_manager, plans_manager.get_configuration(configuration), dataset_json)
    return data, properties


def test_single_channel_preprocessing_matches_training_on_skull_stripped_data(workspace):
    """Training crops to the nonzero region of all four channels, single-modality inference to that of T1ce
    alone; skull-stripped BraTS has one brain mask for all modalities, so the T1ce the student sees must be
    the same at inference as in training."""
    raw = workspace / "nnUNet_raw" / DATASET
    case = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))[0].name[:-len("_0000.nii.gz")]
    four_channel_files = [raw / "imagesTs" / f"{case}_{c:04d}.nii.gz" for c in range(4)]
    preprocessed = workspace / "nnUNet_preprocessed" / DATASET
    training_view, training_properties = preprocess(
        four_channel_files, json.loads((preprocessed / "nnUNetPlans.json").read_text()), "3d_smoke_T1ce",
        json.loads((preprocessed / "dataset.json").read_text()))
    student = workspace / "nnUNet_results" / DATASET / STUDENT
    inference_view, inference_properties = preprocess(
        [four_channel_files[T1CE]], json.loads((student / "plans.json").read_text()), "3d_smoke_T1ce",
        json.loads((student / "dataset.json").read_text()))
    assert training_properties["bbox_used_for_cropping"] == inference_properties["bbox_used_for_cropping"]
    np.testing.assert_allclose(inference_view[0], training_view[T1CE], atol=1e-5)


@pytest.mark.parametrize("model", DISTILLED)
def test_distilled_student_logs_every_loss_term_and_records_its_teacher(workspace, model):
    from nnunet_protokd.io import load_checkpoint_weights_only, sha256_of
    from nnunet_protokd.methods import METHOD_DEFAULTS
    results = workspace / "nnUNet_results" / DATASET
    fold = results / model / "fold_0"
    teacher_checkpoint = results / TEACHER / "fold_0" / "checkpoint_final.pth"
    from nnunet_protokd import __version__
    record = json.loads((fold / "distillation.json").read_text())
    assert record["plugin_version"] == __version__
    assert record["teacher"]["sha256"] == sha256_of(str(teacher_checkpoint))
    assert record["teacher"]["checkpoint"] == str(teacher_checkpoint) and record["modality"] == "T1ce"
    assert record["settings"] == METHOD_DEFAULTS[model.split("__")[0]]
    log = next(fold.glob("training_log_*.txt")).read_text()
    terms = ("seg_loss",) + DISTILLED[model]
    epoch_lines = [line for line in log.splitlines() if ": train seg_loss " in line]
    assert len(epoch_lines) == 2 and all(f"{term} " in line for line in epoch_lines for term in terms)
    checkpoint = load_checkpoint_weights_only(str(fold / "checkpoint_final.pth"))
    assert checkpoint["protokd"] == record
    for term in terms:
        values = checkpoint["logging"][term]
        assert len(values) == 2 and all(np.isfinite(values)), (term, values)
        # distillation terms are divergences or squares; nnU-Net's segmentation loss may be negative
        assert term == "seg_loss" or all(v >= 0 for v in values), (term, values)
    assert (fold / "distillation_progress.png").stat().st_size > 10_000


@pytest.mark.parametrize("model", DISTILLED)
def test_distilled_checkpoint_holds_the_student_only(workspace, model):
    from nnunet_protokd.io import load_checkpoint_weights_only
    results = workspace / "nnUNet_results" / DATASET
    distilled = load_checkpoint_weights_only(str(results / model / "fold_0" / "checkpoint_final.pth"))
    unimodal = load_checkpoint_weights_only(str(results / STUDENT / "fold_0" / "checkpoint_final.pth"))
    shapes = {k: tuple(v.shape) for k, v in distilled["network_weights"].items()}
    assert shapes == {k: tuple(v.shape) for k, v in unimodal["network_weights"].items()}
    first_convolution = next(v for k, v in distilled["network_weights"].items() if k.endswith("conv.weight"))
    assert first_convolution.shape[1] == 1  # one input channel: no teacher weights in here


def test_distilled_students_predict_without_their_teacher(workspace):
    teacher = workspace / "nnUNet_results" / DATASET / TEACHER
    hidden = teacher.with_name(teacher.name + ".moved")
    os.rename(teacher, hidden)
    try:
        for trainer in ("ProtoKDTrainer", "KDNetTrainer"):
            output = workspace / f"predicted_{trainer}"
            predict(workspace, workspace / "t1ce_only", output, "3d_smoke_T1ce", trainer)
            assert len(list(output.glob("*.nii.gz"))) == 3
    finally:
        os.rename(hidden, teacher)


def test_protokd_without_a_teacher_for_its_fold_stops_before_writing(workspace):
    result = run([BIN / "nnUNetv2_train", "501", "3d_smoke_T1ce", "1", "-tr", "ProtoKDTrainer", "-device", "cpu"],
                 nnunet_environment(workspace), expect_success=False)
    assert result.returncode != 0
    assert "teacher of Dataset501_BraTS2018 3d_smoke_T1ce fold 1: " in result.stderr
    assert "fold_1/checkpoint_final.pth does not exist. Train it first (nnUNetv2_train" in result.stderr
    assert not (workspace / "nnUNet_results" / DATASET / PROTOKD / "fold_1").exists()


def test_resuming_with_a_changed_teacher_is_refused(workspace):
    import torch

    from nnunet_protokd.io import load_checkpoint_weights_only
    teacher_checkpoint = workspace / "nnUNet_results" / DATASET / TEACHER / "fold_0" / "checkpoint_final.pth"
    original = teacher_checkpoint.read_bytes()
    changed = load_checkpoint_weights_only(str(teacher_checkpoint))
    changed["network_weights"] = {k: v + 0.01 if v.is_floating_point() else v
                                  for k, v in changed["network_weights"].items()}
    torch.save(changed, teacher_checkpoint)
    try:
        result = run([BIN / "nnUNetv2_train", "501", "3d_smoke_T1ce", "0", "-tr", "ProtoKDTrainer", "-device", "cpu",
                      "--c"], nnunet_environment(workspace), expect_success=False)
    finally:
        teacher_checkpoint.write_bytes(original)
    assert result.returncode != 0 and "continuing would mix two teachers" in result.stderr


def test_lckd_elects_on_held_out_training_cases_and_validates_every_subset(workspace):
    fold = workspace / "nnUNet_results" / DATASET / LCKD / "fold_0"
    split = json.loads((workspace / "nnUNet_preprocessed" / DATASET / "splits_final.json").read_text())[0]
    elections = json.loads((fold / "lckd_elections.json").read_text())
    assert [e["epoch"] for e in elections] == [0, 1, 2]  # from the first epoch, as the authors
    held_out = elections[0]["election_cases"]
    assert len(held_out) == 1 and set(held_out) <= set(split["train"]) and not set(held_out) & set(split["val"])
    for election in elections:
        assert set(election["dice"]) == {"T1", "T1ce", "T2", "FLAIR"}
        assert set(election["teachers"]) == {"WT", "TC", "ET"}
        assert set(election["teachers"].values()) <= {"T1", "T1ce", "T2", "FLAIR", None}
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "teacher election (epoch 0): Dice alone" in log
    from nnunet_protokd.io import load_checkpoint_weights_only
    from nnunet_protokd.methods import METHOD_DEFAULTS
    checkpoint = load_checkpoint_weights_only(str(fold / "checkpoint_final.pth"))
    logged = checkpoint["logging"]
    assert logged["kd_loss"][0] > 0 and all(np.isfinite(logged["seg_loss"]))  # distilled in the every-modality epoch
    # every resolved setting in the checkpoint, distillation.json and the model folder's plans.json (the network)
    settings = {**METHOD_DEFAULTS["LCKDTrainer"], "election_interval": 1, "full_modality_fraction": 0.34,
                "election_batches": 2}
    assert checkpoint["protokd"]["settings"] == json.loads((fold / "distillation.json").read_text())["settings"] \
        == settings
    plans = json.loads((fold.parent / "plans.json").read_text())
    assert plans["configurations"]["3d_lckd"]["protokd"]["LCKDTrainer"] == settings
    assert any(key.startswith("fusion_blocks.") for key in checkpoint["network_weights"])  # the authors' slots
    subsets = json.loads((fold / "validation_subsets" / "summary.json").read_text())
    assert len(subsets["subsets"]) == 15 and sorted(subsets["cases"]) == sorted(split["val"])
    assert set(subsets["subsets"]["T1ce+FLAIR"]["mean"]) == {"(1, 2, 3)", "(2, 3)", "(3,)"}
    # every modality through the subset path gives nnU-Net's own final validation
    nnunet = json.loads((fold / "validation" / "summary.json").read_text())
    assert subsets["subsets"]["T1+T1ce+T2+FLAIR"]["foreground_mean"] == pytest.approx(
        nnunet["foreground_mean"]["Dice"], abs=1e-6)


def test_lckd_predicts_from_a_subset_of_modalities(workspace):
    env = nnunet_environment(workspace)
    result = run([BIN / "nnunet-protokd", "lckd-subset", "-d", "501", "-c", "3d_lckd", "-m", "flair", "T1ce"], env)
    assert "nnunet-protokd predict -d 501 -c 3d_lckd_T1ce+FLAIR -tr LCKDTrainer" in result.stdout
    folder = workspace / "nnUNet_results" / DATASET / "LCKDTrainer__nnUNetPlans__3d_lckd_T1ce+FLAIR"
    assert (folder / "fold_0" / "checkpoint_final.pth").is_symlink()
    inputs = workspace / "t1ce_and_flair"
    inputs.mkdir()
    for image in sorted((workspace / "nnUNet_raw" / DATASET / "imagesTs").glob("*_0001.nii.gz")):
        shutil.copy(image, inputs / image.name.replace("_0001.nii.gz", "_0000.nii.gz"))  # T1ce
        shutil.copy(str(image).replace("_0001.nii.gz", "_0003.nii.gz"),
                    inputs / image.name.replace("_0001.nii.gz", "_0001.nii.gz"))  # FLAIR
    output = workspace / "predicted_lckd"
    predict(workspace, inputs, output, "3d_lckd_T1ce+FLAIR", "LCKDTrainer")
    assert len(list(output.glob("*.nii.gz"))) == 3
    # the trained 4-channel folder says how to predict from fewer modalities
    result = predict(workspace, inputs, workspace / "bad4", "3d_lckd", "LCKDTrainer", expect_success=False)
    assert "takes 4 input channel(s) per case" in result.stderr and "nnunet-protokd lckd-subset" in result.stderr
    os.remove(sorted(inputs.glob("*_0001.nii.gz"))[0])
    result = predict(workspace, inputs, workspace / "bad3", "3d_lckd_T1ce+FLAIR", "LCKDTrainer",
                     expect_success=False)
    assert result.returncode != 0
    assert "takes 2 input channel(s) per case (<case>_0000 = T1ce, <case>_0001 = FLAIR) but received 1" in result.stderr


def predict_every_subset(results: Path, images: Path, validated: Path, case: str, labels: list) -> dict:
    """{subset label: share of voxels where nnU-Net's predictor, given the subset model folder and only that subset's
    raw files of `case`, predicts what the trained model's validation of that subset predicted}."""
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    agreement = {}
    for label in labels:
        folder = results / f"LCKDTrainer__nnUNetPlans__3d_lckd_{label}"
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                    device=torch.device("cpu"), verbose=False, verbose_preprocessing=False,
                                    allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(folder), (0,), "checkpoint_final.pth")
        channels = json.loads((folder / "dataset.json").read_text())["protokd"]["source_channel_indices"]
        image, properties = SimpleITKIO().read_images([str(images / f"{case}_{c:04d}.nii.gz") for c in channels])
        predicted = predictor.predict_single_npy_array(image, properties, None, None, False)
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(validated / label / f"{case}.nii.gz")))
        agreement[label] = float(np.mean(predicted == reference))
    return agreement


def test_every_lckd_subset_model_folder_predicts_what_final_validation_predicted(workspace):
    """All 15 subset folders (`lckd-subset --all`) through nnU-Net's predictor (what nnUNetv2_predict runs; here in
    the test's process, which saves a start of nnU-Net), each from only its modalities' raw files: the same
    segmentation as the trained model's validation of that subset."""
    from nnunet_protokd.lckd.subsets import every_channel_subset
    protokd_in_process(workspace, "lckd-subset", "-d", "501", "-c", "3d_lckd", "--all")
    results = workspace / "nnUNet_results" / DATASET
    fold = results / LCKD / "fold_0"
    case = json.loads((fold / "validation_subsets" / "summary.json").read_text())["cases"][0]
    dataset_json = json.loads((results / LCKD / "dataset.json").read_text())
    labels = [subset.label for subset in every_channel_subset(dataset_json)]
    agreement = predict_every_subset(results, workspace / "nnUNet_raw" / DATASET / "imagesTr",
                                     fold / "validation_subsets", case, labels)  # in this process: model folders
    assert len(agreement) == 15 and all(value >= 0.999 for value in agreement.values()), agreement


def test_resuming_under_other_method_settings_is_refused_with_the_way_back(workspace):
    protokd_in_process(workspace, "add-config", "-d", "501", "-c", "3d_smoke", "-m", "T1ce", "--set",
                       "ProtoKDTrainer.classes=regions", "--overwrite")
    try:
        result = run([BIN / "nnUNetv2_train", "501", "3d_smoke_T1ce", "0", "-tr", "ProtoKDTrainer", "-device", "cpu",
                      "--c"], nnunet_environment(workspace), expect_success=False)
    finally:
        protokd_in_process(workspace, "add-config", "-d", "501", "-c", "3d_smoke", "-m", "T1ce", "--overwrite")
    assert result.returncode != 0
    assert "checkpoint_final.pth was trained by ProtoKDTrainer of nnunet-protokd" in result.stderr
    assert "classes 'disjoint' -> 'regions'. Continuing would change the method half-way" in result.stderr
    assert "nnunet-protokd add-config -d Dataset501_BraTS2018 -p nnUNetPlans -c 3d_smoke -m T1ce --name " \
           "3d_smoke_T1ce --set ProtoKDTrainer.classes=disjoint --overwrite" in result.stderr
