"""Plots written next to nnU-Net's own progress.png."""
from __future__ import annotations

import os


def plot_loss_terms(series: dict, path: str, title: str) -> None:
    """One line per loss term over epochs (log scale: the terms differ by orders of magnitude)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # nnU-Net's own progress plot changes matplotlib's global style (seaborn, huge fonts): start from defaults
    with matplotlib.rc_context(matplotlib.rcParamsDefault):
        figure, axis = plt.subplots(figsize=(9, 5))
        for name, values in series.items():
            axis.plot(range(len(values)), values, marker="o" if len(values) < 30 else None, label=name)
        axis.set_yscale("log")
        axis.set_xlabel("epoch")
        axis.set_ylabel("training loss term (epoch mean)")
        axis.set_title(f"{title}: loss terms (unweighted)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
        figure.tight_layout()
        figure.savefig(path + ".partial.png", dpi=100)
        plt.close(figure)
    os.replace(path + ".partial.png", path)
