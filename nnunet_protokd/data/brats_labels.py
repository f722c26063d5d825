#!/usr/bin/env python3
"""BraTS file names and label maps, and nnU-Net predictions back to BraTS label maps.

    python convert_predictions_to_brats.py PREDICTIONS/ BRATS_LABELS/ --reference /data/BraTS_Validation

Self-contained on purpose (Python's standard library, numpy and SimpleITK, which nnU-Net itself installs): an
exported student ships this file as `convert_predictions_to_brats.py`, so that a site with only nnU-Net installed
can convert its predictions; nnunet_protokd.data.brats imports the same definitions for the forward conversion.

BraTS labels: 1 = necrotic / non-enhancing core (NCR), 2 = oedema (ED), 4 = enhancing tumour (ET; 3 from
BraTS 2023 on). The nnU-Net datasets written by nnunet-protokd use 1 = ED, 2 = NCR, 3 = ET.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk


class ConversionError(ValueError):
    """Input that cannot be converted; the message names every case and file at fault. Inside the plugin it counts
    as a user error (`user_error`, read by errors.is_user_error: one `error:` line, also in nnU-Net's commands);
    it cannot derive from errors.UserError because this file must run without the plugin."""
    user_error = True


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
    if os.path.realpath(output_folder) == os.path.realpath(prediction_folder):
        raise ConversionError(f"the output folder {output_folder} is the prediction folder: BraTS labels written over "
                              f"the predictions would be converted again by a second run (labels 1 and 2 swapped "
                              f"back); write them to another folder")
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prediction_folder", help="nnUNetv2_predict output (<case>.nii.gz, labels 0-3)")
    parser.add_argument("output_folder", help="where <case>.nii.gz BraTS label maps are written")
    parser.add_argument("--reference", default=None, metavar="BRATS_FOLDER",
                        help="original BraTS folder: each prediction must lie on its case's T1 grid (refused "
                             "otherwise) and the output takes that file's exact header")
    parser.add_argument("--et-label", type=int, choices=(3, 4), default=None,
                        help="label of enhancing tumour in the output (default: that of the --reference folder's "
                             "BraTS generation, 3 for BraTS 2023 names and 4 for BraTS 2018-2021; 4 without "
                             "--reference)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    args = parser.parse_args(argv)
    try:
        enhancing_label = args.et_label if args.et_label is not None else enhancing_label_of(args.reference)
        cases = convert_predictions_to_brats(args.prediction_folder, args.output_folder, enhancing_label,
                                             args.reference, args.overwrite)
    except ConversionError as exc:  # bad input: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    source = "--et-label" if args.et_label is not None else \
        f"the BraTS naming of {args.reference}" if args.reference else "the BraTS 2018-2021 default"
    print(f"wrote {len(cases)} BraTS label maps to {args.output_folder} (enhancing tumour = {enhancing_label}, "
          f"from {source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
