#!/usr/bin/env python3
"""Turn nnU-Net predictions of a converted BraTS dataset back into BraTS label maps (0/1/2/4).

    python dataset_conversion/convert_predictions_to_brats.py predictions/ brats_labels/ --reference /data/BraTS_Validation
"""
import argparse
import sys

from nnunet_protokd.brats import convert_predictions_to_brats
from nnunet_protokd.cli import run_reporting_errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prediction_folder", help="nnUNetv2_predict output (<case>.nii.gz, labels 0-3)")
    parser.add_argument("output_folder", help="where <case>.nii.gz BraTS label maps are written")
    parser.add_argument("--reference", default=None, metavar="BRATS_FOLDER",
                        help="original BraTS folder; outputs take the exact grid of each case's T1 file")
    parser.add_argument("--et-label", type=int, choices=(3, 4), default=4,
                        help="label of enhancing tumour in the output: 4 (BraTS 2018-2021, default) or 3 (BraTS 2023)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    args = parser.parse_args(argv)
    return run_reporting_errors(convert, args)


def convert(args) -> int:
    cases = convert_predictions_to_brats(args.prediction_folder, args.output_folder, args.et_label, args.reference,
                                         args.overwrite)
    print(f"wrote {len(cases)} BraTS label maps to {args.output_folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
