"""BraTS label conventions by generation (2018-2021, 2023, 2024 post-treatment with the resection cavity): the
converter never guesses silently, refuses a case that contradicts the convention, and every later stage (ProtoKD's
prototype classes, the report's regions, the back-conversion) carries the cavity as its own label and region."""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import REPO

from nnunet_protokd.data.brats import (
    CONVENTIONS,
    ConversionError,
    brats_to_nnunet_labels,
    convert_brats_dataset,
    convert_predictions_to_brats,
)
from nnunet_protokd.data.brats_labels import main as back_conversion_main
from nnunet_protokd.data.phantoms import generate_brats_phantoms
from nnunet_protokd.data.regions import evaluation_regions

SHAPE = (20, 24, 24)
BRATS2024_REGIONS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3],
                     "resection cavity": [4]}


def read(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def write_like(path, array, reference):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(sitk.ReadImage(str(reference)))
    sitk.WriteImage(image, str(path))


def convert(folder, raw, **kwargs) -> Path:
    return Path(convert_brats_dataset(str(folder), 501, str(raw), num_processes=1, **kwargs))


def load(path: Path):
    """A script or trainer file of this repository as a module, in-process."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def converter_main():
    return load(REPO / "dataset_conversion" / "convert_brats2018.py").main


@pytest.fixture
def cavity_phantoms(tmp_path) -> tuple:
    """The issue's reproduction: 2023-named phantoms whose first (high-grade) case lost its enhancing tumour
    (relabelled 0) and gained a small block of label 4 beside the core, as after a resection."""
    source = tmp_path / "phantoms"
    generate_brats_phantoms(str(source), num_hgg=2, num_lgg=1, seed=3, shape_zyx=SHAPE, naming="brats2023")
    case = sorted(os.listdir(source))[0]
    seg_path = source / case / f"{case}-seg.nii.gz"
    seg = read(seg_path)
    seg[seg == 3] = 0
    z, y, x = np.argwhere(seg == 1).max(axis=0)  # the block starts beside the core's far corner
    seg[z:z + 2, y:y + 2, x + 1:x + 3] = 4
    write_like(seg_path, seg, seg_path)
    return source, case, seg


def test_label_4_with_2023_names_is_the_resection_cavity_by_default(cavity_phantoms, tmp_path, capsys):
    source, case, seg = cavity_phantoms
    target = convert(source, tmp_path / "raw")
    assert target.name == "Dataset501_BraTS2024"
    said = capsys.readouterr().out
    assert "label convention: BraTS 2024 post-treatment glioma (1 NETC, 2 SNFH, 3 ET, 4 RC), from the BraTS 2023+ " \
           f"file names (-t1c.nii.gz), and label 4 (resection cavity) in 1 case(s), e.g. {case}" in said
    dataset = json.loads((target / "dataset.json").read_text())
    assert dataset["brats_generation"] == "brats2024" and dataset["labels"] == BRATS2024_REGIONS
    assert dataset["regions_class_order"] == [1, 2, 3, 4]
    labels = read(target / "labelsTr" / f"{case}.nii.gz")
    np.testing.assert_array_equal(labels == 4, seg == 4)  # the cavity apart from ...
    assert not (labels == 3).any()  # ... enhancing tumour, which this case has none of


def test_a_case_contradicting_the_chosen_convention_is_named_and_nothing_written(cavity_phantoms, tmp_path, capsys):
    source, case, _ = cavity_phantoms
    raw = tmp_path / "raw"
    seg_file = source / case / f"{case}-seg.nii.gz"
    assert converter_main()([str(source), "501", "--nnunet-raw", str(raw), "-j", "1",
                             "--label-convention", "brats2023"]) == 1
    error = capsys.readouterr().err
    error = error[error.index("error: "):]  # after tqdm's progress bar
    assert error.startswith("error: 1 problem(s) in the input under the BraTS 2023 labels (1 NETC, 2 SNFH, 3 ET; "
                            "from --label-convention brats2023); nothing was written")
    assert f"case {case}: {seg_file}: label 4 is not in the BraTS 2023 labels (1 NETC, 2 SNFH, 3 ET); label 4 is " \
           f"ET in BraTS 2018-2021 (--label-convention brats2018); label 4 is RC in BraTS 2024 post-treatment glioma " \
           f"(--label-convention brats2024)" in error
    assert not raw.exists() or os.listdir(raw) == []
    # a name that says the generation chooses it as well, and is said to be why
    with pytest.raises(ConversionError, match=rf"from the name 'BraTS2023_GLI'\); nothing was written:\n  "
                                              rf"case {case}: .*: label 4 is not in the BraTS 2023 labels"):
        convert(source, raw, dataset_name="BraTS2023_GLI")


def test_2023_names_without_label_4_are_brats2023(tmp_path, capsys):
    source = tmp_path / "phantoms"
    generate_brats_phantoms(str(source), num_hgg=1, num_lgg=1, seed=3, shape_zyx=SHAPE, naming="brats2023")
    dataset = json.loads((convert(source, tmp_path / "raw") / "dataset.json").read_text())
    assert dataset["brats_generation"] == "brats2023" and "resection cavity" not in dataset["labels"]
    assert dataset["regions_class_order"] == [1, 2, 3]
    assert "BraTS 2023 (1 NETC, 2 SNFH, 3 ET), from the BraTS 2023+ file names (-t1c.nii.gz), and no case has a " \
           "label 4" in capsys.readouterr().out


@pytest.fixture
def brats2024(tmp_path) -> Path:
    source = tmp_path / "BraTS2024-GLI"
    generate_brats_phantoms(str(source), num_hgg=2, num_lgg=1, seed=5, shape_zyx=SHAPE, naming="brats2024")
    return source


def test_a_2024_set_converts_with_the_cavity_as_label_and_region(brats2024, tmp_path):
    cases = sorted(os.listdir(brats2024))
    segs = {case: read(brats2024 / case / f"{case}-seg.nii.gz") for case in cases}
    assert all(4 in seg for seg in segs.values()) and any(3 in seg for seg in segs.values())
    target = convert(brats2024, tmp_path / "raw")
    dataset = json.loads((target / "dataset.json").read_text())
    assert dataset["labels"] == BRATS2024_REGIONS and dataset["brats_generation"] == "brats2024"
    assert "with the BraTS 2024 post-treatment glioma labels" in dataset["description"]
    for case in cases:
        labels = read(target / "labelsTr" / f"{case}.nii.gz")
        np.testing.assert_array_equal(labels, brats_to_nnunet_labels(segs[case], CONVENTIONS["brats2024"]))
        np.testing.assert_array_equal(np.isin(labels, (1, 2, 3)), np.isin(segs[case], (1, 2, 3)))  # WT without RC
    label_based = json.loads((convert(brats2024, tmp_path / "raw2", region_based=False) / "dataset.json").read_text())
    assert label_based["labels"] == {"background": 0, "edema": 1, "necrosis and non-enhancing core": 2,
                                     "enhancing tumor": 3, "resection cavity": 4}
    # the report scores the challenge's regions, the cavity apart, on both kinds of dataset
    expected = [("WT", (1, 2, 3)), ("TC", (2, 3)), ("ET", (3,)), ("RC", (4,))]
    assert evaluation_regions(dataset) == evaluation_regions(label_based) == expected


def test_back_conversion_writes_the_generations_own_labels(brats2024, tmp_path, capsys):
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    cases = sorted(os.listdir(brats2024))
    for case in cases:  # predictions equal to the ground truth, on its grid, as nnU-Net writes them
        seg_file = brats2024 / case / f"{case}-seg.nii.gz"
        write_like(predictions / f"{case}.nii.gz", brats_to_nnunet_labels(read(seg_file), CONVENTIONS["brats2024"]),
                   seg_file)
    assert back_conversion_main([str(predictions), str(tmp_path / "out"), "--reference", str(brats2024)]) == 0
    assert "BraTS 2024 post-treatment glioma labels 1 NETC, 2 SNFH, 3 ET, 4 RC" in capsys.readouterr().out
    for case in cases:
        np.testing.assert_array_equal(read(tmp_path / "out" / f"{case}.nii.gz"),
                                      read(brats2024 / case / f"{case}-seg.nii.gz"))
    # a convention without the cavity cannot hold a predicted cavity: refused, naming the case, file and label
    assert back_conversion_main([str(predictions), str(tmp_path / "out2"), "--label-convention", "brats2023"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: case {cases[0]}: {predictions / cases[0]}.nii.gz: label values [4] are not nnU-Net labels of BraTS "
        f"2023 (0-3); label 4 is the resection cavity of BraTS 2024 (--label-convention brats2024)")
    with pytest.raises(ConversionError, match=r"label values \[4\] are not nnU-Net labels of BraTS 2018-2021"):
        convert_predictions_to_brats(str(predictions), str(tmp_path / "out3"), CONVENTIONS["brats2018"])
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_protokd_prototype_classes_gain_the_cavity():
    """With the 2024 regions, ProtoKD's disjoint classes are background, oedema, necrosis, ET and RC; a voxel in
    the cavity region only (nnU-Net's region targets) lands in the cavity class; nnU-Net paints RC back as 4."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_protokd.training.losses import disjoint_region_classes, ground_truth_class_masks
    convention = CONVENTIONS["brats2024"]
    manager = LabelManager(convention.nnunet_regions, list(convention.regions_class_order))
    # what ProtoKDTrainer.prototype_classes and region_membership are (importing the trainer takes ~15 s here)
    classes, membership = disjoint_region_classes(manager.foreground_regions)
    assert classes == [(0,), (1,), (2,), (3,), (4,)]
    labels = torch.tensor([0, 1, 2, 3, 4])  # one voxel of each nnU-Net label, as region maps (N=1, R=4, 5 voxels)
    regions = torch.stack([torch.isin(labels, torch.tensor(r)) for r in manager.foreground_regions]).unsqueeze(0)
    masks = ground_truth_class_masks(regions.float(), True, manager.num_segmentation_heads, membership)
    assert torch.equal(masks[0], torch.eye(5))
    painted = manager.convert_probabilities_to_segmentation(regions[0].float())
    assert painted.tolist() == [0, 1, 2, 3, 4]
