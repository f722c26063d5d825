"""A trained student as an nnU-Net model zip that a site with only nnU-Net installed can use, with a model card.

A ProtoKD, KD-Net or unimodal student is, at prediction, nnU-Net's own network with one input channel: only the
trainer's name ties it to the plugin, because nnU-Net's predictor builds the network through the class named in
each checkpoint's `trainer_name`. The export therefore writes checkpoints that name `nnUNetTrainer` (after
checking that their weights load into nnU-Net's own network), under the configuration `<configuration>_<method>`
(e.g. `3d_fullres_T1ce_ProtoKD`) so that two students of one modality install into different model folders:

    <dataset>/nnUNetTrainer__<plans>__<configuration>_<method>/
        plans.json dataset.json dataset_fingerprint.json        (single-channel, the new configuration added)
        fold_X/checkpoint_final.pth ...                           (the student's weights only, no teacher)
        fold_X/validation/summary.json ...                       (when nnU-Net's final validation ran)
        model_card.md model_card.json                            (method, input rule, labels, teacher, versions)
        convert_predictions_to_brats.py                          (BraTS datasets: numpy/SimpleITK only)

`nnUNetv2_install_pretrained_model_from_zip` extracts this into nnUNet_results. The zip is written here rather
than by nnU-Net's `export_pretrained_model`, which requires validation/summary.json and progress.png of every fold
and takes no extra files; its layout is the one nnU-Net's installer expects. LCKD subset models (its fusion network
is the plugin's) are exported unchanged, and their card says that they need the plugin.
"""
from __future__ import annotations

import io
import json
import os
import platform
import zipfile
from copy import deepcopy
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import nnunetv2.paths as nnunet_paths  # read at call time: tests and commands set them late
import numpy as np
import torch
from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.file_path_utilities import folds_tuple_to_string
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

import nnunet_protokd
from nnunet_protokd.channels import describe_input_files, model_channel_names
from nnunet_protokd.data import brats_labels
from nnunet_protokd.io import atomic_file, load_checkpoint_weights_only
from nnunet_protokd.lckd.subsets import SLICED_FROM_KEY
from nnunet_protokd.methods import METHOD_DEFAULTS, MODALITY_SEPARATOR
from nnunet_protokd.plans import (
    configuration_settings,
    dataset_name,
    method_settings,
    nnunet_folder_holding,
    resolved_configuration,
)
from nnunet_protokd.settings import SCHEDULE_KEYS, SETTINGS_KEY

EXPORT_TRAINER = "nnUNetTrainer"
CARD_NAME = "model_card"
BACK_CONVERSION_SCRIPT = "convert_predictions_to_brats.py"
# copied from each fold folder when present (nnU-Net's exporter takes the first three)
FOLD_FILES = ("debug.json", "progress.png", "validation/summary.json", "distillation.json",
              "distillation_progress.png", "lckd_elections.json", "validation_subsets/summary.json")
CROSSVALIDATION_FILES = ("summary.json", "postprocessing.pkl", "postprocessing.json")


class ExportError(ValueError):
    """A model that cannot be exported as asked; the message says which and why."""


@dataclass
class ExportedModel:
    zip_file: str
    model_folder: str  # inside the zip (and inside nnUNet_results once installed): <dataset>/<trainer>__<plans>__<c>
    card: dict


def method_label(trainer: str) -> str:
    """ProtoKDTrainer -> ProtoKD: the method's part of an exported configuration name."""
    return trainer[:-len("Trainer")] if trainer.endswith("Trainer") and trainer != "Trainer" else trainer


def parse_fold(fold) -> int | str:
    if str(fold) == "all":
        return "all"
    try:
        return int(fold)
    except ValueError:
        raise ExportError(f"fold {fold!r} is neither a number nor 'all'") from None


def export_student(dataset: str, configuration: str, trainer: str, folds, output_file: str,
                   plans_name: str = "nnUNetPlans", checkpoints=("checkpoint_final.pth",),
                   overwrite: bool = False) -> ExportedModel:
    """Writes `output_file`, an nnU-Net model zip of the student `trainer` on `configuration` (folds `folds`).

    Everything is checked before writing; the zip is written under a temporary name next to `output_file` and
    renamed into place, so that a failure leaves nothing behind. An existing `output_file` is replaced only
    with `overwrite`.
    """
    nnUNet_results = nnunet_paths.nnUNet_results
    output_file = os.path.abspath(output_file)
    if os.path.isdir(output_file):
        raise ExportError(f"{output_file} is a folder; give the zip file to write")
    if os.path.exists(output_file) and not overwrite:
        raise ExportError(f"{output_file} exists; pass --overwrite to replace it")
    if not os.path.isdir(os.path.dirname(output_file)):
        raise ExportError(f"the folder of {output_file} does not exist")
    if not nnUNet_results.get():
        raise ExportError("set the environment variable nnUNet_results (see README)")
    if (variable := nnunet_folder_holding(output_file)) is not None:
        raise ExportError(f"{output_file} is inside {variable} ({getattr(nnunet_paths, variable).get()}), whose "
                          f"files nnU-Net reads (it could replace a trained model); write the zip elsewhere")
    name = dataset_name(dataset)
    source = os.path.join(nnUNet_results.get(), name, f"{trainer}__{plans_name}__{configuration}")
    if not os.path.isdir(source):
        raise ExportError(f"no model folder {source}: train it first (nnUNetv2_train {dataset} {configuration} FOLD "
                          f"-tr {trainer})")
    plans, dataset_json = (_read_json(os.path.join(source, f), source) for f in ("plans.json", "dataset.json"))
    folds = [parse_fold(f) for f in folds]
    if not folds or len(set(folds)) != len(folds):
        raise ExportError(f"give each fold once, got {folds}")
    checkpoint_files = {}
    for fold in folds:
        for checkpoint in checkpoints:
            path = os.path.join(source, f"fold_{fold}", checkpoint)
            if not os.path.isfile(path):
                raise ExportError(f"fold {fold} of {source} is not trained: {path} does not exist (nnUNetv2_train "
                                  f"{dataset} {configuration} {fold} -tr {trainer})")
            checkpoint_files[fold, checkpoint] = path
    # the configuration the network was trained on: an LCKD subset folder's checkpoints are the trained model's
    trained_configuration = _load_checkpoint(checkpoint_files[folds[0], checkpoints[0]])["init_args"]["configuration"]
    plain = _is_plain_student(source, plans, dataset_json, trained_configuration)
    if plain:
        export_configuration = f"{configuration}_{method_label(trainer)}"
        export_folder = f"{EXPORT_TRAINER}__{plans_name}__{export_configuration}"
        export_plans = deepcopy(plans)
        resolved = resolved_configuration(plans, configuration)
        resolved.pop("inherits_from", None)  # self-contained: a plain copy of what the student trained with
        export_plans["configurations"][export_configuration] = resolved
    else:  # an LCKD subset folder: the plugin's network, exported unchanged
        export_configuration, export_folder, export_plans = configuration, os.path.basename(source), plans
    prefix = f"{name}/{export_folder}/"
    subset_label = None if plain else MODALITY_SEPARATOR.join(plans[SETTINGS_KEY]["channels"])
    # an LCKD subset folder's checkpoints link to the trained model's fold folders, which hold its other files; a
    # modality-dropout subset folder's are nnU-Net's own network sliced from them (and name them)
    first_checkpoints = {fold: _load_checkpoint(checkpoint_files[fold, checkpoints[0]]) for fold in folds}
    fold_folders = {fold: os.path.dirname(_trained_checkpoint(checkpoint_files[fold, checkpoints[0]],
                                                              first_checkpoints[fold])) for fold in folds}
    needs_plugin = not plain and first_checkpoints[folds[0]]["trainer_name"] != EXPORT_TRAINER
    fold_files = FOLD_FILES if plain else tuple(f for f in FOLD_FILES if f != "validation/summary.json")

    with atomic_file(output_file) as partial:
        records = {}
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
            for (fold, checkpoint_name), path in checkpoint_files.items():
                checkpoint = _load_checkpoint(path)
                if checkpoint_name == checkpoints[0]:
                    records[fold] = _fold_record(checkpoint, fold_folders[fold], subset_label, dataset_json)
                arcname = f"{prefix}fold_{fold}/{checkpoint_name}"
                if plain:
                    checkpoint = _plain_checkpoint(checkpoint, export_plans, export_configuration, dataset_json,
                                                   f"fold {fold} {checkpoint_name} of {source}")
                    buffer = io.BytesIO()
                    torch.save(checkpoint, buffer)
                    archive.writestr(arcname, buffer.getvalue())
                else:
                    archive.write(path, arcname)
            for fold in folds:
                for file in fold_files:
                    path = os.path.join(fold_folders[fold], file)
                    if os.path.isfile(path):
                        archive.write(path, f"{prefix}fold_{fold}/{file}")
            crossvalidation = f"crossval_results_folds_{folds_tuple_to_string(folds)}"
            for file in CROSSVALIDATION_FILES:
                path = os.path.join(source, crossvalidation, file)
                if os.path.isfile(path):
                    archive.write(path, f"{prefix}{crossvalidation}/{file}")
            archive.writestr(prefix + "plans.json", json.dumps(export_plans, indent=4))
            archive.writestr(prefix + "dataset.json", json.dumps(dataset_json, indent=4))
            if os.path.isfile(os.path.join(source, "dataset_fingerprint.json")):
                archive.write(os.path.join(source, "dataset_fingerprint.json"), prefix + "dataset_fingerprint.json")
            card = model_card(source, name, export_folder, export_configuration, trainer, plans_name, plans,
                              dataset_json, configuration, trained_configuration, folds, list(checkpoints), records,
                              plain, needs_plugin, os.path.basename(output_file))
            archive.writestr(prefix + CARD_NAME + ".json", json.dumps(card, indent=2))
            archive.writestr(prefix + CARD_NAME + ".md", card_markdown(card))
            if card["labels"]["brats_back_conversion"]:
                archive.write(brats_labels.__file__, prefix + BACK_CONVERSION_SCRIPT)
    return ExportedModel(output_file, f"{name}/{export_folder}", card)


def _read_json(path: str, source: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {path} of the model folder {source}: {exc}") from None


def _trained_checkpoint(path: str, checkpoint: dict) -> str:
    """The trained checkpoint that the checkpoint at `path` is: itself, the one an LCKD subset folder links to, or
    the one a modality-dropout subset folder's was sliced from."""
    if SLICED_FROM_KEY in checkpoint:
        return os.path.normpath(os.path.join(os.path.dirname(path), checkpoint[SLICED_FROM_KEY]["checkpoint"]))
    return os.path.realpath(path)


def _load_checkpoint(path: str) -> dict:
    try:
        return load_checkpoint_weights_only(path)
    except Exception as exc:  # the unpickler's several error types alike
        raise ExportError(f"cannot read {path}: {type(exc).__name__}: {str(exc)[:300]}") from None


def _is_plain_student(source: str, plans: dict, dataset_json: dict, trained_configuration: str) -> bool:
    """True for a one-modality student (nnU-Net's network), False for an LCKD subset folder (the plugin's
    network); anything else (a teacher, any multi-channel model, a model of plain nnU-Net) is refused."""
    channels = model_channel_names(dataset_json)
    subset = plans.get(SETTINGS_KEY, {}).get("channels")
    if subset is None:
        raise ExportError(
            f"{source} is a {len(channels)}-channel model ({', '.join(channels)}), not a student of the plugin: "
            f"export a one-modality student (a configuration added by `nnunet-protokd add-config -m MODALITY`) or an "
            f"LCKD subset folder (`nnunet-protokd lckd-subset`); nnUNetv2_export_model_to_zip exports plain "
            f"nnU-Net models")
    if "modality" in configuration_settings(resolved_configuration(plans, trained_configuration)):
        if len(channels) != 1:  # a student folder always holds single-channel files; guard against edited ones
            raise ExportError(f"{source}: a student's dataset.json must list one channel, it lists {channels}")
        return True
    return False


def _plain_checkpoint(checkpoint: dict, plans: dict, configuration: str, dataset_json: dict, what: str) -> dict:
    """The checkpoint as plain nnU-Net's predictor reads it: trainer nnUNetTrainer, the exported configuration and
    plans. Raises ExportError if the weights do not load into nnU-Net's own network of that configuration."""
    plans_manager = PlansManager(plans)
    network = nnUNetTrainer.build_network_architecture(
        plans_manager, plans_manager.get_configuration(configuration), len(dataset_json["channel_names"]),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, False)
    try:
        network.load_state_dict(checkpoint["network_weights"])
    except (RuntimeError, KeyError) as exc:
        raise ExportError(f"{what}: its weights do not load into nnU-Net's own network, so plain nnU-Net could not "
                          f"run it: {str(exc).strip().splitlines()[0][:300]}") from None
    checkpoint = dict(checkpoint, trainer_name=EXPORT_TRAINER)
    checkpoint["init_args"] = dict(checkpoint["init_args"], configuration=configuration, plans=plans,
                                   dataset_json=dataset_json)
    return checkpoint


def _fold_record(checkpoint: dict, fold_folder: str, subset_label: str | None, dataset_json: dict) -> dict:
    """What the card says of one fold: epochs trained, the distillation record (teacher identity), and this
    model's validation Dice: nnU-Net's final validation, or for an LCKD subset model its row of LCKD's subset
    validation (the trained model's nnU-Net validation used every modality)."""
    validation = None
    if subset_label is None:
        summary = _optional_json(os.path.join(fold_folder, "validation", "summary.json"))
        if summary:
            validation = _validation_dice({key: metrics["Dice"] for key, metrics in summary["mean"].items()},
                                          summary["foreground_mean"]["Dice"], len(summary["metric_per_case"]),
                                          dataset_json)
    else:
        summary = _optional_json(os.path.join(fold_folder, "validation_subsets", "summary.json"))
        if summary and subset_label in summary["subsets"]:
            row = summary["subsets"][subset_label]
            validation = _validation_dice(row["mean"], row["foreground_mean"], len(summary["cases"]), dataset_json)
    return {"epochs_trained": int(checkpoint.get("current_epoch", 0)), "distillation": checkpoint.get(SETTINGS_KEY),
            "validation": validation}


def _optional_json(path: str) -> dict | None:
    return _read_json(path, os.path.dirname(path)) if os.path.isfile(path) else None


def _versions() -> dict:
    found = {"nnunet_protokd": nnunet_protokd.__version__, "python": platform.python_version()}
    for package in ("nnunetv2", "torch"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def _validation_dice(mean_dice: dict, foreground_mean: float, cases: int, dataset_json: dict) -> dict:
    """{"cases": n, "dice": {label or region name: mean Dice, "foreground mean": ...}} from Dice keyed as nnU-Net's
    summary.json keys labels and regions."""
    dice = {}
    for label_name, value in dataset_json["labels"].items():
        key = label_or_region_to_key(tuple(value) if isinstance(value, list) else value)
        if key in mean_dice:
            dice[label_name] = mean_dice[key]
    dice["foreground mean"] = foreground_mean
    return {"cases": cases, "dice": dice}


def _normalisation_sentence(scheme: str, use_mask: bool) -> str:
    if scheme == "ZScoreNormalization":
        where = "the non-zero (brain) voxels" if use_mask else "the whole image"
        return (f"z-score ({scheme}): each scan's mean and standard deviation over {where}, computed by nnU-Net at "
                f"prediction")
    return f"{scheme} (nnU-Net's, with the training set's statistics stored in plans.json)"


def model_card(source: str, name: str, export_folder: str, export_configuration: str, trainer: str, plans_name: str,
               plans: dict, dataset_json: dict, configuration: str, trained_configuration: str, folds: list,
               checkpoints: list, records: dict, plain: bool, needs_plugin: bool, zip_name: str) -> dict:
    """The model card's content (model_card.json; model_card.md is its rendering). `trained_configuration` is
    the one in the checkpoints (a subset folder's is the configuration its model trained on). `plain`: a
    one-modality student, exported as nnU-Net's trainer; `needs_plugin`: an LCKD subset folder (a
    modality-dropout one is nnU-Net's own network)."""
    channels = model_channel_names(dataset_json)
    trained = resolved_configuration(plans, trained_configuration)
    settings = configuration_settings(trained)
    first = records[folds[0]]["distillation"] or {}
    method_settings_used = first.get("settings") or (method_settings(trained, trainer) if trainer in METHOD_DEFAULTS
                                                     else {})
    files = {f"<case>_{i:04d}{dataset_json['file_ending']}": channel for i, channel in enumerate(channels)}
    brats = "brats_naming" in dataset_json
    spacing = [round(float(s), 4) for s in trained["spacing"]]
    preparation = ("skull-stripped and co-registered to the BraTS template (SRI-24) at the training data's resolution "
                   "(BraTS: 1 mm isotropic), as the BraTS challenge prepares its scans" if brats else
                   f"prepared exactly like the training data of {name}")
    input_files = describe_input_files(channels, file_ending=dataset_json["file_ending"])
    rule = (f"One file per case and nothing else: {input_files} (a case with other files is refused). The scan "
            f"must be {preparation}. Give raw intensities: nnU-Net crops to the non-zero region, resamples to the "
            f"training spacing {spacing} mm (z, y, x) and normalises by itself.")
    folds_text = " ".join(map(str, folds))
    versions = _versions()
    install_nnunet = f"pip install nnunetv2=={versions['nnunetv2']}" if versions["nnunetv2"] else "pip install nnunetv2"
    predict = (f"nnUNetv2_predict -d {name} -c {export_configuration} -tr {EXPORT_TRAINER if plain else trainer} "
               f"-p {plans_name} -f {folds_text} -i INPUT_FOLDER -o OUTPUT_FOLDER")
    if not needs_plugin:
        usage = [install_nnunet, f"nnUNetv2_install_pretrained_model_from_zip {zip_name}", predict]
    else:
        usage = [install_nnunet, f"pip install -e nnunet-protokd/  # a checkout of the plugin, version "
                                 f"{versions['nnunet_protokd']}: this model's network is LCKD's",
                 "nnunet-protokd register-trainers", f"nnUNetv2_install_pretrained_model_from_zip {zip_name}", predict]
    back_conversion = None
    if brats:
        convention = brats_labels.generation_of(dataset_json)
        lookup = brats_labels.nnunet_to_brats_labels(np.arange(len(convention.brats_labels)), convention).tolist()
        back_conversion = {
            "generation": convention.name,
            "nnunet_to_brats": {str(k): v for k, v in enumerate(lookup)},
            "meaning": {"0": "background", **{
                str(k): f"{brats_labels.NNUNET_CLASSES[k][0]} (BraTS {v}, {convention.names[k]})"
                for k, v in enumerate(lookup) if k}},
            "command": f"python $nnUNet_results/{name}/{export_folder}/{BACK_CONVERSION_SCRIPT} OUTPUT_FOLDER "
                       f"BRATS_LABELS_FOLDER --reference ORIGINAL_BRATS_FOLDER --label-convention {convention.name}",
            "needs": "numpy and SimpleITK (installed with nnU-Net); --reference is optional: with it, each "
                     "prediction must lie on the grid of the case's original T1 file (refused otherwise) and the "
                     "output takes that file's exact header"}
    schemes = trained["normalization_schemes"][:len(channels)]
    masks = trained["use_mask_for_norm"][:len(channels)]
    return {
        "model": {"folder": f"{name}/{export_folder}", "dataset": name, "trainer": EXPORT_TRAINER if plain else trainer,
                  "plans": plans_name, "configuration": export_configuration, "folds": folds,
                  "checkpoints": checkpoints, "needs_plugin": needs_plugin,
                  "exported_from": {"model_folder": source, "trainer": trainer, "configuration": configuration}},
        "usage": usage,
        "method": {"name": method_label(trainer), "trainer": trainer, "settings": method_settings_used,
                   "modality": first.get("modality") or MODALITY_SEPARATOR.join(channels),
                   "trained_with_plugin_version": first.get("plugin_version")},
        "input": {"files": files, "rule": rule, "spacing_mm_zyx": spacing, "patch_size": trained["patch_size"],
                  "normalization": [{"channel": c, "scheme": s, "use_mask_for_norm": bool(m),
                                     "description": _normalisation_sentence(s, m)}
                                    for c, s, m in zip(channels, schemes, masks)]},
        "labels": {"labels": dataset_json["labels"], "regions_class_order": dataset_json.get("regions_class_order"),
                   "brats_back_conversion": back_conversion},
        "teacher": {str(f): (r["distillation"] or {}).get("teacher") for f, r in records.items()}
        if any(r["distillation"] and r["distillation"].get("teacher") for r in records.values()) else None,
        "training_data": {"dataset": name, "cases": dataset_json.get("numTraining"), "folds": folds,
                          "schedule": {k: settings[k] for k in SCHEDULE_KEYS if k in settings},
                          "epochs_trained": {str(f): r["epochs_trained"] for f, r in records.items()}},
        "validation": {str(f): r["validation"] for f, r in records.items()},
        "versions": versions,
    }


def card_markdown(card: dict) -> str:
    """model_card.md: the card for people."""
    model, method, inputs, labels = card["model"], card["method"], card["input"], card["labels"]
    lines = [f"# {method['name']} model of {model['dataset']} for {method['modality']} only", ""]
    if model["needs_plugin"]:
        lines += ["**This model needs the nnunet-protokd plugin installed**: its network (LCKD's modality fusion) is "
                  "not nnU-Net's own.", ""]
    else:
        lines += ["Runs with nnU-Net alone (no plugin, no teacher): the checkpoints name nnU-Net's own trainer and "
                  "hold only the student's network.", ""]
    lines += ["## Use", "", "```bash", *card["usage"], "```", "",
              "## Input", "", inputs["rule"], ""]
    lines += [f"- `{file}` = {channel}" for file, channel in inputs["files"].items()]
    lines += [f"- normalisation of {n['channel']}: {n['description']}" for n in inputs["normalization"]]
    lines += [f"- training spacing {inputs['spacing_mm_zyx']} mm (z, y, x), patch size {inputs['patch_size']}", "",
              "## Output", "", f"A label map per case (`<case>{'.nii.gz'}`, the input's grid). dataset.json labels: "
              f"`{json.dumps(labels['labels'])}`" + (f", painted in the order `{labels['regions_class_order']}`"
                                                     if labels["regions_class_order"] else "") + ".", ""]
    back = labels["brats_back_conversion"]
    if back:
        lines += ["Label values: " + ", ".join(f"{k} = {v}" for k, v in back["meaning"].items()) + ".", "",
                  "Back to BraTS labels (" + ", ".join(f"{k} -> {v}" for k, v in back["nnunet_to_brats"].items()) +
                  f") with the script shipped in the model folder ({back['needs']}):", "", "```bash",
                  back["command"], "```", ""]
    trained_with = method["trained_with_plugin_version"]
    lines += ["## Method", "", f"- trainer `{method['trainer']}`, modality {method['modality']}" +
              (f", trained with nnunet-protokd {trained_with}" if trained_with else ""),
              f"- settings `{json.dumps(method['settings'])}`" if method["settings"] else "- no distillation settings"]
    if card["teacher"]:
        for fold, teacher in card["teacher"].items():
            lines.append(f"- fold {fold} teacher: `{teacher['checkpoint']}` (sha256 `{teacher['sha256']}`, "
                         f"{teacher['trainer']} {teacher['configuration']}, channels {', '.join(teacher['channels'])})")
    data = card["training_data"]
    lines += ["", "## Training data", "", f"- dataset {data['dataset']}, {data['cases']} training cases, "
              f"folds {', '.join(map(str, data['folds']))}",
              f"- epochs trained per fold: {json.dumps(data['epochs_trained'])}" +
              (f"; schedule {json.dumps(data['schedule'])}" if data["schedule"] else ""), "", "## Validation", ""]
    for fold, result in card["validation"].items():
        if result is None:
            lines.append(f"- fold {fold}: nnU-Net's final validation did not run")
        else:
            lines.append(f"- fold {fold} ({result['cases']} cases), Dice: " +
                         ", ".join(f"{k} {v:.4f}" for k, v in result["dice"].items()))
    lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in card["versions"].items()), "",
              f"Exported from `{model['exported_from']['model_folder']}`.", ""]
    return "\n".join(lines)
