"""The reports' figures: dice.png and overlays.png of a report, learning_curves.png and paired_differences.png of the
evidence."""
from __future__ import annotations

import os

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk

from nnunet_protokd.methods import TEACHER, ModelKey, title

matplotlib.use("Agg")  # files only: no display on the machines that train


def plot_dice_bars(summary: dict, results: list, path: str) -> None:
    """Grouped bars: one panel per region, modalities on the x axis, one bar per student method (mean ± std
    over cases), the teacher as a dashed line. `results`: the report's rows in table order."""
    modalities = list(dict.fromkeys(r["modality"] for r in results if r["modality"] is not None))
    methods = list(dict.fromkeys(r["method"] for r in results if r["modality"] is not None))
    panels = summary["regions"] + ["mean"]
    with matplotlib.rc_context(matplotlib.rcParamsDefault):
        figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 3.6), sharey=True)
        width = 0.8 / max(1, len(methods))
        for axis, region in zip(np.atleast_1d(axes), panels):
            for m, method in enumerate(methods):
                values = [next((r["summary"][region] for r in results
                                if r["method"] == method and r["modality"] == modality), None)
                          for modality in modalities]
                axis.bar(np.arange(len(modalities)) + (m - (len(methods) - 1) / 2) * width,
                         [v["dice_mean"] if v else np.nan for v in values], width,
                         yerr=[v["dice_std"] if v else 0 for v in values], capsize=2,
                         label=title(method))
            for r in results:
                if r["method"] == TEACHER.name:
                    axis.axhline(r["summary"][region]["dice_mean"], color="k", ls="--", lw=1, label=TEACHER.title)
            axis.set_xticks(range(len(modalities)), modalities)
            axis.set_title(region)
            axis.set_ylim(0, 1)
            axis.grid(True, axis="y", alpha=0.3)
        np.atleast_1d(axes)[0].set_ylabel(f"Dice (mean ± std, {summary['n_cases']} cases)")
        handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
        figure.tight_layout(rect=(0, 0.1, 1, 1))
        figure.savefig(path, dpi=90)
        plt.close(figure)


def plot_overlays(results: list, dataset_json: dict, images_folder: str, ground_truth_folder: str, path: str,
                  num_cases: int = 3) -> None:
    """For a few cases, the axial slice with the most tumour: each student modality's image with the ground
    truth, then every method's prediction on the image of the modality it saw (the teacher on the first).
    `results`: the report's rows in table order."""
    channels = {name: int(index) for index, name in dataset_json["channel_names"].items()}
    modalities = list(dict.fromkeys(r["modality"] for r in results if r["modality"] is not None)) or \
        [dataset_json["channel_names"]["0"]]
    file_ending = dataset_json["file_ending"]
    cases = sorted(next(iter(results))["per_case"])[:num_cases] if results else []
    columns = [("Ground truth", m, None) for m in modalities] + \
              [(f"{title(r['method'])}" + (f" {r['modality']}" if r["modality"] else ""),
                r["modality"] or modalities[0], r["folder"]) for r in results]

    def read(file):
        return sitk.GetArrayFromImage(sitk.ReadImage(file))

    colours = matplotlib.colors.ListedColormap([(0, 0, 0, 0), (0.1, 0.8, 0.1, 0.45), (0.9, 0.1, 0.1, 0.55),
                                                (1.0, 0.9, 0.0, 0.6)] + [(0.2, 0.4, 1.0, 0.5)] * 12)
    with matplotlib.rc_context(matplotlib.rcParamsDefault):
        figure, axes = plt.subplots(len(cases), len(columns), figsize=(1.9 * len(columns), 2.1 * len(cases)),
                                    squeeze=False)
        for row, case in enumerate(cases):
            reference = read(os.path.join(ground_truth_folder, case + file_ending))
            z = int(np.argmax((reference > 0).sum(axis=(1, 2))))
            # each modality's slice is read once per case, however many columns show it
            slices = {m: read(os.path.join(images_folder, f"{case}_{channels[m]:04d}{file_ending}"))[z]
                      for m in dict.fromkeys(modality for _, modality, _ in columns)}
            for column, (heading, modality, folder) in enumerate(columns):
                image = slices[modality]
                labels = reference if folder is None else read(os.path.join(folder, case + file_ending))
                axis = axes[row, column]
                axis.imshow(image, cmap="gray")
                axis.imshow(labels[z], cmap=colours, vmin=0, vmax=colours.N - 1, interpolation="nearest")
                axis.set_xticks([])
                axis.set_yticks([])
                if row == 0:
                    axis.set_title(heading if folder else f"{heading}\n({modality})", fontsize=8)
            axes[row, 0].set_ylabel(case, fontsize=7)
        figure.tight_layout()
        figure.savefig(path, dpi=90)
        plt.close(figure)


def plot_learning_curves(curves: dict, path: str) -> None:
    """One panel per modality (the models on every channel in each): nnU-Net's per-epoch pseudo Dice against
    training iterations, mean over seeds with the seeds' range shaded; baseline, students and variants."""
    keys = {key: ModelKey.parse(key) for key in curves}
    modalities = sorted({key.modality for key in keys.values() if key.modality})
    with matplotlib.rc_context(matplotlib.rcParamsDefault):
        figure, axes = plt.subplots(1, len(modalities), figsize=(6.5 * len(modalities), 4.5), sharey=True,
                                    squeeze=False)
        for axis, modality in zip(axes[0], modalities):
            # the models on every channel (the teacher, modality dropout) in every panel
            shown = [TEACHER.name] + [k for k, key in keys.items() if key.modality is None and k != TEACHER.name] \
                + [k for k, key in keys.items() if key.modality == modality]
            for index, text in enumerate(k for k in shown if k in curves):
                curve, method = curves[text], keys[text].method
                style = {"color": "k", "ls": "--"} if method == TEACHER.name else {"color": f"C{index}"}
                axis.plot(curve["iterations"], curve["mean"], label=title(method), **style)
                axis.fill_between(curve["iterations"], curve["low"], curve["high"], alpha=0.12,
                                  color=style["color"])
            axis.set_title(f"{modality} students")
            axis.set_xlabel("training iterations")
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=8)
        axes[0][0].set_ylabel("pseudo Dice (mean of regions; seeds: mean, range)")
        figure.tight_layout()
        figure.savefig(path, dpi=90)
        plt.close(figure)


def plot_paired_differences(rows: list, path: str) -> None:
    """Forest plot: per row (label, {region or "mean": comparison}, {region: its Verdict}; evidence.forest_rows) the
    paired Dice difference with the hierarchical bootstrap 95 % CI and each trained model's mean difference
    (crosses), one panel per region and the mean; red where the verdict is better or worse, grey where it is "no
    knowledge to transfer" (the teacher is not better than the baseline there)."""
    panels = list(rows[0][1]) if rows else []
    with matplotlib.rc_context(matplotlib.rcParamsDefault):
        figure, axes = plt.subplots(1, max(1, len(panels)), figsize=(3.2 * max(1, len(panels)) + 3.5,
                                                                     0.45 * len(rows) + 1.7),
                                    sharey=True, squeeze=False)
        for axis, region in zip(axes[0], panels):
            for row, (_, comparisons, verdicts) in enumerate(rows):
                c, decision = comparisons[region], verdicts[region]
                low, high = c["hierarchical_ci95"]
                colour = "C3" if decision.direction else ("0.6" if not decision.knowledge else "C0")
                axis.errorbar(c["mean_difference"], row, xerr=[[c["mean_difference"] - low],
                                                               [high - c["mean_difference"]]],
                              fmt="o", color=colour, mfc="white" if not decision.knowledge else colour, capsize=3)
                axis.plot(list(c["per_replicate"].values()), [row] * c["replicates"], "x", color="0.4", ms=4)
            axis.axvline(0, color="k", lw=1)
            axis.set_title(region)
            axis.set_xlabel("Dice difference")
            axis.grid(True, axis="x", alpha=0.3)
        axes[0][0].set_yticks(range(len(rows)), [label for label, _, _ in rows])
        axes[0][0].invert_yaxis()
        figure.suptitle("Paired Dice difference to the unimodal baseline (rows '- modality dropout': to modality "
                        "dropout), hierarchical bootstrap 95 % CI, x: each seed's mean\n(red: better or worse by the "
                        "seed-level rule; grey, hollow: no knowledge to transfer, the teacher is not better there)",
                        fontsize=10)
        figure.tight_layout()
        figure.savefig(path, dpi=90)
        plt.close(figure)
