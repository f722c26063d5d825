"""Tests for the synthetic BraTS phantom generator (layout, geometry, labels, contrasts)."""
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_protokd.data.brats import convert_brats_dataset
from nnunet_protokd.data.phantoms import MODALITIES, generate_brats_phantoms

SMALL_SHAPE = (16, 24, 24)
SUFFIX_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}


def _case_files(case_folder, naming):
    case_id = os.path.basename(case_folder)
    if naming == "brats2018":
        images = {m: os.path.join(case_folder, f"{case_id}_{m}.nii.gz") for m in MODALITIES}
        return images, os.path.join(case_folder, f"{case_id}_seg.nii.gz")
    images = {m: os.path.join(case_folder, f"{case_id}-{SUFFIX_2023[m]}.nii.gz") for m in MODALITIES}
    return images, os.path.join(case_folder, f"{case_id}-seg.nii.gz")


def _load_case(case_folder, naming="brats2018"):
    image_files, seg_file = _case_files(case_folder, naming)
    images = {m: sitk.GetArrayFromImage(sitk.ReadImage(f)) for m, f in image_files.items()}
    return images, sitk.GetArrayFromImage(sitk.ReadImage(seg_file))


@pytest.fixture(scope="module")
def default_cases(tmp_path_factory):
    """A few cases at the default shape, loaded once for the anatomy and contrast tests."""
    folder = tmp_path_factory.mktemp("phantoms") / "brats"
    case_folders = generate_brats_phantoms(str(folder), num_hgg=4, num_lgg=3, seed=3)
    return [(os.path.basename(c), *_load_case(c)) for c in case_folders]


def test_brats2018_layout_and_file_names(tmp_path):
    out = tmp_path / "brats18"
    cases = generate_brats_phantoms(str(out), num_hgg=2, num_lgg=1, shape_zyx=SMALL_SHAPE)
    expected = [out / "HGG" / "Brats18_PHANTOM_HGG_000", out / "HGG" / "Brats18_PHANTOM_HGG_001",
                out / "LGG" / "Brats18_PHANTOM_LGG_000"]
    assert cases == [str(p) for p in expected]
    assert all(os.path.isabs(c) for c in cases)
    assert sorted(os.listdir(out)) == ["HGG", "LGG"]
    for case in cases:
        case_id = os.path.basename(case)
        expected_files = {f"{case_id}_{m}.nii.gz" for m in MODALITIES} | {f"{case_id}_seg.nii.gz"}
        assert set(os.listdir(case)) == expected_files
        _, seg = _load_case(case)
        assert set(np.unique(seg)) <= {0, 1, 2, 4}


def test_brats2023_layout_and_labels(tmp_path):
    out = tmp_path / "brats23"
    cases = generate_brats_phantoms(str(out), num_hgg=2, num_lgg=2, shape_zyx=SMALL_SHAPE, naming="brats2023")
    assert [os.path.basename(c) for c in cases] == [f"BraTS-GLI-{k:05d}-000" for k in range(4)]
    assert sorted(os.listdir(out)) == sorted(os.path.basename(c) for c in cases)  # flat, no grade folders
    for k, case in enumerate(cases):
        case_id = os.path.basename(case)
        expected_files = {f"{case_id}-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f", "seg")}
        assert set(os.listdir(case)) == expected_files
        _, seg = _load_case(case, naming="brats2023")
        assert set(np.unique(seg)) <= {0, 1, 2, 3}
        if k < 2:  # high-grade cases come first
            assert {1, 2, 3} <= set(np.unique(seg))


def test_geometry_is_shared_within_a_case_and_not_identity(tmp_path):
    spacing = (0.9, 1.1, 2.5)
    cases = generate_brats_phantoms(str(tmp_path / "out"), num_hgg=1, num_lgg=1, shape_zyx=SMALL_SHAPE,
                                    spacing_xyz=spacing)
    origins = []
    for case in cases:
        image_files, seg_file = _case_files(case, "brats2018")
        headers = [sitk.ReadImage(f) for f in list(image_files.values()) + [seg_file]]
        reference = headers[0]
        for image in headers:
            assert image.GetSize() == reference.GetSize() == SMALL_SHAPE[::-1]
            assert image.GetSpacing() == pytest.approx(spacing)
            assert image.GetOrigin() == reference.GetOrigin()
            assert image.GetDirection() == reference.GetDirection()
        assert all(h.GetPixelID() == sitk.sitkFloat32 for h in headers[:4])
        assert headers[4].GetPixelID() == sitk.sitkUInt8
        assert not np.allclose(np.reshape(reference.GetDirection(), (3, 3)), np.eye(3))
        assert np.linalg.norm(reference.GetOrigin()) > 10
        origins.append(reference.GetOrigin())
    assert origins[0] != origins[1]


def test_skull_stripped_with_identical_brain_mask(default_cases):
    for case_id, images, seg in default_cases:
        brain = images["t1"] != 0
        for modality in MODALITIES:
            image = images[modality]
            assert image.dtype == np.float32
            assert np.array_equal(image != 0, brain), (case_id, modality)
            assert np.all(image[brain] > 0) and np.all(image[~brain] == 0.0)
        assert np.all(seg[~brain] == 0), "tumour labels outside the brain"
        # An ellipsoid-like brain in the middle: it never touches the volume border.
        for axis in range(3):
            extent = brain.any(axis=tuple(a for a in range(3) if a != axis))
            assert not extent[0] and not extent[-1]
            assert 0.4 < extent.mean() < 0.85


def test_tumour_labels_per_grade(default_cases):
    for case_id, _, seg in default_cases:
        counts = np.bincount(seg.ravel(), minlength=5)
        assert set(np.unique(seg)) <= {0, 1, 2, 4}
        assert counts[1:].sum() > 0
        if "_HGG_" in case_id:
            assert counts[1] > 0 and counts[2] > 0 and counts[4] >= 30, (case_id, counts)
            assert counts[2] > counts[4], "oedema should be the largest compartment"
        else:
            assert counts[1] > 0 and counts[2] > 0


def test_modality_contrasts(default_cases):
    for case_id, images, seg in [c for c in default_cases if "_HGG_" in c[0]]:
        brain = images["t1"] > 0
        normal, oedema, necrosis, enhancing = brain & (seg == 0), seg == 2, seg == 1, seg == 4

        def mean(modality, region):
            return float(images[modality][region].mean())

        # T1ce is where enhancing tumour stands out (seen through the annotation, whose boundaries stray into
        # neighbouring compartments: the contrast of the tissue itself is test_realism_audit's)
        assert mean("t1ce", enhancing) > 1.15 * mean("t1ce", oedema), case_id
        assert mean("t1ce", enhancing) > 1.15 * mean("t1ce", necrosis), case_id
        # ...but not on plain T1, where it is roughly iso-intense to normal brain.
        t1ce_contrast = abs(mean("t1ce", enhancing) / mean("t1ce", normal) - 1)
        t1_contrast = abs(mean("t1", enhancing) / mean("t1", normal) - 1)
        assert t1ce_contrast > 0.15 and t1_contrast < 0.3, case_id
        # Necrosis is dark on T1; oedema is bright on FLAIR and T2.
        assert mean("t1", necrosis) < 0.8 * mean("t1", normal), case_id
        assert mean("flair", oedema) > 1.5 * mean("flair", normal), case_id
        assert mean("t2", oedema) > 1.1 * mean("t2", normal), case_id


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    kwargs = dict(num_hgg=1, num_lgg=1, shape_zyx=SMALL_SHAPE)
    first = generate_brats_phantoms(str(tmp_path / "a"), seed=7, **kwargs)
    second = generate_brats_phantoms(str(tmp_path / "b"), seed=7, **kwargs)
    other = generate_brats_phantoms(str(tmp_path / "c"), seed=8, **kwargs)
    for case_a, case_b, case_c in zip(first, second, other):
        for file_a, file_b in zip(sorted(os.listdir(case_a)), sorted(os.listdir(case_b))):
            with open(os.path.join(case_a, file_a), "rb") as bytes_a:
                with open(os.path.join(case_b, file_b), "rb") as bytes_b:
                    assert bytes_a.read() == bytes_b.read(), file_a
        images_a, _ = _load_case(case_a)
        images_c, _ = _load_case(case_c)
        assert not np.array_equal(images_a["t1"], images_c["t1"])


def test_case_does_not_depend_on_case_counts(tmp_path):
    few = generate_brats_phantoms(str(tmp_path / "few"), num_hgg=1, num_lgg=1, shape_zyx=SMALL_SHAPE)
    many = generate_brats_phantoms(str(tmp_path / "many"), num_hgg=2, num_lgg=2, shape_zyx=SMALL_SHAPE)
    for case_few, case_many in ((few[0], many[0]), (few[1], many[2])):
        assert os.path.basename(case_few) == os.path.basename(case_many)
        images_few, seg_few = _load_case(case_few)
        images_many, seg_many = _load_case(case_many)
        assert np.array_equal(seg_few, seg_many)
        assert all(np.array_equal(images_few[m], images_many[m]) for m in MODALITIES)


def test_first_case_index_gives_held_out_sets_their_own_ids_and_content(tmp_path):
    train = generate_brats_phantoms(str(tmp_path / "train"), num_hgg=1, num_lgg=1, shape_zyx=SMALL_SHAPE)
    held_out = generate_brats_phantoms(str(tmp_path / "test"), num_hgg=1, num_lgg=1, shape_zyx=SMALL_SHAPE,
                                       with_segmentation=False, first_case_index=100)
    assert [os.path.basename(c) for c in held_out] == ["Brats18_PHANTOM_HGG_100", "Brats18_PHANTOM_LGG_100"]
    flat = generate_brats_phantoms(str(tmp_path / "flat"), num_hgg=1, num_lgg=1, shape_zyx=SMALL_SHAPE,
                                   naming="brats2023", first_case_index=100)
    assert [os.path.basename(c) for c in flat] == ["BraTS-GLI-00100-000", "BraTS-GLI-00101-000"]
    # Same seed, different case numbers: the held-out cases must not duplicate the training cases.
    for train_case, held_out_case in zip(train, held_out):
        train_t1 = sitk.GetArrayFromImage(sitk.ReadImage(_case_files(train_case, "brats2018")[0]["t1"]))
        held_out_t1 = sitk.GetArrayFromImage(sitk.ReadImage(_case_files(held_out_case, "brats2018")[0]["t1"]))
        assert not np.array_equal(train_t1, held_out_t1)


def test_without_segmentation_writes_no_seg(tmp_path):
    cases = generate_brats_phantoms(str(tmp_path / "val"), num_hgg=1, num_lgg=1, shape_zyx=SMALL_SHAPE,
                                    with_segmentation=False)
    for case in cases:
        files = os.listdir(case)
        assert len(files) == 4 and not any("seg" in f for f in files)


def test_refuses_non_empty_output_folder(tmp_path):
    (tmp_path / "existing.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an empty"):
        generate_brats_phantoms(str(tmp_path), num_hgg=1, num_lgg=1, shape_zyx=SMALL_SHAPE)
    assert os.listdir(tmp_path) == ["existing.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(generate_brats_phantoms(str(empty), num_hgg=1, num_lgg=1, shape_zyx=SMALL_SHAPE)) == 2


@pytest.mark.parametrize("kwargs, argument", [
    (dict(num_hgg=0, num_lgg=0), "num_hgg and num_lgg"),
    (dict(num_hgg=1.5), "num_hgg"),
    (dict(num_lgg=-1), "num_lgg"),
    (dict(shape_zyx=(8, 48, 48)), "shape_zyx"),
    (dict(shape_zyx=(32, 48)), "shape_zyx"),
    (dict(spacing_xyz=(1.0, -1.0, 2.0)), "spacing_xyz"),
    (dict(naming="brats2021"), "naming"),
    (dict(seed=-1), "seed"),
    (dict(first_case_index=-1), "first_case_index"),
])
def test_bad_arguments_raise(tmp_path, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        generate_brats_phantoms(str(tmp_path / "out"), **kwargs)
    assert not (tmp_path / "out").exists()


def test_one_grade_may_be_absent(tmp_path):
    """A cohort of one grade (BraTS 2023 and later have no LGG folder): the other grade's count is 0."""
    written = generate_brats_phantoms(str(tmp_path / "hgg_only"), num_hgg=2, num_lgg=0, shape_zyx=SMALL_SHAPE)
    assert [os.path.basename(os.path.dirname(case)) for case in written] == ["HGG", "HGG"]
    assert sorted(os.listdir(tmp_path / "hgg_only")) == ["HGG"]
    dataset = convert_brats_dataset(str(tmp_path / "hgg_only"), 501, str(tmp_path / "raw"), num_processes=1)
    assert len(os.listdir(os.path.join(dataset, "labelsTr"))) == 2


def test_realism_audit_weak_evidence_outside_main_modality_and_rater_disagreement():
    """Each region boundary is strongest in the modality radiologists read it from and weak but non-zero in the
    others; two annotations of one phantom disagree at boundaries about as BraTS raters do."""
    from nnunet_protokd.data.phantoms import audit_phantoms
    audit = audit_phantoms(num_cases=6)
    main = {"whole tumour vs normal brain": ("t2", "flair"), "tumour core vs oedema": ("t1ce",),
            "enhancing vs the other tumour": ("t1ce",)}
    for boundary, per_modality in audit["cnr"].items():
        strong = [per_modality[m] for m in main[boundary]]
        weak = [v for m, v in per_modality.items() if m not in main[boundary]]
        assert min(strong) > 2.5 and max(weak) < min(strong), (boundary, per_modality)
        assert min(weak) > 0.2, (boundary, per_modality)  # never no evidence at all
    dice = audit["inter_rater_dice"]
    assert 0.8 < dice["whole tumour"] < 0.92
    assert dice["enhancing tumour"] < dice["tumour core"] < dice["whole tumour"]


def test_labels_are_an_annotation_not_the_tissue_map(tmp_path):
    """The written label map differs from the image's compartments at boundaries only: Dice of whole tumour
    against the noiseless map stays high but below 1."""
    import nnunet_protokd.data.phantoms as phantoms
    rng = np.random.default_rng(0)
    _, tissue = phantoms._simulate_case(rng, SMALL_SHAPE, high_grade=True)
    annotated = phantoms._annotate(rng, tissue)
    truth, annotation = tissue >= phantoms._OEDEMA, annotated >= phantoms._OEDEMA
    dice = 2 * (truth & annotation).sum() / (truth.sum() + annotation.sum())
    assert 0.75 < dice < 0.99
    assert np.all(annotated[tissue == 0] == 0)
