import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import BIN, REPO, run
from nnunet_protokd.brats import (BRATS2023, ConversionError, brats_to_nnunet_labels, convert_brats_dataset,
                                  convert_predictions_to_brats, nnunet_to_brats_labels)
from nnunet_protokd.phantoms import generate_brats_phantoms

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
    np.testing.assert_array_equal(nnunet_to_brats_labels(brats_to_nnunet_labels(seg2023, BRATS2023), 3), seg2023)


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
    assert sorted(os.listdir(target / "labelsTs")) == ["Brats18_PHANTOM_HGG_200.nii.gz", "Brats18_PHANTOM_HGG_201.nii.gz",
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
    return r"_seg.nii.gz: label values \[3\] outside the allowed \[0, 1, 2, 4\]"


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


@pytest.mark.parametrize("damage", [damage_missing_modality, damage_extra_modality, damage_shape, damage_spacing,
                                    damage_origin, damage_direction, damage_labels, damage_nan, damage_unreadable,
                                    damage_missing_seg])
def test_bad_input_is_named_and_leaves_nothing(brats_copy, tmp_path, damage):
    expected = damage(brats_copy)
    raw = tmp_path / "raw"
    with pytest.raises(ConversionError, match=f"case {FIRST_CASE}: .*{expected}"):
        convert(brats_copy, raw)
    assert os.listdir(raw) == []


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


def test_predictions_back_to_brats_with_original_geometry(phantom_folder, tmp_path):
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    reference = case_file(phantom_folder, FIRST_CASE, "seg")
    nnunet_labels = brats_to_nnunet_labels(sitk.GetArrayFromImage(sitk.ReadImage(str(reference))))
    prediction = sitk.GetImageFromArray(nnunet_labels)  # deliberately without geometry
    sitk.WriteImage(prediction, str(predictions / f"{FIRST_CASE}.nii.gz"))
    convert_predictions_to_brats(str(predictions), str(tmp_path / "out"), reference_folder=str(phantom_folder))
    result = sitk.ReadImage(str(tmp_path / "out" / f"{FIRST_CASE}.nii.gz"))
    original = sitk.ReadImage(str(reference))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result), sitk.GetArrayFromImage(original))
    assert result.GetDirection() == original.GetDirection() and result.GetOrigin() == original.GetOrigin()
    with pytest.raises(ConversionError, match="not empty"):
        convert_predictions_to_brats(str(predictions), str(tmp_path / "out"))
