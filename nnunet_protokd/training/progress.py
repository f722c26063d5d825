"""The distillation loss terms beside nnU-Net's progress.png: distillation_progress.png in the model folder."""
from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt

from nnunet_protokd.io import atomic_file

matplotlib.use("Agg")


def plot_loss_terms(series: dict, gradient_norms: dict, path: str, title: str) -> None:
    """Per epoch: the segmentation loss (linear axis: nnU-Net's Dice term makes it negative once training goes
    well), the distillation terms (log axis: non-negative, orders of magnitude apart) and how strongly each
    weighted term pulls on the student (gradient norm at its parameters, first step of the epoch; log axis)."""
    # nnU-Net's own progress plot changes matplotlib's global style (seaborn, huge fonts): start from defaults
    with matplotlib.rc_context(matplotlib.rcParamsDefault):
        figure, (top, middle, bottom) = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
        panels = ((top, series, ["seg_loss"]), (middle, series, [n for n in series if n != "seg_loss"]),
                  (bottom, gradient_norms, list(gradient_norms)))
        colours = {name: f"C{index}" for index, name in enumerate(series)}  # one colour per term in every panel
        for axis, values_of, names in panels:
            for name in names:
                values = values_of[name]
                axis.plot(range(len(values)), values, marker="o" if len(values) < 30 else None, label=name,
                          color=colours[name])
            axis.grid(True, which="both", alpha=0.3)
            axis.legend()
        top.set_ylabel("segmentation loss")
        middle.set_yscale("log")
        middle.set_ylabel("distillation terms (unweighted)")
        bottom.set_yscale("log")
        bottom.set_ylabel("gradient norm of weight x term")
        bottom.set_xlabel("epoch")
        top.set_title(f"{title}: training loss terms, epoch means")
        figure.tight_layout()
        with atomic_file(path) as temporary:
            figure.savefig(temporary, dpi=100, format="png")
        plt.close(figure)
