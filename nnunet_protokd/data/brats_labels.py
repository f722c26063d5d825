#!/usr/bin/env python3
"""BraTS file names and label maps, and nnU-Net predictions back to BraTS label maps.

    python convert_predictions_to_brats.py PREDICTIONS/ BRATS_LABELS/ --reference /data/BraTS_Validation

Self-contained on purpose (Python's standard library, numpy and SimpleITK, which nnU-Net itself installs): an
exported student ships this file as `convert_predictions_to_brats.py`, so that a site with only nnU-Net installed
can convert its predictions; nnunet_protokd.data.brats imports the same definitions for the forward conversion.

BraTS labels by generation (`LabelConvention`, `CONVENTIONS`): BraTS 2018-2021 1 = necrotic / non-enhancing core
(NCR/NET), 2 = oedema (ED), 4 = enhancing tumour (ET); BraTS 2023 (GLI, MEN, MET, PED, SSA) 1 = non-enhancing
tumour core (NETC), 2 = surrounding FLAIR hyperintensity (SNFH), 3 = ET; BraTS 2024 post-treatment glioma the same
plus 4 = resection cavity (RC). The nnU-Net datasets written by nnunet-protokd use 1 = ED/SNFH, 2 = NCR/NETC,
3 = ET and, for BraTS 2024, 4 = RC.
"""
from __future__ import annotations

import argparse
import os
import re
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
    """How one generation of BraTS names its files: `<case><separator><suffix>.nii.gz`. File names say nothing
    certain about the labels (BraTS 2023 and 2024 share them): see LabelConvention."""
    name: str
    separator: str
    modality_suffixes: tuple  # in nnU-Net channel order T1, T1ce, T2, FLAIR

    def file_name(self, case: str, suffix: str) -> str:
        return f"{case}{self.separator}{suffix}.nii.gz"


BRATS2018 = BratsNaming("brats2018", "_", ("t1", "t1ce", "t2", "flair"))  # also 2019-2021
BRATS2023 = BratsNaming("brats2023", "-", ("t1n", "t1c", "t2w", "t2f"))  # also 2024
NAMINGS = {n.name: n for n in (BRATS2018, BRATS2023)}
SEG_SUFFIX = "seg"

# nnU-Net label -> (its name in dataset.json, short name); the order nests the BraTS regions (below)
NNUNET_CLASSES = {1: ("edema", "ED"), 2: ("necrosis and non-enhancing core", "NCR"), 3: ("enhancing tumor", "ET"),
                  4: ("resection cavity", "RC")}
# region name in dataset.json -> (short name, nnU-Net labels). The challenge's regions: whole tumour and tumour
# core never include the resection cavity (BraTS 2024 scores it as a region of its own)
REGIONS = {"whole tumor": ("WT", (1, 2, 3)), "tumor core": ("TC", (2, 3)), "enhancing tumor": ("ET", (3,)),
           "resection cavity": ("RC", (4,))}
REGION_ABBREVIATIONS = {name: short for name, (short, _) in REGIONS.items()}


@dataclass(frozen=True)
class LabelConvention:
    """What the label values of one BraTS generation's segmentations mean, and their nnU-Net labels."""
    name: str  # the value of --label-convention and of dataset.json's "brats_generation"
    title: str
    brats_labels: tuple  # BraTS label of nnU-Net label 0, 1, 2, ...: the convention's labels
    names: tuple  # the organisers' short name of each BraTS label in brats_labels

    def describe(self) -> str:
        return ", ".join(f"{label} {name}" for label, name in sorted(zip(self.brats_labels[1:], self.names[1:])))

    @property
    def nnunet_of_brats(self) -> dict:
        return {brats: nnunet for nnunet, brats in enumerate(self.brats_labels)}

    @property
    def nnunet_labels(self) -> dict:
        """dataset.json's "labels" of a label-based (softmax) dataset."""
        return {"background": 0, **{NNUNET_CLASSES[k][0]: k for k in range(1, len(self.brats_labels))}}

    @property
    def nnunet_regions(self) -> dict:
        """dataset.json's "labels" of a region-based dataset; regions_class_order paints them back in this
        order, so that each voxel gets its innermost region's label."""
        return {"background": 0, **{name: list(labels) for name, (_, labels) in REGIONS.items()
                                    if max(labels) < len(self.brats_labels)}}

    @property
    def regions_class_order(self) -> tuple:
        """The label each region paints: the regions nest (WT > TC > ET), so its smallest label."""
        return tuple(min(labels) for labels in list(self.nnunet_regions.values())[1:])


CONVENTIONS = {c.name: c for c in (
    LabelConvention("brats2018", "BraTS 2018-2021", (0, 2, 1, 4), ("", "ED", "NCR/NET", "ET")),
    LabelConvention("brats2023", "BraTS 2023", (0, 2, 1, 3), ("", "SNFH", "NETC", "ET")),
    LabelConvention("brats2024", "BraTS 2024 post-treatment glioma", (0, 2, 1, 3, 4),
                    ("", "SNFH", "NETC", "ET", "RC")))}


def generation_of(dataset_json: dict) -> LabelConvention | None:
    """The label convention of a dataset converted by nnunet-protokd (None for any other dataset). Datasets
    converted before "brats_generation" was recorded had BraTS 2018-2021 labels or, with 2023 names, no RC."""
    if dataset_json.get("brats_generation"):
        return CONVENTIONS[dataset_json["brats_generation"]]
    if dataset_json.get("brats_naming"):
        return CONVENTIONS["brats2018" if dataset_json["brats_naming"] == "brats2018" else "brats2023"]
    return None


def convention_named_in(text: str) -> LabelConvention | None:
    """The convention a dataset or folder name states (BraTS2023..., BraTS2024...GLI...), else None. A 2024 name
    counts only for glioma (GLI): the other 2024 sub-challenges do not have the post-treatment labels."""
    text = text.lower()
    if "2024" in text and "gli" in text:
        return CONVENTIONS["brats2024"]
    if re.search(r"brats[-_ ]?2023", text):
        return CONVENTIONS["brats2023"]
    return None


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


def label_problem(values, convention: LabelConvention) -> str | None:
    """A sentence naming the label values that `convention` does not have, and what they mean elsewhere."""
    foreign = sorted(set(int(v) for v in values) - set(convention.brats_labels))
    if not foreign:
        return None
    elsewhere = [f"label {v} is {c.names[c.brats_labels.index(v)]} in {c.title} (--label-convention {c.name})"
                 for v in foreign for c in CONVENTIONS.values() if v in c.brats_labels]
    return (f"label{'s' if len(foreign) > 1 else ''} {', '.join(map(str, foreign))} "
            f"{'are' if len(foreign) > 1 else 'is'} not in the {convention.title} labels ({convention.describe()})"
            + (f"; {'; '.join(elsewhere)}" if elsewhere else ""))


def brats_to_nnunet_labels(seg: np.ndarray, convention: LabelConvention = CONVENTIONS["brats2018"]) -> np.ndarray:
    """BraTS label map of `convention` -> nnU-Net labels (0 bg, 1 ED, 2 NCR, 3 ET, 4 RC) as uint8. Raises on
    values the convention does not have."""
    if (problem := label_problem(np.unique(seg), convention)) is not None:
        raise ConversionError(problem)
    lookup = np.zeros(max(convention.brats_labels) + 1, dtype=np.uint8)
    for brats, nnunet in convention.nnunet_of_brats.items():
        lookup[brats] = nnunet
    return lookup[seg.astype(np.int64)]


def nnunet_to_brats_labels(labels: np.ndarray, convention: LabelConvention = CONVENTIONS["brats2018"]) -> np.ndarray:
    """nnU-Net labels (0 bg, 1 ED, 2 NCR, 3 ET, 4 RC) -> BraTS label map of `convention` as uint8."""
    known = range(len(convention.brats_labels))
    foreign = sorted(set(np.unique(labels).tolist()) - set(known))
    if foreign:
        hint = "; label 4 is the resection cavity of BraTS 2024 (--label-convention brats2024)" if 4 in foreign else ""
        raise ConversionError(f"label values {foreign} are not nnU-Net labels of {convention.title} "
                              f"(0-{known[-1]}){hint}")
    return np.asarray(convention.brats_labels, dtype=np.uint8)[labels.astype(np.int64)]


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


def back_conversion_convention(reference_folder: str | None) -> LabelConvention:
    """The labels to write when the user names none: BraTS 2018-2021's without a reference or for its names; for
    2023+ names BraTS 2024's, where label 4 is the resection cavity (a BraTS 2023 model predicts no cavity, so its
    output is BraTS 2023's labels too)."""
    if reference_folder and detect_naming(find_case_folders(reference_folder)) is BRATS2023:
        return CONVENTIONS["brats2024"]
    return CONVENTIONS["brats2018"]


def _read_image(path: str, case_id: str, what: str) -> sitk.Image:
    try:
        return sitk.ReadImage(path)
    except Exception as exc:  # SimpleITK's RuntimeError; keep its last line, which says why
        raise ConversionError(f"case {case_id}: cannot read the {what} {path}: "
                              f"{str(exc).strip().splitlines()[-1]}") from None


def convert_predictions_to_brats(prediction_folder: str, output_folder: str,
                                 convention: LabelConvention | None = None, reference_folder: str | None = None,
                                 overwrite: bool = False) -> list[str]:
    """nnU-Net predictions (<case>.nii.gz, labels 0-3, 4 = RC for BraTS 2024) -> BraTS label maps <case>.nii.gz
    in `convention`'s labels (by default see `back_conversion_convention`).

    With `reference_folder` (the original BraTS folder), each prediction must lie on the grid of the case's
    original T1 file (shape, spacing, origin and direction, as nnU-Net writes it from the image it predicted
    on) and the output takes that file's exact header; a prediction on another grid is refused, never moved
    onto it. Without, the output keeps the prediction's grid. Every case is checked before anything is written.
    """
    if convention is None:
        convention = back_conversion_convention(reference_folder)
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
            brats = nnunet_to_brats_labels(sitk.GetArrayFromImage(prediction), convention)
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
    parser.add_argument("prediction_folder", help="nnUNetv2_predict output (<case>.nii.gz, labels 0-3, 4 = resection "
                                                  "cavity for BraTS 2024)")
    parser.add_argument("output_folder", help="where <case>.nii.gz BraTS label maps are written")
    parser.add_argument("--reference", default=None, metavar="BRATS_FOLDER",
                        help="original BraTS folder: each prediction must lie on its case's T1 grid (refused "
                             "otherwise) and the output takes that file's exact header")
    parser.add_argument("--label-convention", choices=tuple(CONVENTIONS), default=None,
                        help="the BraTS generation whose labels to write: " + "; ".join(
                            f"{c.name}: {c.title}, {c.describe()}" for c in CONVENTIONS.values()) +
                        " (default: brats2024 for a --reference folder with 2023+ names, whose label 4 is the "
                        "resection cavity and which a BraTS 2023 model never predicts; brats2018 otherwise)")
    parser.add_argument("--et-label", type=int, choices=(3, 4), default=None,
                        help="older spelling: 4 is --label-convention brats2018, 3 is brats2024")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    args = parser.parse_args(argv)
    if args.et_label is not None and args.label_convention is not None:
        parser.error("give --label-convention or --et-label, not both")
    try:
        if args.label_convention or args.et_label:
            convention = CONVENTIONS[args.label_convention or {4: "brats2018", 3: "brats2024"}[args.et_label]]
            source = "--label-convention" if args.label_convention else "--et-label"
        else:
            convention = back_conversion_convention(args.reference)
            source = f"the BraTS naming of {args.reference}" if args.reference else "the BraTS 2018-2021 default"
        cases = convert_predictions_to_brats(args.prediction_folder, args.output_folder, convention,
                                             args.reference, args.overwrite)
    except ConversionError as exc:  # bad input: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(cases)} BraTS label maps to {args.output_folder} ({convention.title} labels "
          f"{convention.describe()}, from {source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
