import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import BIN, REPO, run

from nnunet_protokd.data.brats import (
    CONVENTIONS,
    ConversionError,
    brats_to_nnunet_labels,
    convert_brats_dataset,
    convert_predictions_to_brats,
    nnunet_to_brats_labels,
)
from nnunet_protokd.data.phantoms import generate_brats_phantoms

CONVERT = REPO / "dataset_conversion" / "convert_brats2018.py"
FIRST_CASE = "Brats18_PHANTOM_HGG_000"


def case_file(folder: Path, case: str, suffix: str) -> Path:
    grade = "HGG" if "HGG" in case else "LGG"
    return folder / grade / case / f"{case}_{suffix}.nii.gz"


@pytest.fixture
def brats_copy(phantom_folder, tmp_path) -> Path:
    """A private copy of the phantom folder that a test may damage."""
    return Path(shutil.copytree(phantom_folder, tmp_path / "brats"))


def convert(folder, raw, **kwargs):
    return Path(convert_brats_dataset(str(folder), 501, str(raw), num_processes=1, **kwargs))


def test_label_round_trip_brats_to_nnunet_to_brats():
    seg = np.random.default_rng(0).choice([0, 1, 2, 4], size=(5, 6, 7)).astype(np.uint8)
    nnunet = brats_to_nnunet_labels(seg)
    assert set(np.unique(nnunet)) <= {0, 1, 2, 3}
    # nested regions: whole tumour = {1,2,3} is exactly BraTS {1,2,4}; core = {2,3} is BraTS {1,4}; ET = 3 is 4
    np.testing.assert_array_equal(nnunet > 0, seg > 0)
    np.testing.assert_array_equal(nnunet >= 2, np.isin(seg, (1, 4)))
    np.testing.assert_array_equal(nnunet == 3, seg == 4)
    np.testing.assert_array_equal(nnunet_to_brats_labels(nnunet), seg)
    seg2023 = np.where(seg == 4, 3, seg)
    brats2023 = CONVENTIONS["brats2023"]
    np.testing.assert_array_equal(nnunet_to_brats_labels(brats_to_nnunet_labels(seg2023, brats2023), brats2023),
                                  seg2023)


def test_conversion_writes_complete_region_dataset(phantom_folder, tmp_path):
    target = convert(phantom_folder, tmp_path / "raw")
    assert target.name == "Dataset501_BraTS2018"
    assert sorted(os.listdir(tmp_path / "raw")) == ["Dataset501_BraTS2018"]  # nothing temporary left
    dataset = json.loads((target / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert dataset["labels"]["whole tumor"] == [1, 2, 3] and dataset["regions_class_order"] == [1, 2, 3]
    assert dataset["numTraining"] == 5
    assert len(os.listdir(target / "imagesTr")) == 20 and len(os.listdir(target / "labelsTr")) == 5
    for channel, suffix in enumerate(("t1", "t1ce", "t2", "flair")):  # channel order, byte for byte
        assert (target / "imagesTr" / f"{FIRST_CASE}_{channel:04d}.nii.gz").read_bytes() == \
               case_file(phantom_folder, FIRST_CASE, suffix).read_bytes()
    original = sitk.ReadImage(str(case_file(phantom_folder, FIRST_CASE, "seg")))
    label = sitk.ReadImage(str(target / "labelsTr" / f"{FIRST_CASE}.nii.gz"))
    for attribute in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(label, attribute)() == getattr(original, attribute)()
    np.testing.assert_array_equal(nnunet_to_brats_labels(sitk.GetArrayFromImage(label)),
                                  sitk.GetArrayFromImage(original))


def test_label_based_dataset_and_brats2023_naming(tmp_path):
    source = tmp_path / "BraTS2023"
    generate_brats_phantoms(str(source), num_hgg=2, num_lgg=1, seed=3, shape_zyx=(20, 24, 24), naming="brats2023")
    target = convert(source, tmp_path / "raw", region_based=False)
    dataset = json.loads((target / "dataset.json").read_text())
    assert target.name == "Dataset501_BraTS2023"
    assert dataset["labels"] == {"background": 0, "edema": 1, "necrosis and non-enhancing core": 2,
                                 "enhancing tumor": 3} and "regions_class_order" not in dataset
    case = sorted(os.listdir(source))[0]
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(target / "labelsTr" / f"{case}.nii.gz")))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(source / case / f"{case}-seg.nii.gz")))
    np.testing.assert_array_equal(label == 3, seg == 3)


def test_validation_folder_goes_to_imagesTs(phantom_folder, tmp_path):
    validation = tmp_path / "validation"
    generate_brats_phantoms(str(validation), num_hgg=1, num_lgg=1, seed=11, shape_zyx=(20, 24, 24),
                            with_segmentation=False, first_case_index=100)
    target = convert(phantom_folder, tmp_path / "raw", test_folder=str(validation))
    assert sorted(os.listdir(target / "imagesTs"))[:4] == [f"Brats18_PHANTOM_HGG_100_{c:04d}.nii.gz" for c in range(4)]
    assert len(os.listdir(target / "imagesTs")) == 8 and json.loads((target / "dataset.json").read_text())[
        "numTraining"] == 5


def test_labelled_held_out_folder_gets_labelsTs_and_needs_every_seg(phantom_folder, tmp_path):
    held_out = tmp_path / "held_out"
    generate_brats_phantoms(str(held_out), num_hgg=2, num_lgg=1, seed=12, shape_zyx=(20, 24, 24),
                            first_case_index=200)
    target = convert(phantom_folder, tmp_path / "raw", test_folder=str(held_out))
    assert sorted(os.listdir(target / "labelsTs")) == ["Brats18_PHANTOM_HGG_200.nii.gz",
                                                      "Brats18_PHANTOM_HGG_201.nii.gz",
                                                      "Brats18_PHANTOM_LGG_200.nii.gz"]
    os.remove(held_out / "HGG" / "Brats18_PHANTOM_HGG_201" / "Brats18_PHANTOM_HGG_201_seg.nii.gz")
    with pytest.raises(ConversionError, match="case Brats18_PHANTOM_HGG_201: missing segmentation .* other cases"):
        convert(phantom_folder, tmp_path / "raw2", test_folder=str(held_out))


def test_cases_in_both_training_and_test_folder_are_refused(phantom_folder, tmp_path):
    with pytest.raises(ConversionError, match="cases in both the training and the test folder"):
        convert(phantom_folder, tmp_path / "raw", test_folder=str(phantom_folder))
    assert not (tmp_path / "raw").exists() or os.listdir(tmp_path / "raw") == []


def test_refuses_to_overwrite_and_replaces_with_overwrite(phantom_folder, tmp_path):
    raw = tmp_path / "raw"
    target = convert(phantom_folder, raw)
    marker = target / "imagesTr" / f"{FIRST_CASE}_0000.nii.gz"
    with pytest.raises(ConversionError, match="already exists; pass --overwrite"):
        convert(phantom_folder, raw)
    assert marker.exists()
    os.remove(target / "labelsTr" / f"{FIRST_CASE}.nii.gz")
    convert(phantom_folder, raw, overwrite=True)
    assert (target / "labelsTr" / f"{FIRST_CASE}.nii.gz").exists()
    assert sorted(os.listdir(raw)) == ["Dataset501_BraTS2018"]


def write_like(path: Path, array: np.ndarray, reference: Path, **geometry):
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(sitk.ReadImage(str(reference)))
    for key, value in geometry.items():
        getattr(image, f"Set{key}")(value)
    sitk.WriteImage(image, str(path))


def damage_missing_modality(folder):
    os.remove(case_file(folder, FIRST_CASE, "t2"))
    return "missing modality file .*_t2.nii.gz"


def damage_extra_modality(folder):
    shutil.copy(case_file(folder, FIRST_CASE, "t1"), case_file(folder, FIRST_CASE, "t1c"))
    return "unexpected file .*_t1c.nii.gz"


def damage_shape(folder):
    path = case_file(folder, FIRST_CASE, "flair")
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[:-2]
    image = sitk.GetImageFromArray(array)
    sitk.WriteImage(image, str(path))
    return "_flair.nii.gz: shape .* differs"


def damage_spacing(folder):
    path = case_file(folder, FIRST_CASE, "t1ce")
    write_like(path, sitk.GetArrayFromImage(sitk.ReadImage(str(path))), path, Spacing=(1.0, 1.0, 1.0))
    return "_t1ce.nii.gz: spacing .* differs"


def damage_origin(folder):
    path = case_file(folder, FIRST_CASE, "t2")
    write_like(path, sitk.GetArrayFromImage(sitk.ReadImage(str(path))), path, Origin=(0.0, 0.0, 0.0))
    return "_t2.nii.gz: origin .* differs"


def damage_direction(folder):
    path = case_file(folder, FIRST_CASE, "seg")
    write_like(path, sitk.GetArrayFromImage(sitk.ReadImage(str(path))), path,
               Direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    return "_seg.nii.gz: direction .* differs"


def damage_labels(folder):
    path = case_file(folder, FIRST_CASE, "seg")
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    array[0, 0, 0] = 3
    write_like(path, array, path)
    return r"_seg.nii.gz: label 3 is not in the BraTS 2018-2021 labels \(1 NCR/NET, 2 ED, 4 ET\); label 3 is ET in " \
           r"BraTS 2023 \(--label-convention brats2023\)"


def damage_nan(folder):
    path = case_file(folder, FIRST_CASE, "t1")
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    array[3, 4, 5], array[3, 4, 6] = np.nan, np.inf
    write_like(path, array, path)
    return "_t1.nii.gz has 2 NaN/inf voxels"


def damage_unreadable(folder):
    case_file(folder, FIRST_CASE, "t1ce").write_bytes(b"not a nifti file")
    return "cannot read .*_t1ce.nii.gz"


def damage_missing_seg(folder):
    os.remove(case_file(folder, FIRST_CASE, "seg"))
    return "missing segmentation .*_seg.nii.gz"


def damage_truncated(folder):
    """Header intact, data cut: SimpleITK reads it without complaint (zero-filled); the voxel check must not."""
    path = case_file(folder, FIRST_CASE, "t2")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return "cannot read .*_t2.nii.gz: Compressed file ended before the end-of-stream marker"


def damage_all_zero(folder):
    path = case_file(folder, FIRST_CASE, "t1ce")
    write_like(path, np.zeros_like(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))), path)
    return "_t1ce.nii.gz holds the value 0 in every voxel: an empty scan"


def damage_vector(folder):
    """Two values per voxel: the converter used to copy it as a scan."""
    path = case_file(folder, FIRST_CASE, "t1")
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    image = sitk.GetImageFromArray(np.stack([array, array], axis=-1), isVector=True)
    image.CopyInformation(sitk.ReadImage(str(path)))
    sitk.WriteImage(image, str(path))
    return "_t1.nii.gz holds 2 values per voxel \\(a vector image\\)"


def damage_4d(folder):
    """Every file of the case a 4D series: a traceback from a worker process, once."""
    for suffix in ("t1", "t1ce", "t2", "flair", "seg"):
        path = case_file(folder, FIRST_CASE, suffix)
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        sitk.WriteImage(sitk.GetImageFromArray(np.stack([array, array]), isVector=False), str(path))
    return "_t1.nii.gz is a 4D image of size \\(32, 32, 24, 2\\); one 2D or 3D scan per file is expected"


def damage_directory(folder):
    """A folder where an image should be: the message came after lines of HDF5 noise, not saying what it was."""
    path = case_file(folder, FIRST_CASE, "flair")
    path.unlink()
    path.mkdir()
    return "_flair.nii.gz is a directory, not an image file"


@pytest.mark.parametrize("damage", [damage_missing_modality, damage_extra_modality, damage_shape, damage_spacing,
                                    damage_origin, damage_direction, damage_labels, damage_nan, damage_unreadable,
                                    damage_missing_seg, damage_truncated, damage_all_zero, damage_vector, damage_4d,
                                    damage_directory])
def test_bad_input_is_named_and_leaves_nothing(brats_copy, tmp_path, damage):
    expected = damage(brats_copy)
    raw = tmp_path / "raw"
    with pytest.raises(ConversionError, match=f"case {FIRST_CASE}: .*{expected}"):
        convert(brats_copy, raw)
    assert os.listdir(raw) == []


def test_truncated_and_empty_scans_are_listed_with_the_other_problems(brats_copy, tmp_path):
    """A truncated file used to crash the run (in a worker process) with a bare EOFError that hid the other
    problems; an all-zero case with a tumour in its seg used to be converted."""
    damage_truncated(brats_copy)
    os.remove(case_file(brats_copy, "Brats18_PHANTOM_HGG_001", "flair"))  # another case's problem
    empty = "Brats18_PHANTOM_LGG_000"
    for suffix in ("t1", "t1ce", "t2", "flair"):
        path = case_file(brats_copy, empty, suffix)
        write_like(path, np.zeros_like(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))), path)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(case_file(brats_copy, empty, "seg")))).any()
    with pytest.raises(ConversionError) as raised:
        convert_brats_dataset(str(brats_copy), 501, str(tmp_path / "raw"), num_processes=2)
    message = str(raised.value)
    assert "6 problem(s) in the input; nothing was written" in message
    assert f"case {FIRST_CASE}: cannot read {case_file(brats_copy, FIRST_CASE, 't2')}: Compressed file" in message
    assert "case Brats18_PHANTOM_HGG_001: missing modality file" in message
    assert all(f"case {empty}: {case_file(brats_copy, empty, s)} holds the value 0 in every voxel" in message
               for s in ("t1", "t1ce", "t2", "flair"))
    assert os.listdir(tmp_path / "raw") == []


def test_bad_input_keeps_an_existing_dataset(brats_copy, tmp_path):
    raw = tmp_path / "raw"
    target = convert(brats_copy, raw)
    before = sorted(os.listdir(target / "imagesTr"))
    damage_nan(brats_copy)
    with pytest.raises(ConversionError, match="NaN/inf"):
        convert(brats_copy, raw, overwrite=True)
    assert sorted(os.listdir(raw)) == ["Dataset501_BraTS2018"] and sorted(os.listdir(target / "imagesTr")) == before


def test_empty_input_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no BraTS case folders found"):
        convert(tmp_path / "empty", tmp_path / "raw")


def test_command_line_reports_errors_and_converts(brats_copy, tmp_path):
    env = dict(os.environ, nnUNet_raw=str(tmp_path / "raw"))
    assert "--labels" in run([BIN / "python", CONVERT, "--help"], env).stdout
    damage_missing_modality(brats_copy)
    result = run([BIN / "python", CONVERT, brats_copy, "502"], env, expect_success=False)
    assert result.returncode == 1 and f"case {FIRST_CASE}: missing modality file" in result.stderr
    shutil.copy(case_file(brats_copy, FIRST_CASE, "t1"), case_file(brats_copy, FIRST_CASE, "t2"))
    assert "Dataset502_BraTS2018" in run([BIN / "python", CONVERT, brats_copy, "502"], env).stdout


def write_prediction(folder: Path, seg_file: Path, naming=None, **geometry) -> Path:
    """The nnU-Net prediction of a case that equals its BraTS seg, on the seg's grid as nnU-Net writes it (or
    with `geometry` changed)."""
    folder.mkdir(exist_ok=True)
    case = seg_file.name[:-len("_seg.nii.gz")]
    labels = brats_to_nnunet_labels(sitk.GetArrayFromImage(sitk.ReadImage(str(seg_file))),
                                    *([naming] if naming else []))
    path = folder / f"{case}.nii.gz"
    write_like(path, labels, seg_file, **geometry)
    return path


def test_predictions_back_to_brats_with_original_geometry(phantom_folder, tmp_path):
    reference = case_file(phantom_folder, FIRST_CASE, "seg")
    write_prediction(tmp_path / "predictions", reference)
    convert_predictions_to_brats(str(tmp_path / "predictions"), str(tmp_path / "out"),
                                 reference_folder=str(phantom_folder))
    result = sitk.ReadImage(str(tmp_path / "out" / f"{FIRST_CASE}.nii.gz"))
    original = sitk.ReadImage(str(reference))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result), sitk.GetArrayFromImage(original))
    assert result.GetDirection() == original.GetDirection() and result.GetOrigin() == original.GetOrigin()
    with pytest.raises(ConversionError, match="not empty"):
        convert_predictions_to_brats(str(tmp_path / "predictions"), str(tmp_path / "out"))


@pytest.mark.parametrize("geometry, message", [(dict(Spacing=(1.0, 1.0, 1.0)), "spacing .* differs from"),
                                               (dict(Origin=(5.0, 0.0, 0.0)), "origin .* differs from")])
def test_a_prediction_on_another_grid_is_refused_not_moved(phantom_folder, tmp_path, geometry, message):
    write_prediction(tmp_path / "predictions", case_file(phantom_folder, FIRST_CASE, "seg"), **geometry)
    with pytest.raises(ConversionError, match=f"case {FIRST_CASE}: prediction .*: {message} .* predicted on "
                                              f"another grid"):
        convert_predictions_to_brats(str(tmp_path / "predictions"), str(tmp_path / "out"),
                                     reference_folder=str(phantom_folder))
    assert not (tmp_path / "out").exists()


def test_brats2023_predictions_get_the_2023_enhancing_label(tmp_path):
    source = tmp_path / "BraTS2023"
    generate_brats_phantoms(str(source), num_hgg=1, num_lgg=1, seed=3, shape_zyx=(20, 24, 24), naming="brats2023")
    case = sorted(os.listdir(source))[0]  # high grade: has enhancing tumour
    seg = source / case / f"{case}-seg.nii.gz"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
    assert 3 in labels
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    write_like(predictions / f"{case}.nii.gz", brats_to_nnunet_labels(labels, CONVENTIONS["brats2023"]), seg)
    result = run([BIN / "python", REPO / "dataset_conversion" / "convert_predictions_to_brats.py", predictions,
                  tmp_path / "out", "--reference", source])
    assert f"(BraTS 2024 post-treatment glioma labels 1 NETC, 2 SNFH, 3 ET, 4 RC, from the BraTS naming of " \
           f"{source})" in result.stdout
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"{case}.nii.gz"))),
                                  labels)
    run([BIN / "python", REPO / "dataset_conversion" / "convert_predictions_to_brats.py", predictions,
         tmp_path / "out4", "--reference", source, "--et-label", "4"])  # the user's choice still wins
    assert 4 in sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out4" / f"{case}.nii.gz")))


def test_unreadable_or_missing_predictions_are_one_line_errors(phantom_folder, tmp_path):
    back = REPO / "dataset_conversion" / "convert_predictions_to_brats.py"
    result = run([BIN / "python", back, tmp_path / "nowhere", tmp_path / "out"], expect_success=False)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: prediction folder {tmp_path / 'nowhere'} does not exist or is not a folder"
    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / f"{FIRST_CASE}.nii.gz").write_bytes(b"not an image")
    result = run([BIN / "python", back, tmp_path / "predictions", tmp_path / "out", "--reference", phantom_folder],
                 expect_success=False)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: case {FIRST_CASE}: cannot read the prediction "
                                    f"{tmp_path / 'predictions' / FIRST_CASE}.nii.gz: ")
    assert not (tmp_path / "out").exists()


def test_conversion_errors_are_one_line_user_errors_inside_nnunet_commands(tmp_path):
    """ConversionError lives in the plugin-free brats_labels.py (a plain ValueError there), yet our hook in
    nnU-Net's commands shows it as one line, like every UserError."""
    probe = tmp_path / "nnUNetv2_probe.py"  # named like nnU-Net's commands, where the hook is active
    probe.write_text("from nnunet_protokd.errors import show_user_errors_in_nnunet_commands\n"
                     "from nnunet_protokd.data.brats import convert_predictions_to_brats\n"
                     "show_user_errors_in_nnunet_commands()\n"
                     f"convert_predictions_to_brats({str(tmp_path / 'nowhere')!r}, {str(tmp_path / 'out')!r})\n")
    result = run([BIN / "python", probe], dict(os.environ, PYTHONPATH=str(REPO)), expect_success=False)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: prediction folder {tmp_path / 'nowhere'} does not exist or is not a folder"


def test_unwritable_nnunet_raw_is_a_one_line_error(phantom_folder, tmp_path):
    blocked = tmp_path / "a_file"
    blocked.write_text("")  # nnUNet_raw below a file: cannot be created (as for a folder without write access)
    result = run([BIN / "python", CONVERT, phantom_folder, "502"], dict(os.environ, nnUNet_raw=str(blocked / "raw")),
                 expect_success=False)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: cannot write into nnUNet_raw {blocked / 'raw'}: Not a directory"


def scratch_folders(raw: Path) -> list:
    return sorted(d for d in os.listdir(raw) if d.startswith("."))


def start_blocked_conversion(folder: Path, raw: Path) -> subprocess.Popen:
    """A conversion (2 worker processes, in a session of its own) whose worker blocks reading a FIFO that
    nobody writes, returned once its scratch folder exists."""
    path = case_file(folder, FIRST_CASE, "t1")
    path.unlink()
    os.mkfifo(path)
    process = subprocess.Popen([str(BIN / "python"), str(CONVERT), str(folder), "502", "-j", "2"],
                               env=dict(os.environ, nnUNet_raw=str(raw)), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while not (raw.is_dir() and scratch_folders(raw)) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # its workers are reading cases
    return process


def stop_session(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def test_sigterm_stops_a_conversion_like_ctrl_c(brats_copy, tmp_path):
    raw = tmp_path / "raw"
    process = start_blocked_conversion(brats_copy, raw)
    try:
        assert len(scratch_folders(raw)) == 1
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        stop_session(process)
    assert process.returncode == 1 and "conversion stopped by SIGTERM; nothing was written" in stderr
    assert os.listdir(raw) == []


def test_a_killed_conversions_scratch_folder_is_removed_by_the_next_one(brats_copy, phantom_folder, tmp_path):
    raw = tmp_path / "raw"
    process = start_blocked_conversion(brats_copy, raw)
    try:
        left = scratch_folders(raw)
        assert len(left) == 1 and f".pid{process.pid}." in left[0]
    finally:
        stop_session(process)  # kill -9: nothing of ours runs
    assert scratch_folders(raw) == left
    running = raw / f".Dataset503_incomplete.pid{os.getpid()}.{socket.gethostname()}.abc"  # a running conversion's
    elsewhere = raw / f".Dataset504_incomplete.pid{process.pid}.other-node.abc"  # another machine's
    running.mkdir()
    elsewhere.mkdir()
    convert(phantom_folder, raw)
    assert sorted(os.listdir(raw)) == [running.name, elsewhere.name, "Dataset501_BraTS2018"]


def test_a_failed_delete_of_the_replaced_dataset_is_reported_and_hidden_from_nnunet(phantom_folder, tmp_path,
                                                                                    monkeypatch):
    raw = tmp_path / "raw"
    convert(phantom_folder, raw)
    real_rmtree = shutil.rmtree

    def rmtree_failing_on_replaced(path, ignore_errors=False, **kwargs):
        if "_replaced." not in str(path):
            return real_rmtree(path, ignore_errors=ignore_errors, **kwargs)
        if not ignore_errors:
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", rmtree_failing_on_replaced)
    with pytest.raises(ConversionError, match=r"wrote .*Dataset501_BraTS2018, but could not delete the dataset it "
                                              r"replaced, now hidden from nnU-Net in .*\.Dataset501_replaced\.pid"):
        convert(phantom_folder, raw, overwrite=True)
    # nnU-Net finds datasets by the folder prefix DatasetXXX: exactly one
    assert [d for d in os.listdir(raw) if d.startswith("Dataset501")] == ["Dataset501_BraTS2018"]
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    convert(phantom_folder, raw, overwrite=True)  # the next --overwrite works
    assert [d for d in os.listdir(raw) if d.startswith("Dataset501")] == ["Dataset501_BraTS2018"]
