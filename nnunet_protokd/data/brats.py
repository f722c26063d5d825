"""BraTS (2018-2024) folders <-> nnU-Net raw datasets.

BraTS labels differ by generation (brats_labels.py: LabelConvention, which also converts predictions back).
nnU-Net's own BraTS practice renumbers them so that the regions nest in increasing order: 1 = oedema, 2 =
necrosis / non-enhancing core, 3 = enhancing tumour, which gives whole tumour = {1,2,3}, tumour core = {2,3},
enhancing = {3} and lets `regions_class_order` (1, 2, 3) paint a region prediction back into this label map.
BraTS 2024's resection cavity is label 4 and a region of its own, outside the tumour regions.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from multiprocessing import Pool
from typing import Iterable

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from tqdm import tqdm

# the way back, part of this module's interface too
from nnunet_protokd.data.brats_labels import (  # noqa: F401
    BRATS2018,
    BRATS2023,
    CONVENTIONS,
    SEG_SUFFIX,
    BratsNaming,
    ConversionError,
    LabelConvention,
    back_conversion_convention,
    brats_to_nnunet_labels,
    convention_named_in,
    convert_predictions_to_brats,
    detect_naming,
    find_case_folders,
    geometry_mismatch,
    label_problem,
    nnunet_to_brats_labels,
)
from nnunet_protokd.data.images import count_non_finite, scan_problem  # noqa: F401 (count_non_finite: part of this API)
from nnunet_protokd.io import Owner

CHANNEL_NAMES = ("T1", "T1ce", "T2", "FLAIR")
# the BraTS 2018-2023 dataset.json entries (BraTS 2024 adds the resection cavity: LabelConvention)
NNUNET_LABELS = CONVENTIONS["brats2018"].nnunet_labels
NNUNET_REGIONS = CONVENTIONS["brats2018"].nnunet_regions
REGIONS_CLASS_ORDER = CONVENTIONS["brats2018"].regions_class_order


def _read(path: str, case_id: str, errors: list) -> sitk.Image | None:
    try:
        return sitk.ReadImage(path)
    except Exception as exc:  # SimpleITK raises RuntimeError with its own wording; keep it for the user
        errors.append(f"case {case_id}: cannot read {path}: {str(exc).strip().splitlines()[-1]}")
        return None


def _convert_case(args) -> tuple[str, bool, list, tuple]:
    """Checks one case and writes it into the (temporary) dataset folder under the label convention given.
    Returns (case, has_seg, errors, the BraTS label values of its segmentation)."""
    case, naming, convention, images_folder, labels_folder = args
    errors: list = []
    values: tuple = ()
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
        return case.case_id, has_seg, errors, values

    reference = None
    for channel, name in enumerate(expected):
        path = os.path.join(case.folder, name)
        # first, before SimpleITK reads it: a folder, a truncated, 4D or vector image, NaN/inf, or empty (all zero)
        if (problem := scan_problem(path)) is not None:
            errors.append(f"case {case.case_id}: {problem}")
            continue
        image = _read(path, case.case_id, errors)
        if image is None:
            continue
        if reference is None:
            reference, reference_path = image, path
        elif (problem := geometry_mismatch(image, reference)) is not None:
            errors.append(f"case {case.case_id}: {path}: {problem} of {reference_path}")
            continue
        # the file itself is fine: copy it byte for byte, so that nothing (dtype, header) changes
        shutil.copyfile(path, os.path.join(images_folder, f"{case.case_id}_{channel:04d}.nii.gz"))

    if has_seg and reference is not None:
        seg_path = os.path.join(case.folder, seg_name)
        seg = None
        if (problem := scan_problem(seg_path, constant_allowed=True)) is not None:
            errors.append(f"case {case.case_id}: {problem}")
        else:
            seg = _read(seg_path, case.case_id, errors)
        if seg is not None:
            if (problem := geometry_mismatch(seg, reference)) is not None:
                errors.append(f"case {case.case_id}: {seg_path}: {problem} of {reference_path}")
            else:
                array = sitk.GetArrayFromImage(seg)
                values = tuple(int(v) for v in np.unique(array))
                try:
                    labels = brats_to_nnunet_labels(array, convention)
                except ConversionError as exc:
                    errors.append(f"case {case.case_id}: {seg_path}: {exc}")
                else:
                    out = sitk.GetImageFromArray(labels)
                    out.CopyInformation(seg)
                    sitk.WriteImage(out, os.path.join(labels_folder, f"{case.case_id}.nii.gz"), True)
    return case.case_id, has_seg, errors, values


def choose_convention(naming: BratsNaming, label_convention: str | None, names: Iterable[str]) -> tuple:
    """(convention to convert with, why, whether the segmentations decide between BraTS 2023 and 2024).

    Never a silent guess: the user's --label-convention; else BraTS 2018-2021's for its file names; else for
    2023+ names the generation a dataset or folder name in `names` states; else BraTS 2024's, label 4 being the
    resection cavity, recorded as BraTS 2023 when no case has a label 4."""
    if label_convention is not None:
        if label_convention not in CONVENTIONS:
            raise ConversionError(f"label convention {label_convention!r} is not one of {', '.join(CONVENTIONS)}")
        return CONVENTIONS[label_convention], f"--label-convention {label_convention}", False
    if naming is BRATS2018:
        return CONVENTIONS["brats2018"], "the BraTS 2018-2021 file names (_t1ce.nii.gz)", False
    for name in names:
        if name and (convention := convention_named_in(name)) is not None:
            return convention, f"the name {name!r}", False
    return CONVENTIONS["brats2024"], "the BraTS 2023+ file names (-t1c.nii.gz)", True


def _dataset_folders(nnunet_raw: str, dataset_id: int) -> list[str]:
    return sorted(d for d in os.listdir(nnunet_raw) if d.startswith(f"Dataset{dataset_id:03d}_")) \
        if os.path.isdir(nnunet_raw) else []


# Our scratch folders in nnUNet_raw are hidden (nnU-Net does not take them for datasets) and carry their owner
# in their name, so that a later conversion can remove those left by a conversion that was killed (kill -9, a
# node failure): ".Dataset501_incomplete.pid1234.node7.k2j4_x9a" (a dataset being assembled) or
# ".Dataset501_replaced.pid1234.node7.0d9hq3w1" (a dataset being replaced, until it is deleted)
_SCRATCH_FOLDER = re.compile(r"\.Dataset\d{3}_(incomplete|replaced)\.pid(\d+)\.(.+)\.[a-z0-9_]+")
_LEGACY_SCRATCH_FOLDER = re.compile(r"\.Dataset\d{3}_incomplete_[a-z0-9_]+")  # before owners were recorded


def _scratch_folder(nnunet_raw: str, dataset_id: int, kind: str) -> str:
    me = Owner.this_process()
    return tempfile.mkdtemp(prefix=f".Dataset{dataset_id:03d}_{kind}.pid{me.pid}.{me.host}.", dir=nnunet_raw)


def remove_stale_scratch_folders(nnunet_raw: str) -> list[str]:
    """Removes our scratch folders whose conversion is gone (same machine, its process no longer running);
    returns them. Folders of a running conversion, or of another machine sharing nnUNet_raw, are left alone."""
    removed = []
    for entry in sorted(os.listdir(nnunet_raw)) if os.path.isdir(nnunet_raw) else []:
        path = os.path.join(nnunet_raw, entry)
        match = _SCRATCH_FOLDER.fullmatch(entry)
        if match and Owner(int(match[2]), match[3]).is_gone():
            try:
                shutil.rmtree(path)
                removed.append(path)
                print(f"removed {path}, left by a conversion that was stopped (process {match[2]})", file=sys.stderr)
            except OSError as exc:
                print(f"warning: could not remove {path}, left by a stopped conversion: {exc}", file=sys.stderr)
        elif _LEGACY_SCRATCH_FOLDER.fullmatch(entry):
            print(f"note: {path} was left by an interrupted conversion of an earlier version (which did not record "
                  f"its owner); delete it if no such conversion is running", file=sys.stderr)
    return removed


@contextmanager
def _stopping_on_sigterm():
    """SIGTERM (what schedulers and `kill` send) stops the conversion like Ctrl-C: the scratch folder is removed
    on the way out. Only the main thread can install signal handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(f"conversion stopped by {signal.Signals(signum).name}; nothing was written")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _default_sigterm():
    """Pool workers: SIGTERM ends them at once; the parent cleans up."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_cases(jobs: list, num_processes: int, description: str) -> list:
    if num_processes <= 1:
        return [_convert_case(j) for j in tqdm(jobs, desc=description, unit="case")]
    with Pool(num_processes, initializer=_default_sigterm) as pool:
        return list(tqdm(pool.imap(_convert_case, jobs), total=len(jobs), desc=description, unit="case"))


def convert_brats_dataset(input_folder: str, dataset_id: int, nnunet_raw: str, dataset_name: str | None = None,
                          test_folder: str | None = None, region_based: bool = True, overwrite: bool = False,
                          num_processes: int = 2, label_convention: str | None = None) -> str:
    """Writes nnUNet_raw/DatasetXXX_NAME from a BraTS training folder (and optionally a validation/test folder,
    into imagesTs, with labelsTs when its cases have segmentations).

    The dataset is assembled in a temporary folder next to its destination and moved into place only when
    every case converted; on any error nothing is left behind and ConversionError lists all problems.
    `label_convention` (a name of brats_labels.CONVENTIONS) says which BraTS generation's labels the
    segmentations hold; by default `choose_convention` decides and says why. A segmentation with a label the
    convention lacks is refused. Returns the path of the new dataset folder.
    """
    if not 1 <= int(dataset_id) <= 999:
        raise ConversionError(f"dataset id must be 1..999, got {dataset_id}")
    train_cases = find_case_folders(input_folder)
    naming = detect_naming(train_cases)
    test_cases = find_case_folders(test_folder) if test_folder else []
    if test_cases and detect_naming(test_cases) != naming:
        raise ConversionError(f"{test_folder} uses {detect_naming(test_cases).name} names, "
                              f"{input_folder} uses {naming.name}")
    clash = {c.case_id for c in train_cases} & {c.case_id for c in test_cases}
    if clash:
        raise ConversionError(f"cases in both the training and the test folder: {sorted(clash)[:10]}")
    convention, reason, decided_by_labels = choose_convention(
        naming, label_convention, [dataset_name, os.path.basename(os.path.abspath(input_folder)),
                                   os.path.basename(os.path.dirname(os.path.abspath(input_folder)))])
    if dataset_name is not None and not re.fullmatch(r"[A-Za-z0-9_\-]+", dataset_name):
        raise ConversionError(f"dataset name {dataset_name!r} may only hold letters, digits, '_' and '-'")
    existing = _dataset_folders(nnunet_raw, int(dataset_id))
    if existing and not overwrite:
        raise ConversionError(f"{os.path.join(nnunet_raw, existing[0])} already exists; pass --overwrite to replace it")

    try:
        os.makedirs(nnunet_raw, exist_ok=True)
        remove_stale_scratch_folders(nnunet_raw)
        staging = _scratch_folder(nnunet_raw, int(dataset_id), "incomplete")
    except OSError as exc:
        raise ConversionError(f"cannot write into nnUNet_raw {nnunet_raw}: {exc.strerror or exc}") from None
    with _stopping_on_sigterm():
        try:
            folders = {k: os.path.join(staging, k) for k in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
            for folder in folders.values():
                os.makedirs(folder)
            jobs = [(c, naming, convention, folders["imagesTr"], folders["labelsTr"]) for c in train_cases]
            jobs += [(c, naming, convention, folders["imagesTs"], folders["labelsTs"]) for c in test_cases]
            results = _run_cases(jobs, num_processes, f"converting {len(jobs)} BraTS cases")
            errors = [e for _, _, case_errors, _ in results for e in case_errors]
            for case_id, has_seg, _, _ in results[:len(train_cases)]:
                if not has_seg:
                    errors.append(f"case {case_id}: missing segmentation {naming.file_name(case_id, SEG_SUFFIX)} "
                                  f"in the training folder (a validation/test folder without labels goes in --test)")
            test_results = results[len(train_cases):]
            labelled_tests = sum(has_seg for _, has_seg, _, _ in test_results)
            if 0 < labelled_tests < len(test_results):  # labelsTs must describe every test case or none
                errors += [f"case {case_id}: missing segmentation {naming.file_name(case_id, SEG_SUFFIX)}; other cases "
                           f"of {test_folder} have one" for case_id, has_seg, _, _ in test_results if not has_seg]
            if errors:
                shown = "\n  ".join(errors[:30])
                more = f"\n  ... and {len(errors) - 30} more" if len(errors) > 30 else ""
                # where a label is refused, say which convention refused it and why that one
                labels = f" under the {convention.title} labels ({convention.describe()}; from {reason})" if any(
                    label_problem(values, convention) for _, _, _, values in results) else ""
                raise ConversionError(f"{len(errors)} problem(s) in the input{labels}; nothing was written:\n  "
                                      f"{shown}{more}")
            with_cavity = [case_id for case_id, _, _, values in results if 4 in values]
            if decided_by_labels and not with_cavity:  # labels 1-3 mean the same in BraTS 2023 and 2024
                convention, reason = CONVENTIONS["brats2023"], f"{reason}, and no case has a label 4"
            elif decided_by_labels:
                reason = (f"{reason}, and label 4 (resection cavity) in {len(with_cavity)} case(s), e.g. "
                          f"{with_cavity[0]}; give --label-convention if these are not BraTS 2024 post-treatment "
                          f"labels")
            dataset_name = dataset_name or {"brats2018": "BraTS2018", "brats2023": "BraTS2023",
                                            "brats2024": "BraTS2024"}[convention.name]
            target = os.path.join(nnunet_raw, f"Dataset{int(dataset_id):03d}_{dataset_name}")
            for kind in ("imagesTs", "labelsTs"):
                if not os.listdir(folders[kind]):
                    os.rmdir(folders[kind])
            write_dataset_json(staging, len(train_cases), region_based, dataset_name, naming, convention)
            _move_into_place(staging, target, [os.path.join(nnunet_raw, e) for e in existing],
                                 int(dataset_id))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    print(f"label convention: {convention.title} ({convention.describe()}), from {reason}")
    return target


def write_dataset_json(folder: str, num_training_cases: int, region_based: bool, dataset_name: str,
                       naming: BratsNaming, convention: LabelConvention) -> None:
    nnunet = ", ".join(f"{k} = {name}" for name, k in list(convention.nnunet_labels.items())[1:])
    generate_dataset_json(
        folder, channel_names=dict(enumerate(CHANNEL_NAMES)),
        labels=convention.nnunet_regions if region_based else convention.nnunet_labels,
        num_training_cases=num_training_cases, file_ending=".nii.gz",
        regions_class_order=convention.regions_class_order if region_based else None,
        dataset_name=dataset_name, reference="https://www.synapse.org/brats",
        description=f"BraTS converted by nnunet-protokd from the {naming.name} layout with the {convention.title} "
                    f"labels. nnU-Net labels: {nnunet} (BraTS {', '.join(map(str, convention.brats_labels[1:]))}).",
        license="see the BraTS challenge data terms", converted_by="nnunet-protokd",
        brats_naming=naming.name, brats_generation=convention.name)


def _move_into_place(staging: str, target: str, replaced: Iterable[str], dataset_id: int) -> None:
    """Renames are atomic on one file system: the dataset appears whole or not at all. A replaced dataset is
    first renamed to a hidden scratch folder (nnU-Net no longer sees it), then deleted; if that fails, the
    ConversionError names it, and the next conversion retries."""
    nnunet_raw = os.path.dirname(target)
    graveyard = []
    try:
        for old in replaced:
            grave = _scratch_folder(nnunet_raw, dataset_id, "replaced")
            os.rename(old, grave)  # over the empty folder just made
            graveyard.append((old, grave))
        os.rename(staging, target)
    except BaseException:
        for old, grave in reversed(graveyard):  # put the old dataset back
            os.rename(grave, old)
        raise
    failed = []
    for old, grave in graveyard:
        try:
            shutil.rmtree(grave)
        except OSError as exc:
            failed.append(f"{grave} (was {os.path.basename(old)}): {exc}")
    if failed:
        raise ConversionError(f"wrote {target}, but could not delete the dataset it replaced, now hidden from "
                              f"nnU-Net in {'; '.join(failed)}. Delete it by hand (the next conversion retries)")

