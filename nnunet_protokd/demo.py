"""`nnunet-protokd demo`: the whole protocol on built-in phantoms, sized for a CPU.

Phantoms in the BraTS 2018 layout -> the BraTS converter (training folder + a labelled held-out folder) ->
`experiment` (teacher, unimodal, ProtoKD and KD-Net students, predictions on the held-out cases, report).
Everything lives in one folder with its own nnUNet_raw/_preprocessed/_results, so a user's nnU-Net folders
are never touched; running the command again continues where it stopped.
"""
from __future__ import annotations

import os

from nnunet_protokd.experiment import Experiment, ExperimentSettings

DATASET_ID = 501
TRAINING_CASES = {"num_hgg": 24, "num_lgg": 8}
HELD_OUT_CASES = {"num_hgg": 15, "num_lgg": 5, "first_case_index": 500}  # ids of their own
PHANTOM_SHAPE_ZYX = (32, 48, 48)


def run_demo(output_folder: str, seed: int = 0, modalities=("T1ce", "T1"), epochs: int = 6,
             iterations_per_epoch: int = 25, device: str = "cpu", methods=("unimodal", "protokd", "kdnet"),
             log=print) -> str:
    from nnunet_protokd.brats import convert_brats_dataset
    from nnunet_protokd.phantoms import generate_brats_phantoms
    output_folder = os.path.abspath(output_folder)
    nnunet = {f"nnUNet_{kind}": os.path.join(output_folder, f"nnUNet_{kind}") for kind in ("raw", "preprocessed", "results")}
    os.environ.update(nnunet)  # read by nnU-Net lazily and inherited by every command the experiment runs
    os.environ.setdefault("nnUNet_n_proc_DA", "2")  # the CPU machines this is sized for have 2 cores
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    phantoms = {"training": os.path.join(output_folder, "phantoms", "MICCAI_BraTS_2018_Data_Training"),
                "held_out": os.path.join(output_folder, "phantoms", "held_out")}
    if not os.path.isdir(phantoms["training"]):
        log(f"phantoms: {sum(TRAINING_CASES.values())} training and {HELD_OUT_CASES['num_hgg'] + HELD_OUT_CASES['num_lgg']} "
            f"held-out cases (seed {seed})")
        generate_brats_phantoms(phantoms["training"], seed=seed, shape_zyx=PHANTOM_SHAPE_ZYX, **TRAINING_CASES)
        generate_brats_phantoms(phantoms["held_out"], seed=seed, shape_zyx=PHANTOM_SHAPE_ZYX, **HELD_OUT_CASES)
    raw = nnunet["nnUNet_raw"]
    if not (os.path.isdir(raw) and any(d.startswith(f"Dataset{DATASET_ID}_") for d in os.listdir(raw))):
        log("converting with dataset_conversion/convert_brats2018.py's converter")
        convert_brats_dataset(phantoms["training"], DATASET_ID, nnunet["nnUNet_raw"],
                              test_folder=phantoms["held_out"])
    settings = ExperimentSettings(
        dataset=str(DATASET_ID), output_folder=os.path.join(output_folder, "experiment"), modalities=tuple(modalities),
        methods=tuple(methods),
        folds=(0,), device=device, epochs=epochs, iterations_per_epoch=iterations_per_epoch,
        val_iterations_per_epoch=2, final_validation=False,
        notes={"demo": {"seed": seed, "phantom_shape_zyx": list(PHANTOM_SHAPE_ZYX), "training_cases": TRAINING_CASES,
                        "held_out_cases": HELD_OUT_CASES}})
    Experiment(settings).run(log=log)
    return os.path.join(settings.output_folder, "report", "report.md")
