"""`nnunet-protokd predict`: nnU-Net's prediction, after checking every case's files against the model.

nnU-Net's predictor groups an input folder's files by case and gives the network each case's files in the order
of their channel numbers, whatever those numbers are. A folder whose only file of a case is <case>_0003.nii.gz
(FLAIR in the 4-channel numbering) is therefore read as channel 0, which a T1ce student takes for T1ce, and a
plausible segmentation comes out. nnU-Net gives plugins no hook on file names (our networks see tensors only),
so the check runs before nnU-Net's own `nnUNetv2_predict`, which then runs unchanged with the same arguments.

The rule is the model folder's dataset.json: its channel_names are the files of a case, <case>_0000 onwards, with
its file_ending (a single-modality student: <case>_0000 only; an LCKD subset model: exactly its channels).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import nnunetv2.paths as nnunet_paths  # read at call time: tests and commands set them late
from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES
from nnunetv2.inference.predict_from_raw_data import predict_entry_point
from nnunetv2.utilities.file_path_utilities import get_output_folder

from nnunet_protokd.channels import describe_input_files, model_channel_names
from nnunet_protokd.data.brats_labels import geometry_mismatch
from nnunet_protokd.data.images import image_header, scan_problem
from nnunet_protokd.errors import UserError
from nnunet_protokd.plans import dataset_name

MAX_PROBLEMS_SHOWN = 30


class PredictionInputError(UserError, ValueError):
    """An input folder whose files do not fit the model; the message names every case and file at fault."""


def _image_endings() -> tuple:
    return tuple(sorted({e for io_class in LIST_OF_IO_CLASSES for e in io_class.supported_file_endings}))


def check_input_folder(folder: str, dataset_json: dict) -> list[str]:
    """The cases of `folder` if every case has exactly the files the model reads (dataset.json of its model
    folder), each readable, finite and not empty; otherwise a PredictionInputError listing every problem."""
    ending = dataset_json["file_ending"]
    channels = model_channel_names(dataset_json)
    rule = f"this model reads {describe_input_files(channels, file_ending=ending)} per case"
    if not os.path.isdir(folder):
        raise PredictionInputError(f"input folder {folder} does not exist or is not a folder")
    file_name = re.compile(r"(.+)_(\d{4})" + re.escape(ending))
    other_images = tuple(e for e in _image_endings() if not ending.endswith(e))
    problems, cases = [], {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            if name.endswith(_image_endings()):  # nnU-Net would skip it, and its case would go unpredicted
                problems.append(scan_problem(path))
            continue  # other sub-folders nnU-Net ignores too
        if name.endswith(ending):
            match = file_name.fullmatch(name)
            if match is None:
                problems.append(f"{path} is not named <case>_XXXX{ending} ({rule})")
            else:
                cases.setdefault(match[1], {})[int(match[2])] = path
        elif name.endswith(other_images):  # nnU-Net would skip it without a word
            problems.append(f"{path}: this model reads {ending} files (its dataset.json's file_ending)")
    if not cases and not problems:
        raise PredictionInputError(f"no <case>_XXXX{ending} files in {folder} ({rule})")
    for case, files in sorted(cases.items()):
        for channel, path in sorted(files.items()):
            if channel >= len(channels):
                problems.append(f"case {case}: unexpected file {path} ({rule})")
        usable = []
        for channel, channel_name in enumerate(channels):
            if channel not in files:
                problems.append(f"case {case}: missing {case}_{channel:04d}{ending} ({channel_name}; {rule})")
            elif (problem := scan_problem(files[channel])) is not None:
                problems.append(f"case {case}: {problem}")
            else:
                usable.append(files[channel])
        # nnU-Net's reader stacks a case's channels: they must share one grid (it would fail in a worker process)
        for path in usable[1:]:
            if (problem := geometry_mismatch(image_header(path), image_header(usable[0]))) is not None:
                problems.append(f"case {case}: {path}: {problem} of {usable[0]}; the files of a case must share "
                                f"one grid")
    if problems:
        shown = "\n  ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        raise PredictionInputError(f"{len(problems)} problem(s) in {folder}; nothing was predicted:\n  {shown}{more}")
    return sorted(cases)


def model_folder_dataset_json(dataset: str, trainer: str, plans: str, configuration: str) -> tuple[str, dict]:
    """(model folder, its dataset.json) as nnUNetv2_predict finds them from -d, -tr, -p and -c."""
    if not nnunet_paths.nnUNet_results:
        raise PredictionInputError("set the environment variable nnUNet_results (see README)")
    folder = get_output_folder(dataset_name(dataset), trainer, plans, configuration)
    try:
        with open(os.path.join(folder, "dataset.json")) as f:
            return folder, json.load(f)
    except OSError:
        raise PredictionInputError(f"no trained model {folder} (no dataset.json in it): check -d, -tr, -p and "
                                   f"-c") from None


def check_prediction_arguments(model_folder: str, input_folder: str, nnunet_arguments: list) -> None:
    """A PredictionInputError for nnUNetv2_predict arguments that would fail in nnU-Net with a traceback or mix
    files: an output folder that is the input folder (predictions would join the scans) or a file, or a fold
    (-f) without the checkpoint (-chk) to predict with."""
    parser = argparse.ArgumentParser(add_help=False)  # nnUNetv2_predict's options read here, with its defaults
    parser.add_argument("-o")
    parser.add_argument("-f", nargs="+", default=("0", "1", "2", "3", "4"))
    parser.add_argument("-chk", default="checkpoint_final.pth")
    parser.add_argument("-c")  # declared, or argparse would read the configuration's -c as an abbreviated -chk
    given, _ = parser.parse_known_args(nnunet_arguments)
    if given.o is not None:
        if os.path.realpath(given.o) == os.path.realpath(input_folder):
            raise PredictionInputError(f"the output folder {given.o} is the input folder: the predictions would be "
                                       f"mixed into the scans; give another -o")
        if os.path.exists(given.o) and not os.path.isdir(given.o):
            raise PredictionInputError(f"the output folder {given.o} is a file; give a folder for -o")
    for fold in given.f:
        checkpoint = os.path.join(model_folder, f"fold_{fold}", given.chk)
        if not os.path.isfile(checkpoint):
            raise PredictionInputError(f"fold {fold} of {model_folder} is not trained: {checkpoint} does not exist "
                                       f"(choose the trained folds with -f, the checkpoint with -chk)")


def run_nnunet_predict(nnunet_arguments: list) -> None:
    """nnU-Net's own `nnUNetv2_predict` with these command-line arguments, in this process."""
    argv = sys.argv
    sys.argv = ["nnUNetv2_predict", *nnunet_arguments]
    try:
        predict_entry_point()
    finally:
        sys.argv = argv


def check_and_predict(dataset: str, trainer: str, plans: str, configuration: str, input_folder: str,
                      nnunet_arguments: list, log=print) -> list[str]:
    """`nnunet-protokd predict`: checks `input_folder` against the model folder's dataset.json (nothing is predicted
    when a case is at fault), then runs nnUNetv2_predict with `nnunet_arguments` (its own command line, which
    names the same model and folder) in this process. Returns the cases."""
    model_folder, dataset_json = model_folder_dataset_json(dataset, trainer, plans, configuration)
    cases = check_input_folder(input_folder, dataset_json)
    check_prediction_arguments(model_folder, input_folder, nnunet_arguments)
    log(f"{len(cases)} case(s) in {input_folder}, each with exactly the files this model reads")
    run_nnunet_predict(nnunet_arguments)
    return cases
