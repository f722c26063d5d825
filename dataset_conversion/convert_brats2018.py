#!/usr/bin/env python3
"""Convert a BraTS training folder (2018 layout; 2019-2024 detected too) into an nnU-Net raw dataset.

    python dataset_conversion/convert_brats2018.py /data/MICCAI_BraTS_2018_Data_Training 501
    python dataset_conversion/convert_brats2018.py TRAIN_FOLDER 501 --test /data/MICCAI_BraTS_2018_Data_Validation

Writes $nnUNet_raw/Dataset501_BraTS2018 with channels 0000-0003 = T1, T1ce, T2, FLAIR and region-based labels
(whole tumour, tumour core, enhancing tumour, and for BraTS 2024 the resection cavity); --labels writes plain
labels (softmax training) instead. Which BraTS generation's labels the segmentations hold is printed, with why;
--label-convention states it.
"""
import argparse
import os
import sys

from nnunet_protokd.cli import run_reporting_errors
from nnunet_protokd.data.brats import CONVENTIONS, convert_brats_dataset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input_folder", help="BraTS training folder: HGG/ and LGG/ with one folder per case "
                                             "(BraTS 2018/2019), or case folders directly (2020-2023)")
    parser.add_argument("dataset_id", type=int, help="nnU-Net dataset id, 1-999")
    parser.add_argument("--name", default=None,
                        help="dataset name (default BraTS2018, BraTS2023 or BraTS2024 by the label convention); "
                             "a name such as BraTS2023_GLI or BraTS2024_GLI also states the label convention")
    parser.add_argument("--test", default=None, metavar="FOLDER",
                        help="a validation/test folder converted into imagesTs (and labelsTs if its cases have seg)")
    parser.add_argument("--labels", action="store_true",
                        help="plain labels 1 edema / 2 necrosis / 3 enhancing (softmax) instead of regions")
    parser.add_argument("--label-convention", choices=tuple(CONVENTIONS), default=None,
                        help="the BraTS generation whose labels the segmentations hold: " + "; ".join(
                            f"{c.name}: {c.title}, {c.describe()}" for c in CONVENTIONS.values()) +
                        ". Default: brats2018 for _t1ce.nii.gz names; for -t1c.nii.gz names the generation --name or "
                        "the input folder's name states (BraTS2023..., BraTS2024...GLI...), else label 4 is the "
                        "resection cavity (brats2024, or brats2023 when no case has a label 4). A case with a label "
                        "the convention lacks is refused")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")
    parser.add_argument("--nnunet-raw", default=os.environ.get("nnUNet_raw"),
                        help="nnU-Net raw folder (default: $nnUNet_raw)")
    parser.add_argument("-j", "--num-processes", type=int, default=2, help="parallel case conversions (default 2)")
    args = parser.parse_args(argv)
    if not args.nnunet_raw:
        parser.error("set the environment variable nnUNet_raw or pass --nnunet-raw")
    return run_reporting_errors(convert, args)


def convert(args) -> int:
    target = convert_brats_dataset(args.input_folder, args.dataset_id, args.nnunet_raw, args.name, args.test,
                                   region_based=not args.labels, overwrite=args.overwrite,
                                   num_processes=args.num_processes, label_convention=args.label_convention)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
