"""`nnunet-protokd demo`: one seed of the evidence protocol on built-in phantoms, sized for a CPU.

Phantoms in the BraTS 2018 layout -> the BraTS converter (training folder + a labelled held-out folder) ->
`experiment` (teacher, unimodal, ProtoKD and KD-Net students and one nnU-Net trained with modality dropout, on the
evidence run's schedule, predictions of the held-out cases) -> the evidence report of that seed, whose result
sentence puts the committed evidence run's figures (five seeds, docs/evidence/) beside the demo's own. Everything
lives in one folder with its own nnUNet_raw/_preprocessed/_results, so a user's nnU-Net folders are never touched;
running the command again continues where it stopped.
"""
from __future__ import annotations

import os

from nnunet_protokd.protocol.evidence import CPU_SCHEDULE, EVIDENCE_METHODS, Evidence, EvidenceSettings

FIRST_DATASET_ID = 501  # the demo of seed s converts its phantoms into Dataset<501 + s>
# the evidence run committed with the project (docs/evidence at the repository's root, beside the package): its
# figures stand beside the demo's
REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMITTED_EVIDENCE = os.path.join(REPOSITORY, "docs", "evidence", "evidence.json")


def run_demo(output_folder: str, seed: int = 0, modalities=("T1ce",), epochs: int | None = None,
             iterations_per_epoch: int | None = None, device: str = "cpu", methods=EVIDENCE_METHODS,
             log=print) -> str:
    settings = EvidenceSettings(
        output_folder=output_folder, seeds=(seed,), modalities=tuple(modalities), methods=tuple(methods), variants=(),
        configuration=CPU_SCHEDULE["configuration"], epochs=epochs or CPU_SCHEDULE["epochs"],
        iterations_per_epoch=iterations_per_epoch or CPU_SCHEDULE["iterations_per_epoch"],
        val_iterations_per_epoch=CPU_SCHEDULE["val_iterations_per_epoch"], device=device,
        first_dataset_id=FIRST_DATASET_ID, reference_evidence=COMMITTED_EVIDENCE)
    return Evidence(settings, log=log).run()
