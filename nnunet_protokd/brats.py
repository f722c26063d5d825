"""BraTS (2018-2023) folders <-> nnU-Net raw datasets.

BraTS labels: 1 = necrotic / non-enhancing core (NCR), 2 = oedema (ED), 4 = enhancing tumour (ET; 3 from
BraTS 2023 on). nnU-Net's own BraTS practice renumbers them so that the regions nest in increasing order:
1 = ED, 2 = NCR, 3 = ET, which gives whole tumour = {1,2,3}, tumour core = {2,3}, enhancing = {3} and lets
`regions_class_order` (1, 2, 3) paint a region prediction back into this label map.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from multiprocessing import Pool
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk

CHANNEL_NAMES = ("T1", "T1ce", "T2", "FLAIR")
NNUNET_LABELS = {"background": 0, "edema": 1, "necrosis and non-enhancing core": 2, "enhancing tumor": 3}
NNUNET_REGIONS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
REGIONS_CLASS_ORDER = (1, 2, 3)


class ConversionError(ValueError):
    """Input that cannot be converted; the message names every case and file at fault."""


@dataclass(frozen=True)
class BratsNaming:
    """How one generation of BraTS names its files: `<case><separator><suffix>.nii.gz`."""
    name: str
    separator: str
    modality_suffixes: tuple  # in nnU-Net channel order T1, T1ce, T2, FLAIR
    enhancing_labels: tuple  # label values that mean ET in this generation

    def file_name(self, case: str, suffix: str) -> str:
        return f"{case}{self.separator}{suffix}.nii.gz"


BRATS2018 = BratsNaming("brats2018", "_", ("t1", "t1ce", "t2", "flair"), (4,))  # also 2019-2021
BRATS2023 = BratsNaming("brats2023", "-", ("t1n", "t1c", "t2w", "t2f"), (3, 4))
NAMINGS = {n.name: n for n in (BRATS2018, BRATS2023)}
SEG_SUFFIX = "seg"


@dataclass(frozen=True)
class BratsCase:
    case_id: str
    folder: str


def find_case_folders(input_folder: str) -> list[BratsCase]:
    """Case folders directly in `input_folder` or one level down (BraTS 2018/2019: HGG/, LGG/)."""
    if not os.path.isdir(input_folder):
        raise ConversionError(f"input folder {input_folder} does not exist or is not a folder")
    cases = []
    for entry in sorted(os.listdir(input_folder)):
        path = os.path.join(input_folder, entry)
        if not os.path.isdir(path) or entry.startswith("."):
            continue
        if any(f.endswith((".nii.gz", ".nii")) for f in os.listdir(path)):
            cases.append(BratsCase(entry, path))
        else:  # a grade folder (HGG/LGG) holding case folders
            for sub in sorted(os.listdir(path)):
                subpath = os.path.join(path, sub)
                if os.path.isdir(subpath) and not sub.startswith("."):
                    cases.append(BratsCase(sub, subpath))
    if not cases:
        raise ConversionError(
            f"no BraTS case folders found in {input_folder}: expected HGG/ and LGG/ with one folder per case, or "
            f"case folders directly, each holding <case>_t1.nii.gz, <case>_t1ce.nii.gz, ... (or -t1n/-t1c/-t2w/-t2f)")
    seen = {}
    for case in cases:
        if case.case_id in seen:
            raise ConversionError(f"case {case.case_id} appears twice: {seen[case.case_id]} and {case.folder}")
        seen[case.case_id] = case.folder
    return cases


def detect_naming(cases: Sequence[BratsCase]) -> BratsNaming:
    """BraTS 2018-2021 files end in _t1ce.nii.gz, BraTS 2023 files in -t1c.nii.gz."""
    for case in cases:
        for naming in NAMINGS.values():
            if os.path.isfile(os.path.join(case.folder, naming.file_name(case.case_id, naming.modality_suffixes[1]))):
                return naming
    raise ConversionError(f"cannot tell the BraTS naming: no case has {cases[0].case_id}_t1ce.nii.gz (BraTS 2018-2021) "
                          f"or {cases[0].case_id}-t1c.nii.gz (BraTS 2023); first case folder: {cases[0].folder}")


def _read(path: str, case_id: str, errors: list) -> sitk.Image | None:
    try:
        return sitk.ReadImage(path)
    except Exception as exc:  # SimpleITK raises RuntimeError with its own wording; keep it for the user
        errors.append(f"case {case_id}: cannot read {path}: {str(exc).strip().splitlines()[-1]}")
        return None


def count_non_finite(path: str) -> int:
    """NaN/inf voxels of a NIfTI file. Read with nibabel because SimpleITK (ITK 5.4) silently turns NaN into 0,
    which would hide a broken scan from nnU-Net instead of reporting it."""
    import nibabel
    return int(np.count_nonzero(~np.isfinite(np.asarray(nibabel.load(path).dataobj))))


def geometry_mismatch(image: sitk.Image, reference: sitk.Image) -> str | None:
    """A sentence saying how `image`'s grid differs from `reference`'s, or None when they agree."""
    checks = (("shape", image.GetSize(), reference.GetSize(), 0),
              ("spacing", image.GetSpacing(), reference.GetSpacing(), 1e-4),
              ("origin", image.GetOrigin(), reference.GetOrigin(), 1e-3),
              ("direction", image.GetDirection(), reference.GetDirection(), 1e-4))
    for what, value, expected, tolerance in checks:
        if not np.allclose(value, expected, rtol=0, atol=tolerance):
            return f"{what} {tuple(np.round(value, 4))} differs from {tuple(np.round(expected, 4))}"
    return None


def _convert_case(args) -> tuple[str, bool, list]:
    """Checks one case and writes it into the (temporary) dataset folder. Returns (case, has_seg, errors)."""
    case, naming, images_folder, labels_folder = args
    errors: list = []
    expected = [naming.file_name(case.case_id, s) for s in naming.modality_suffixes]
    seg_name = naming.file_name(case.case_id, SEG_SUFFIX)
    present = {f for f in os.listdir(case.folder) if f.endswith((".nii.gz", ".nii"))}
    for name in sorted(present - set(expected) - {seg_name}):
        errors.append(f"case {case.case_id}: unexpected file {os.path.join(case.folder, name)} "
                      f"(expected only {', '.join(expected)} and {seg_name})")
    for name in expected:
        if name not in present:
            errors.append(f"case {case.case_id}: missing modality file {os.path.join(case.folder, name)}")
    has_seg = seg_name in present
    if errors:
        return case.case_id, has_seg, errors

    reference = None
    for channel, name in enumerate(expected):
        path = os.path.join(case.folder, name)
        image = _read(path, case.case_id, errors)
        if image is None:
            continue
        if reference is None:
            reference, reference_path = image, path
        elif (problem := geometry_mismatch(image, reference)) is not None:
            errors.append(f"case {case.case_id}: {path}: {problem} of {reference_path}")
            continue
        n_bad = count_non_finite(path)
        if n_bad:
            errors.append(f"case {case.case_id}: {path} has {n_bad} NaN/inf voxels")
            continue
        # the file itself is fine: copy it byte for byte, so that nothing (dtype, header) changes
        shutil.copyfile(path, os.path.join(images_folder, f"{case.case_id}_{channel:04d}.nii.gz"))

    if has_seg and reference is not None:
        seg_path = os.path.join(case.folder, seg_name)
        seg = _read(seg_path, case.case_id, errors)
        if seg is not None:
            if (problem := geometry_mismatch(seg, reference)) is not None:
                errors.append(f"case {case.case_id}: {seg_path}: {problem} of {reference_path}")
            elif n_bad := count_non_finite(seg_path):
                errors.append(f"case {case.case_id}: {seg_path} has {n_bad} NaN/inf voxels")
            else:
                try:
                    labels = brats_to_nnunet_labels(sitk.GetArrayFromImage(seg), naming)
                except ConversionError as exc:
                    errors.append(f"case {case.case_id}: {seg_path}: {exc}")
                else:
                    out = sitk.GetImageFromArray(labels)
                    out.CopyInformation(seg)
                    sitk.WriteImage(out, os.path.join(labels_folder, f"{case.case_id}.nii.gz"), True)
    return case.case_id, has_seg, errors


def brats_to_nnunet_labels(seg: np.ndarray, naming: BratsNaming = BRATS2018) -> np.ndarray:
    """BraTS label map -> nnU-Net labels (0 bg, 1 ED, 2 NCR, 3 ET) as uint8. Raises on foreign values."""
    values = np.unique(seg)
    allowed = {0, 1, 2, *naming.enhancing_labels}
    foreign = [v for v in values.tolist() if v not in allowed]
    if foreign:
        raise ConversionError(f"label values {foreign} outside the allowed {sorted(allowed)}")
    present_et = [v for v in naming.enhancing_labels if v in values]
    if len(present_et) > 1:
        raise ConversionError(f"both {present_et} used as enhancing tumour; a BraTS label map uses one of them")
    out = np.zeros(seg.shape, dtype=np.uint8)
    out[seg == 2] = 1
    out[seg == 1] = 2
    for et in naming.enhancing_labels:
        out[seg == et] = 3
    return out


def nnunet_to_brats_labels(labels: np.ndarray, enhancing_label: int = 4) -> np.ndarray:
    """nnU-Net labels (0 bg, 1 ED, 2 NCR, 3 ET) -> BraTS label map (ET = `enhancing_label`) as uint8."""
    foreign = sorted(set(np.unique(labels).tolist()) - {0, 1, 2, 3})
    if foreign:
        raise ConversionError(f"label values {foreign} are not nnU-Net BraTS labels 0-3")
    lookup = np.array([0, 2, 1, enhancing_label], dtype=np.uint8)
    return lookup[labels.astype(np.int64)]


def _dataset_folders(nnunet_raw: str, dataset_id: int) -> list[str]:
    return sorted(d for d in os.listdir(nnunet_raw) if d.startswith(f"Dataset{dataset_id:03d}_")) \
        if os.path.isdir(nnunet_raw) else []


def _run_cases(jobs: list, num_processes: int, description: str) -> list:
    from tqdm import tqdm
    if num_processes <= 1:
        return [_convert_case(j) for j in tqdm(jobs, desc=description, unit="case")]
    with Pool(num_processes) as pool:
        return list(tqdm(pool.imap(_convert_case, jobs), total=len(jobs), desc=description, unit="case"))


def convert_brats_dataset(input_folder: str, dataset_id: int, nnunet_raw: str, dataset_name: str | None = None,
                          test_folder: str | None = None, region_based: bool = True, overwrite: bool = False,
                          num_processes: int = 2) -> str:
    """Writes nnUNet_raw/DatasetXXX_NAME from a BraTS training folder (and optionally a validation/test folder,
    into imagesTs, with labelsTs when its cases have segmentations).

    The dataset is assembled in a temporary folder next to its destination and moved into place only when
    every case converted; on any error nothing is left behind and ConversionError lists all problems.
    Returns the path of the new dataset folder.
    """
    if not 1 <= int(dataset_id) <= 999:
        raise ConversionError(f"dataset id must be 1..999, got {dataset_id}")
    train_cases = find_case_folders(input_folder)
    naming = detect_naming(train_cases)
    test_cases = find_case_folders(test_folder) if test_folder else []
    if test_cases and detect_naming(test_cases) != naming:
        raise ConversionError(f"{test_folder} uses {detect_naming(test_cases).name} names, {input_folder} uses {naming.name}")
    clash = {c.case_id for c in train_cases} & {c.case_id for c in test_cases}
    if clash:
        raise ConversionError(f"cases in both the training and the test folder: {sorted(clash)[:10]}")
    dataset_name = dataset_name or ("BraTS2018" if naming is BRATS2018 else "BraTS2023")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", dataset_name):
        raise ConversionError(f"dataset name {dataset_name!r} may only hold letters, digits, '_' and '-'")
    target = os.path.join(nnunet_raw, f"Dataset{int(dataset_id):03d}_{dataset_name}")
    existing = _dataset_folders(nnunet_raw, int(dataset_id))
    if existing and not overwrite:
        raise ConversionError(f"{os.path.join(nnunet_raw, existing[0])} already exists; pass --overwrite to replace it")

    os.makedirs(nnunet_raw, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".Dataset{int(dataset_id):03d}_incomplete_", dir=nnunet_raw)
    try:
        folders = {k: os.path.join(staging, k) for k in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
        for folder in folders.values():
            os.makedirs(folder)
        jobs = [(c, naming, folders["imagesTr"], folders["labelsTr"]) for c in train_cases]
        jobs += [(c, naming, folders["imagesTs"], folders["labelsTs"]) for c in test_cases]
        results = _run_cases(jobs, num_processes, f"converting {len(jobs)} BraTS cases")
        errors = [e for _, _, case_errors in results for e in case_errors]
        for case_id, has_seg, _ in results[:len(train_cases)]:
            if not has_seg:
                errors.append(f"case {case_id}: missing segmentation {naming.file_name(case_id, SEG_SUFFIX)} in the "
                              f"training folder (a validation/test folder without labels goes in --test)")
        test_results = results[len(train_cases):]
        labelled_tests = sum(has_seg for _, has_seg, _ in test_results)
        if 0 < labelled_tests < len(test_results):  # labelsTs must describe every test case or none
            errors += [f"case {case_id}: missing segmentation {naming.file_name(case_id, SEG_SUFFIX)}; other cases "
                       f"of {test_folder} have one" for case_id, has_seg, _ in test_results if not has_seg]
        if errors:
            shown = "\n  ".join(errors[:30])
            more = f"\n  ... and {len(errors) - 30} more" if len(errors) > 30 else ""
            raise ConversionError(f"{len(errors)} problem(s) in the input; nothing was written:\n  {shown}{more}")
        for kind in ("imagesTs", "labelsTs"):
            if not os.listdir(folders[kind]):
                os.rmdir(folders[kind])
        write_dataset_json(staging, len(train_cases), region_based, dataset_name, naming)
        _move_into_place(staging, target, [os.path.join(nnunet_raw, e) for e in existing])
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def write_dataset_json(folder: str, num_training_cases: int, region_based: bool, dataset_name: str,
                       naming: BratsNaming) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    generate_dataset_json(
        folder, channel_names=dict(enumerate(CHANNEL_NAMES)),
        labels=NNUNET_REGIONS if region_based else NNUNET_LABELS,
        num_training_cases=num_training_cases, file_ending=".nii.gz",
        regions_class_order=REGIONS_CLASS_ORDER if region_based else None,
        dataset_name=dataset_name, reference="https://www.synapse.org/brats",
        description=f"BraTS converted by nnunet-protokd from the {naming.name} layout. nnU-Net labels: 1 = edema, "
                    f"2 = necrosis/non-enhancing core, 3 = enhancing tumour (BraTS 2, 1, {naming.enhancing_labels[0]}).",
        license="see the BraTS challenge data terms", converted_by="nnunet-protokd",
        brats_naming=naming.name)


def _move_into_place(staging: str, target: str, replaced: Iterable[str]) -> None:
    """Renames are atomic on one file system: the dataset appears whole or not at all."""
    replaced = list(replaced)
    graveyard = []
    for old in replaced:
        grave = old.rstrip(os.sep) + ".replaced"
        os.rename(old, grave)
        graveyard.append(grave)
    os.rename(staging, target)
    for grave in graveyard:
        shutil.rmtree(grave, ignore_errors=True)


def convert_predictions_to_brats(prediction_folder: str, output_folder: str, enhancing_label: int = 4,
                                 reference_folder: str | None = None, overwrite: bool = False) -> list[str]:
    """nnU-Net predictions (<case>.nii.gz, labels 0-3) -> BraTS label maps <case>.nii.gz (0/1/2/4).

    With `reference_folder` (the original BraTS folder), each output takes the exact grid of the case's
    original T1 file, after checking that the shapes agree; otherwise it keeps the prediction's grid, which
    nnU-Net writes from the input image it predicted on.
    """
    predictions = sorted(f for f in os.listdir(prediction_folder) if f.endswith(".nii.gz"))
    if not predictions:
        raise ConversionError(f"no .nii.gz predictions in {prediction_folder}")
    if os.path.isdir(output_folder) and os.listdir(output_folder) and not overwrite:
        raise ConversionError(f"{output_folder} is not empty; pass --overwrite to write into it")
    references = {}
    if reference_folder:
        cases = find_case_folders(reference_folder)
        naming = detect_naming(cases)
        references = {c.case_id: os.path.join(c.folder, naming.file_name(c.case_id, naming.modality_suffixes[0]))
                      for c in cases}
    converted = []
    for name in predictions:
        case_id = name[:-len(".nii.gz")]
        path = os.path.join(prediction_folder, name)
        prediction = sitk.ReadImage(path)
        try:
            brats = nnunet_to_brats_labels(sitk.GetArrayFromImage(prediction), enhancing_label)
        except ConversionError as exc:
            raise ConversionError(f"case {case_id}: {path}: {exc}") from None
        out = sitk.GetImageFromArray(brats)
        grid = prediction
        if reference_folder:
            if case_id not in references:
                raise ConversionError(f"case {case_id}: no original case folder in {reference_folder}")
            grid = sitk.ReadImage(references[case_id])
            if grid.GetSize() != prediction.GetSize():
                raise ConversionError(f"case {case_id}: prediction shape {prediction.GetSize()} differs from the "
                                      f"original {references[case_id]} {grid.GetSize()}")
        out.CopyInformation(grid)
        converted.append((case_id, out))
    os.makedirs(output_folder, exist_ok=True)
    for case_id, image in converted:  # every case checked above before the first file is written
        sitk.WriteImage(image, os.path.join(output_folder, f"{case_id}.nii.gz"), True)
    return [c for c, _ in converted]
