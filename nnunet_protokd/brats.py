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
import signal
import socket
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import Pool
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from nnunet_protokd.errors import UserError
from nnunet_protokd.images import count_non_finite, scan_problem  # noqa: F401 (count_non_finite: part of this API)

CHANNEL_NAMES = ("T1", "T1ce", "T2", "FLAIR")
NNUNET_LABELS = {"background": 0, "edema": 1, "necrosis and non-enhancing core": 2, "enhancing tumor": 3}
NNUNET_REGIONS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
REGIONS_CLASS_ORDER = (1, 2, 3)


class ConversionError(UserError, ValueError):
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


def geometry_mismatch(image: sitk.Image, reference: sitk.Image) -> str | None:
    """A sentence saying how `image`'s grid differs from `reference`'s, or None when they agree."""
    checks = (("shape", image.GetSize(), reference.GetSize(), 0),
              ("spacing", image.GetSpacing(), reference.GetSpacing(), 1e-4),
              ("origin", image.GetOrigin(), reference.GetOrigin(), 1e-3),
              ("direction", image.GetDirection(), reference.GetDirection(), 1e-4))
    for what, value, expected, tolerance in checks:
        if len(value) != len(expected) or not np.allclose(value, expected, rtol=0, atol=tolerance):
            return f"{what} ({', '.join(f'{v:.6g}' for v in value)}) differs from " \
                   f"({', '.join(f'{v:.6g}' for v in expected)})"
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
        if (problem := scan_problem(path)) is not None:  # truncated, NaN/inf, or empty (all zero)
            errors.append(f"case {case.case_id}: {problem}")
            continue
        # the file itself is fine: copy it byte for byte, so that nothing (dtype, header) changes
        shutil.copyfile(path, os.path.join(images_folder, f"{case.case_id}_{channel:04d}.nii.gz"))

    if has_seg and reference is not None:
        seg_path = os.path.join(case.folder, seg_name)
        seg = _read(seg_path, case.case_id, errors)
        if seg is not None:
            if (problem := geometry_mismatch(seg, reference)) is not None:
                errors.append(f"case {case.case_id}: {seg_path}: {problem} of {reference_path}")
            elif (problem := scan_problem(seg_path, constant_allowed=True)) is not None:
                errors.append(f"case {case.case_id}: {problem}")
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


# Our scratch folders in nnUNet_raw are hidden (nnU-Net does not take them for datasets) and carry their owner
# in their name, so that a later conversion can remove those left by a conversion that was killed (kill -9, a
# node failure): ".Dataset501_incomplete.pid1234.node7.k2j4_x9a" (a dataset being assembled) or
# ".Dataset501_replaced.pid1234.node7.0d9hq3w1" (a dataset being replaced, until it is deleted)
_SCRATCH_FOLDER = re.compile(r"\.Dataset\d{3}_(incomplete|replaced)\.pid(\d+)\.(.+)\.[a-z0-9_]+")
_LEGACY_SCRATCH_FOLDER = re.compile(r"\.Dataset\d{3}_incomplete_[a-z0-9_]+")  # before owners were recorded


def _scratch_folder(nnunet_raw: str, dataset_id: int, kind: str) -> str:
    return tempfile.mkdtemp(prefix=f".Dataset{dataset_id:03d}_{kind}.pid{os.getpid()}.{socket.gethostname()}.",
                            dir=nnunet_raw)


def _process_is_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_scratch_folders(nnunet_raw: str) -> list[str]:
    """Removes our scratch folders whose conversion is gone (same machine, its process no longer running);
    returns them. Folders of a running conversion, or of another machine sharing nnUNet_raw, are left alone."""
    removed = []
    for entry in sorted(os.listdir(nnunet_raw)) if os.path.isdir(nnunet_raw) else []:
        path = os.path.join(nnunet_raw, entry)
        match = _SCRATCH_FOLDER.fullmatch(entry)
        if match and match[3] == socket.gethostname() and not _process_is_running(int(match[2])):
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
    from tqdm import tqdm
    if num_processes <= 1:
        return [_convert_case(j) for j in tqdm(jobs, desc=description, unit="case")]
    with Pool(num_processes, initializer=_default_sigterm) as pool:
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
            jobs = [(c, naming, folders["imagesTr"], folders["labelsTr"]) for c in train_cases]
            jobs += [(c, naming, folders["imagesTs"], folders["labelsTs"]) for c in test_cases]
            results = _run_cases(jobs, num_processes, f"converting {len(jobs)} BraTS cases")
            errors = [e for _, _, case_errors in results for e in case_errors]
            for case_id, has_seg, _ in results[:len(train_cases)]:
                if not has_seg:
                    errors.append(f"case {case_id}: missing segmentation {naming.file_name(case_id, SEG_SUFFIX)} "
                                  f"in the training folder (a validation/test folder without labels goes in --test)")
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
            _move_into_place(staging, target, [os.path.join(nnunet_raw, e) for e in existing],
                                 int(dataset_id))
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


def enhancing_label_of(reference_folder: str | None) -> int:
    """The BraTS label of enhancing tumour in the generation of `reference_folder`'s names: 3 for BraTS 2023
    (-t1c.nii.gz), 4 for BraTS 2018-2021 (_t1ce.nii.gz) and when there is no reference."""
    if not reference_folder:
        return BRATS2018.enhancing_labels[0]
    return detect_naming(find_case_folders(reference_folder)).enhancing_labels[0]


def _read_image(path: str, case_id: str, what: str) -> sitk.Image:
    try:
        return sitk.ReadImage(path)
    except Exception as exc:  # SimpleITK's RuntimeError; keep its last line, which says why
        raise ConversionError(f"case {case_id}: cannot read the {what} {path}: "
                              f"{str(exc).strip().splitlines()[-1]}") from None


def convert_predictions_to_brats(prediction_folder: str, output_folder: str, enhancing_label: int | None = None,
                                 reference_folder: str | None = None, overwrite: bool = False) -> list[str]:
    """nnU-Net predictions (<case>.nii.gz, labels 0-3) -> BraTS label maps <case>.nii.gz (0/1/2 and
    `enhancing_label`; by default that of the reference's BraTS generation, see `enhancing_label_of`).

    With `reference_folder` (the original BraTS folder), each prediction must lie on the grid of the case's
    original T1 file (shape, spacing, origin and direction, as nnU-Net writes it from the image it predicted
    on) and the output takes that file's exact header; a prediction on another grid is refused, never moved
    onto it. Without, the output keeps the prediction's grid. Every case is checked before anything is written.
    """
    if enhancing_label is None:
        enhancing_label = enhancing_label_of(reference_folder)
    if not os.path.isdir(prediction_folder):
        raise ConversionError(f"prediction folder {prediction_folder} does not exist or is not a folder")
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
        prediction = _read_image(path, case_id, "prediction")
        try:
            brats = nnunet_to_brats_labels(sitk.GetArrayFromImage(prediction), enhancing_label)
        except ConversionError as exc:
            raise ConversionError(f"case {case_id}: {path}: {exc}") from None
        out = sitk.GetImageFromArray(brats)
        grid = prediction
        if reference_folder:
            if case_id not in references:
                raise ConversionError(f"case {case_id}: no original case folder in {reference_folder}")
            grid = _read_image(references[case_id], case_id, "original image")
            if (problem := geometry_mismatch(prediction, grid)) is not None:
                raise ConversionError(f"case {case_id}: prediction {path}: {problem} of the original "
                                      f"{references[case_id]}; it was predicted on another grid, and moving it onto "
                                      f"this one would misplace the tumour")
        out.CopyInformation(grid)
        converted.append((case_id, out))
    os.makedirs(output_folder, exist_ok=True)
    for case_id, image in converted:  # every case checked above before the first file is written
        sitk.WriteImage(image, os.path.join(output_folder, f"{case_id}.nii.gz"), True)
    return [c for c, _ in converted]
