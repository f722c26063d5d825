#!/usr/bin/env python3
"""Turn nnU-Net predictions of a converted BraTS dataset back into BraTS label maps (0/1/2/4).

    python dataset_conversion/convert_predictions_to_brats.py predictions/ brats_labels/ --reference /data/BraTS_Validation
"""
import argparse
import sys

from nnunet_protokd.brats import convert_predictions_to_brats, enhancing_label_of
from nnunet_protokd.cli import run_reporting_errors


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
    return run_reporting_errors(convert, args)


def convert(args) -> int:
    enhancing_label = args.et_label if args.et_label is not None else enhancing_label_of(args.reference)
    cases = convert_predictions_to_brats(args.prediction_folder, args.output_folder, enhancing_label, args.reference,
                                         args.overwrite)
    source = "--et-label" if args.et_label is not None else \
        f"the BraTS naming of {args.reference}" if args.reference else "the BraTS 2018-2021 default"
    print(f"wrote {len(cases)} BraTS label maps to {args.output_folder} (enhancing tumour = {enhancing_label}, "
          f"from {source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
