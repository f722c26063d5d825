"""`nnunet-protokd predict`: every case's files are checked against the model folder before nnU-Net predicts
(the end-to-end run with a trained student is in test_integration.py)."""
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import BIN, nnunet_environment, run

from nnunet_protokd.deploy.prediction import PredictionInputError, check_input_folder

STUDENT = {"channel_names": {"0": "T1ce"}, "file_ending": ".nii.gz"}  # a student's model folder dataset.json
SUBSET = {"channel_names": {"0": "T1ce", "1": "FLAIR"}, "file_ending": ".nii.gz"}  # an LCKD subset model's
TEACHER = {"channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}, "file_ending": ".nii.gz"}


def scan(path, value=None):
    voxels = np.random.default_rng(0).normal(100, 10, (4, 5, 6)).astype(np.float32)
    if value is not None:
        voxels[:] = value
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(path))
    return path


def folder_with(tmp_path, *names):
    folder = tmp_path / "input"
    folder.mkdir()
    for name in names:
        scan(folder / name)
    return folder


def test_cases_with_exactly_the_models_files_pass(tmp_path):
    assert check_input_folder(str(folder_with(tmp_path, "a_0000.nii.gz", "b_0000.nii.gz")), STUDENT) == ["a", "b"]
    folder = tmp_path / "subset"
    folder.mkdir()
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "notes.txt"):
        scan(folder / name) if name.endswith(".gz") else (folder / name).write_text("")
    assert check_input_folder(str(folder), SUBSET) == ["a"]


@pytest.mark.parametrize("dataset_json, names, problems", [
    # FLAIR in the 4-channel numbering given to a T1ce student: nnU-Net would read it as T1ce
    (STUDENT, ["a_0003.nii.gz"], [r"case a: unexpected file .*a_0003.nii.gz \(this model reads "
                                  r"<case>_0000.nii.gz = T1ce only per case\)",
                                  r"case a: missing a_0000.nii.gz \(T1ce; this model reads"]),
    (STUDENT, ["a_0001.nii.gz"], ["case a: unexpected file .*a_0001.nii.gz", "case a: missing a_0000.nii.gz"]),
    # the four files of the teacher given to a student
    (STUDENT, [f"a_{c:04d}.nii.gz" for c in range(4)],
     [f"case a: unexpected file .*a_000{c}.nii.gz" for c in (1, 2, 3)]),
    (SUBSET, ["a_0000.nii.gz"], [r"case a: missing a_0001.nii.gz \(FLAIR; this model reads <case>_0000.nii.gz = "
                                 r"T1ce, <case>_0001.nii.gz = FLAIR per case\)"]),
    (SUBSET, ["a_0000.nii.gz", "a_0001.nii.gz", "a_0002.nii.gz"], ["case a: unexpected file .*a_0002.nii.gz"]),
    (TEACHER, ["a_0001.nii.gz"], ["case a: missing a_0000.nii.gz \\(T1;", "case a: missing a_0002.nii.gz \\(T2;",
                                  "case a: missing a_0003.nii.gz \\(FLAIR;"]),
    (STUDENT, ["a_0000.nii.gz", "b.nii.gz"], [r"b.nii.gz is not named <case>_XXXX.nii.gz"]),
    (STUDENT, ["a_0000.nii.gz", "b_0000.nii"], [r"b_0000.nii: this model reads .nii.gz files"]),
])
def test_wrong_files_are_named_with_their_case_and_nothing_is_predicted(tmp_path, dataset_json, names, problems):
    with pytest.raises(PredictionInputError, match=f"{len(problems)} problem\\(s\\) in .*; nothing was predicted") \
            as raised:
        check_input_folder(str(folder_with(tmp_path, *names)), dataset_json)
    for problem in problems:
        assert any(re.search(problem, line) for line in str(raised.value).splitlines()), \
            (problem, str(raised.value))


def test_broken_scans_are_refused(tmp_path):
    """NaN/inf voxels (which nnU-Net's reader would silently turn into 0), an all-zero scan and a truncated file
    (which SimpleITK reads without complaint) are refused, naming the case and the file."""
    folder = tmp_path / "input"
    folder.mkdir()
    voxels = np.random.default_rng(0).normal(100, 10, (4, 5, 6)).astype(np.float32)
    voxels[0, 0, :3] = [np.nan, np.inf, -np.inf]
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(folder / "nan_0000.nii.gz"))
    scan(folder / "zero_0000.nii.gz", value=0)
    data = scan(folder / "cut_0000.nii.gz").read_bytes()
    (folder / "cut_0000.nii.gz").write_bytes(data[:len(data) // 2])
    scan(folder / "fine_0000.nii.gz")
    with pytest.raises(PredictionInputError) as raised:
        check_input_folder(str(folder), STUDENT)
    lines = str(raised.value).splitlines()
    assert lines[0] == f"3 problem(s) in {folder}; nothing was predicted:"
    assert lines[1].startswith(f"  case cut: cannot read {folder}/cut_0000.nii.gz: ")
    assert lines[2] == f"  case nan: {folder}/nan_0000.nii.gz has 3 NaN/inf voxels"
    assert lines[3] == f"  case zero: {folder}/zero_0000.nii.gz holds the value 0 in every voxel: an empty scan (a " \
                       f"broken export), not an image"


def test_predict_command_checks_against_the_model_folder_before_nnunet_runs(tmp_path):
    env = nnunet_environment(tmp_path)
    model = tmp_path / "nnUNet_results" / "Dataset501_BraTS2018" / "UnimodalTrainer__nnUNetPlans__3d_fullres_T1ce"
    model.mkdir(parents=True)
    (model / "dataset.json").write_text(json.dumps(STUDENT))
    (tmp_path / "nnUNet_raw" / "Dataset501_BraTS2018").mkdir(parents=True)
    inputs = folder_with(tmp_path, "case_0003.nii.gz")
    command = [BIN / "nnunet-protokd", "predict", "-i", inputs, "-o", tmp_path / "out", "-d", "501", "-c",
               "3d_fullres_T1ce", "-tr", "UnimodalTrainer", "-f", "0", "-device", "cpu"]
    result = run(command, env, expect_success=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: 2 problem(s) in {inputs}; nothing was predicted:\n  case case: "
                                    f"unexpected file {inputs}/case_0003.nii.gz")
    assert not (tmp_path / "out").exists()
    result = run(command[:-8] + ["-c", "3d_fullres_T2", "-tr", "UnimodalTrainer"], env, expect_success=False)
    assert result.returncode == 1 and result.stderr.startswith(
        f"error: no trained model {model.parent}/UnimodalTrainer__nnUNetPlans__3d_fullres_T2 (no dataset.json")


def test_a_folder_or_link_loop_named_like_an_image_is_refused_not_skipped(tmp_path):
    """nnU-Net skips what is not a file: case b would get no prediction, without a word."""
    folder = folder_with(tmp_path, "a_0000.nii.gz")
    (folder / "b_0000.nii.gz").mkdir()
    (folder / "c_0000.nii.gz").symlink_to(folder / "c_0000.nii.gz")
    (folder / "notes").mkdir()  # other folders are nnU-Net's to ignore
    with pytest.raises(PredictionInputError) as raised:
        check_input_folder(str(folder), STUDENT)
    assert str(raised.value).splitlines()[1:] == [
        f"  {folder}/b_0000.nii.gz is a directory, not an image file",
        f"  {folder}/c_0000.nii.gz is not a file: a broken symbolic link or a link loop"]


def test_a_4d_or_vector_file_and_channels_on_different_grids_are_refused(tmp_path):
    folder = folder_with(tmp_path, "grid_0000.nii.gz")
    series = np.random.default_rng(0).normal(100, 10, (2, 4, 5, 6)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(series, isVector=False), str(folder / "series_0000.nii.gz"))  # 2 volumes
    sitk.WriteImage(sitk.GetImageFromArray(series[0], isVector=True), str(folder / "vector_0000.nii.gz"))
    shifted = sitk.ReadImage(str(scan(folder / "grid_0001.nii.gz")))
    shifted.SetSpacing((1.0, 1.0, 3.0))
    sitk.WriteImage(shifted, str(folder / "grid_0001.nii.gz"))
    for case in ("series", "vector"):
        scan(folder / f"{case}_0001.nii.gz")
    with pytest.raises(PredictionInputError) as raised:
        check_input_folder(str(folder), SUBSET)
    assert str(raised.value).splitlines()[1:] == [
        f"  case grid: {folder}/grid_0001.nii.gz: spacing (1, 1, 3) differs from (1, 1, 1) of "
        f"{folder}/grid_0000.nii.gz; the files of a case must share one grid",
        f"  case series: {folder}/series_0000.nii.gz is a 4D image of size (6, 5, 4, 2); one 2D or 3D scan per file "
        f"is expected (a 4D series holds several volumes: give each as a file of its own)",
        f"  case vector: {folder}/vector_0000.nii.gz holds 6 values per voxel (a vector image); a scan has one value "
        f"per voxel: give each component as a file of its own"]


def test_an_output_that_is_the_input_or_a_file_and_an_untrained_fold_are_refused(tmp_path, monkeypatch):
    """Each ended in nnU-Net with a traceback, or mixed the predictions into the scans."""
    import nnunet_protokd.deploy.prediction as prediction
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "nnUNet_results"))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "nnUNet_raw"))
    (tmp_path / "nnUNet_raw" / "Dataset501_BraTS2018").mkdir(parents=True)
    model = tmp_path / "nnUNet_results" / "Dataset501_BraTS2018" / "UnimodalTrainer__nnUNetPlans__3d_fullres_T1ce"
    (model / "fold_0").mkdir(parents=True)
    (model / "dataset.json").write_text(json.dumps(STUDENT))
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"trained")
    inputs = folder_with(tmp_path, "case_0000.nii.gz")
    (tmp_path / "a_file").write_text("")
    ran = []
    monkeypatch.setattr(prediction, "run_nnunet_predict", ran.append)
    model_arguments = ["-d", "501", "-c", "3d_fullres_T1ce", "-tr", "UnimodalTrainer", "-device", "cpu"]

    def refusal(output, *more):
        with pytest.raises(PredictionInputError) as raised:
            prediction.check_and_predict("501", "UnimodalTrainer", "nnUNetPlans", "3d_fullres_T1ce", str(inputs),
                                         ["-i", str(inputs), "-o", str(output), *model_arguments, *more],
                                         log=lambda _: None)
        return str(raised.value)

    assert refusal(inputs, "-f", "0") == f"the output folder {inputs} is the input folder: the predictions would " \
                                         f"be mixed into the scans; give another -o"
    assert refusal(tmp_path / "a_file", "-f", "0") == f"the output folder {tmp_path / 'a_file'} is a file; give a " \
                                                      f"folder for -o"
    assert refusal(tmp_path / "out", "-f", "0", "1") == \
        f"fold 1 of {model} is not trained: {model}/fold_1/checkpoint_final.pth does not exist (choose the trained " \
        f"folds with -f, the checkpoint with -chk)"
    assert refusal(tmp_path / "out", "-f", "0", "-chk", "checkpoint_best.pth").startswith("fold 0 of")
    assert ran == [] and not (tmp_path / "out").exists()
    prediction.check_and_predict("501", "UnimodalTrainer", "nnUNetPlans", "3d_fullres_T1ce", str(inputs),
                                 ["-i", str(inputs), "-o", str(tmp_path / "out"), *model_arguments, "-f", "0"],
                                 log=lambda _: None)
    assert len(ran) == 1
