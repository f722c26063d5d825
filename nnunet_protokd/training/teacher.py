"""The one teacher loader: finds a student's frozen multi-modality teacher, checks it, builds it (its checks also
serve the modality-dropout model a student may start from: checked_multi_channel_model).

A student's teacher is, by default, the `ProtoKDTeacherTrainer` model of the same dataset and plans, trained
on the configuration the student's configuration inherits from, for the **same fold** (a teacher trained on
the student's validation cases would leak them). The student configuration may name another one under
`protokd.teacher`: `trainer`, `configuration`, `plans`, and `checkpoint` (a file name inside the fold folder,
or a path to any nnU-Net checkpoint). Any plain multi-channel nnU-Net model qualifies: only its weights,
plans.json and dataset.json are read; no code from the teacher's folder is run and its trainer class is
never imported (the checkpoint is loaded with torch.load(weights_only=True)).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_protokd.errors import TeacherError
from nnunet_protokd.io import load_checkpoint_weights_only, sha256_of
from nnunet_protokd.plans import TEACHER_DEFAULTS, configuration_settings, resolved_configuration, teacher_model_folder
from nnunet_protokd.training.features import FEATURES, FeatureCapture

# what every nnU-Net v2 checkpoint holds (nnUNetTrainer.save_checkpoint) and the teacher loader reads
NNUNET_CHECKPOINT_KEYS = ("network_weights", "init_args")


@dataclass
class TeacherCheckpoint:
    """A located and checked teacher, before its network is built."""
    checkpoint_path: str
    sha256: str
    trainer_name: str
    configuration: str
    fold: str
    plans: dict
    dataset_json: dict
    channel_indices: tuple  # the dataset channels fed to the teacher, in the teacher's order
    network_weights: dict

    def resolved_configuration(self) -> dict:
        """The teacher's configuration as its own plans resolve it."""
        return resolved_configuration(self.plans, self.configuration)

    def identity(self) -> dict:
        """What a student records to say which teacher it learnt from."""
        return {"checkpoint": os.path.abspath(self.checkpoint_path), "sha256": self.sha256,
                "trainer": self.trainer_name, "plans": self.plans["plans_name"],
                "configuration": self.configuration, "fold": self.fold,
                "channels": [self.dataset_json["channel_names"][str(c)] for c in range(len(self.channel_indices))]}

    def build(self, device: torch.device, compile_network: bool = False, features: tuple = FEATURES) -> "Teacher":
        plans_manager = PlansManager(self.plans)
        # without deep supervision the decoder computes only the full-resolution head the losses use
        network = nnUNetTrainer.build_network_architecture(
            plans_manager, plans_manager.get_configuration(self.configuration), len(self.channel_indices),
            plans_manager.get_label_manager(self.dataset_json).num_segmentation_heads, False)
        network.load_state_dict(self.network_weights)
        network.to(device).eval().requires_grad_(False)
        self.network_weights = None  # the copy on the device is the one in use
        return Teacher(network, self.channel_indices, compile_network, features)


class Teacher:
    """A frozen teacher network: eval mode, no gradients, never in an optimiser or a checkpoint."""

    def __init__(self, network: torch.nn.Module, channel_indices: tuple, compile_network: bool = False,
                 features: tuple = FEATURES):
        self.channel_indices = list(channel_indices)
        # hooks on the plain modules, which the compiled graph calls; only the features the student's losses use
        self.features = FeatureCapture(network, features)
        self.network = torch.compile(network) if compile_network else network

    @torch.no_grad()
    def __call__(self, data: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(logits (N, K, *S), {name: features} for the names it was built with) for a batch holding every dataset
        channel."""
        if self.channel_indices != list(range(data.shape[1])):
            data = data[:, self.channel_indices]
        with self.features.recording() as features:
            logits = self.network(data)
        return logits, features


def _fail(role: str, message: str):
    raise TeacherError(f"{role}: {message}")


def _unpickling_reason(exc: Exception) -> str:
    """PyTorch's reason for refusing a file, without its advice to load it with weights_only=False (which would
    run whatever code the file holds)."""
    message = " ".join(str(exc).split())
    if "WeightsUnpickler error:" in message:
        reason = message.split("WeightsUnpickler error:", 1)[1]
        reason = reason.split(" Please use ")[0].split(" Check the documentation of torch.load")[0].strip()
        return (f"it holds Python objects that a weights-only load refuses ({reason}); the plugin never runs code "
                f"from a checkpoint: give a checkpoint written by nnUNetv2_train")
    return f"{type(exc).__name__}: {message}"


def locate_teacher(plans: dict, configuration: str, fold, dataset_json: dict, results_folder: str,
                   resolved: dict | None = None) -> TeacherCheckpoint:
    """Finds and checks the teacher of the student (plans, configuration, fold) of a multi-channel dataset.
    `resolved`: the student's configuration already resolved by the caller (a trainer resolves it once)."""
    resolved = resolved or resolved_configuration(plans, configuration)
    spec = {**TEACHER_DEFAULTS, **configuration_settings(resolved).get("teacher", {})}
    teacher_configuration = spec["configuration"] or plans["configurations"][configuration].get("inherits_from")
    model_folder, checkpoint_path = teacher_model_folder(plans, configuration, results_folder, resolved)
    if model_folder is not None:
        checkpoint_path = os.path.join(model_folder, f"fold_{fold}", checkpoint_path)
    return checked_multi_channel_model(
        f"teacher of {plans['dataset_name']} {configuration} fold {fold}", checkpoint_path,
        f"Train it first (nnUNetv2_train {plans['dataset_name']} {teacher_configuration} {fold} -tr {spec['trainer']}) "
        f"or name another teacher in the student configuration (nnunet-protokd add-config --teacher-...)",
        plans, fold, dataset_json, resolved)


def checked_multi_channel_model(role: str, checkpoint_path: str, how_to_get_it: str, plans: dict, fold,
                                dataset_json: dict, resolved: dict) -> TeacherCheckpoint:
    """The nnU-Net model at `checkpoint_path` (fold_X/checkpoint_*.pth of a model folder) that a student of
    (plans, fold, its `resolved` configuration) learns from, checked as the student needs it: written by
    nnUNetv2_train for the student's fold and dataset, reading the student's modality among its channels, with the
    dataset's labels, spacing and normalisation. Raises TeacherError beginning with `role` (e.g. "teacher of ...");
    `how_to_get_it` follows the error of a missing file."""
    settings = configuration_settings(resolved)
    if not os.path.isfile(checkpoint_path):
        _fail(role, f"{checkpoint_path} does not exist. {how_to_get_it}")
    model_folder = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_path)))
    teacher_files = {}
    for name in ("plans.json", "dataset.json"):
        try:
            with open(os.path.join(model_folder, name)) as f:
                teacher_files[name] = json.load(f)
        except (OSError, ValueError) as exc:
            _fail(role, f"cannot read {os.path.join(model_folder, name)} (an nnU-Net model folder "
                        f"holds plans.json and dataset.json beside fold_X): {exc}")
    teacher_plans, teacher_dataset_json = teacher_files["plans.json"], teacher_files["dataset.json"]
    try:
        checkpoint = load_checkpoint_weights_only(checkpoint_path)
    except Exception as exc:  # the unpickler's several error types alike
        _fail(role, f"cannot read the checkpoint {checkpoint_path}: {_unpickling_reason(exc)}")
    missing = [key for key in NNUNET_CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if not missing:
        missing = [f"init_args[{key!r}]" for key in ("fold", "configuration") if key not in checkpoint["init_args"]]
    if missing:
        plain = isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor)
                                                                    for v in checkpoint.values())
        _fail(role, f"{checkpoint_path} is not a checkpoint written by nnUNetv2_train: it lacks "
                    f"{', '.join(missing)}" + (" (it is a plain state_dict)" if plain else "") +
                    ". The fold and configuration it was trained on must be known (a model trained on the "
                    "student's validation cases would leak them): use nnU-Net's checkpoint_final.pth or "
                    "checkpoint_best.pth")

    teacher_fold = str(checkpoint["init_args"]["fold"])
    if teacher_fold != str(fold):
        _fail(role, f"{checkpoint_path} was trained on fold {teacher_fold}, the student on fold {fold}: the "
                    f"model would have seen the student's validation cases")
    if teacher_plans.get("dataset_name") != plans["dataset_name"]:
        _fail(role, f"{checkpoint_path} belongs to dataset {teacher_plans.get('dataset_name')}")
    dataset_channels = {name: int(i) for i, name in dataset_json["channel_names"].items()}
    teacher_channels = [teacher_dataset_json["channel_names"][str(i)]
                        for i in range(len(teacher_dataset_json["channel_names"]))]
    unknown = [c for c in teacher_channels if c not in dataset_channels]
    if unknown:
        _fail(role, f"its input channels {teacher_channels} include {unknown}, which the dataset "
                    f"{list(dataset_channels)} does not have")
    if settings["modality"] not in teacher_channels:
        _fail(role, f"its input channels {teacher_channels} do not include the student's modality "
                    f"{settings['modality']}")
    for key in ("labels", "regions_class_order"):
        if teacher_dataset_json.get(key) != dataset_json.get(key):
            _fail(role, f"its {key} {teacher_dataset_json.get(key)} differ from the dataset's "
                        f"{dataset_json.get(key)}")

    teacher_configuration = checkpoint["init_args"]["configuration"]
    teacher_resolved = resolved_configuration(teacher_plans, teacher_configuration)
    if not np.allclose(teacher_resolved["spacing"], resolved["spacing"]):
        _fail(role, f"it was trained at spacing {teacher_resolved['spacing']}, the student's data has "
                    f"{resolved['spacing']}")
    for position, name in enumerate(teacher_channels):
        ours = resolved["normalization_schemes"][dataset_channels[name]]
        if teacher_resolved["normalization_schemes"][position] != ours:
            _fail(role, f"it normalises {name} with {teacher_resolved['normalization_schemes'][position]}, "
                        f"the student's data with {ours}")
    strides = teacher_resolved["architecture"]["arch_kwargs"].get("strides")
    if strides is not None:
        total_stride = np.prod(np.array(strides), axis=0)
        if len(total_stride) != len(resolved["patch_size"]) or np.any(np.array(resolved["patch_size"]) % total_stride):
            _fail(role, f"the student's patch size {resolved['patch_size']} is not a multiple of its "
                        f"network's total stride {total_stride.tolist()}")
    return TeacherCheckpoint(checkpoint_path, sha256_of(checkpoint_path), str(checkpoint.get("trainer_name")),
                             teacher_configuration, teacher_fold, teacher_plans, teacher_dataset_json,
                             tuple(dataset_channels[c] for c in teacher_channels), checkpoint["network_weights"])
