"""Bad input that once did harm or gave a traceback: each case is refused with one message naming the file and
what was expected, and nothing is written (every test runs in-process on tiny files)."""
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_protokd.data.brats_labels import ConversionError, convert_predictions_to_brats
from nnunet_protokd.deploy.export import ExportError, export_student


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch):
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / variable).mkdir()
        monkeypatch.setenv(variable, str(tmp_path / variable))
    return tmp_path


@pytest.mark.parametrize("variable", ["nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"])
def test_export_never_writes_into_nnunet_folders(nnunet_folders, variable):
    """`export -o <model>/fold_0/checkpoint_final.pth --overwrite` once replaced the trained weights with the zip."""
    model = nnunet_folders / variable / "Dataset501_BraTS2018" / "ProtoKDTrainer__nnUNetPlans__3d_fullres_T1ce"
    fold = model / "fold_0"
    fold.mkdir(parents=True)
    (fold / "checkpoint_final.pth").write_bytes(b"trained weights")
    (nnunet_folders / "link").symlink_to(fold)  # a link into the folder is the folder
    for target in (fold / "checkpoint_final.pth", nnunet_folders / "link" / "checkpoint_final.pth",
                   fold / "model.zip"):
        with pytest.raises(ExportError, match=rf"{target} is inside {variable} \(.*\), whose files nnU-Net reads"):
            export_student("501", "3d_fullres_T1ce", "ProtoKDTrainer", ["0"], str(target), overwrite=True)
    assert (fold / "checkpoint_final.pth").read_bytes() == b"trained weights"
    assert sorted(p.name for p in fold.iterdir()) == ["checkpoint_final.pth"]


def test_back_conversion_refuses_to_write_over_its_input(tmp_path):
    """Run twice in place with --overwrite, it swapped labels 1 and 2 back."""
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    labels = np.array([[[0, 1], [2, 3]]], np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(predictions / "case.nii.gz"))
    (tmp_path / "link").symlink_to(predictions)
    for output in (predictions, tmp_path / "link"):
        with pytest.raises(ConversionError, match=rf"^the output folder {output} is the prediction folder"):
            convert_predictions_to_brats(str(predictions), str(output), overwrite=True)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / "case.nii.gz"))), labels)
