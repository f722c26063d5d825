"""The one place where a multi-channel dataset becomes the view of a model that reads some of its channels.

Students train on the multi-channel preprocessed data (a distilling teacher needs every channel of the same
augmented patch) and see only their own channel; an LCKD model folder for a subset of modalities reads only
those. `ChannelSubset.select` cuts batches and cases, and `ChannelSubset.plans` / `ChannelSubset.dataset_json`
cut the plans and dataset.json that the model folder carries, so that `nnUNetv2_predict` reads only those files
per case and normalises them exactly like training did. `StudentModality` is the one-channel case.
"""
from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass

import numpy as np
import torch

from nnunet_protokd.errors import ConfigurationError, UserError
from nnunet_protokd.methods import MODALITY_SEPARATOR
from nnunet_protokd.plans import channel_index, configuration_settings, resolved_configuration
from nnunet_protokd.settings import SETTINGS_KEY

# keys of a plans configuration that hold one entry per input channel
PER_CHANNEL_CONFIGURATION_KEYS = ("normalization_schemes", "use_mask_for_norm")


@dataclass(frozen=True)
class ChannelSubset:
    """Some channels of a multi-channel dataset, in the dataset's channel order (e.g. T1ce and FLAIR of BraTS).

    The view a model has that reads only these channels: of batches and cases (`select`), of the plans (per-channel
    entries of the subset first, `plans`) and of dataset.json (only the subset's channel_names, `dataset_json`).
    """
    names: tuple
    channel_indices: tuple

    @classmethod
    def of_names(cls, dataset_json: dict, names) -> "ChannelSubset":
        """The subset of `names` (case-insensitive modality names or channel indices as text)."""
        indices = sorted({channel_index(dataset_json, name) for name in names})
        if not indices:
            raise ConfigurationError("name at least one modality")
        return cls(tuple(dataset_json["channel_names"][str(i)] for i in indices), tuple(indices))

    @property
    def label(self) -> str:
        """e.g. "T1ce+FLAIR": part of configuration names and report keys (`of_names` reads it back when split
        at MODALITY_SEPARATOR)."""
        return MODALITY_SEPARATOR.join(self.names)

    def select(self, data, channel_axis: int = 1):
        """These channels of a batch (N, C, ...) or, with channel_axis=0, of a case (C, ...); the channel axis
        stays. Works on torch tensors, numpy and blosc2 arrays (a single channel is read as a slice, so blosc2
        reads only that channel)."""
        if data.shape[channel_axis] <= max(self.channel_indices):
            raise ValueError(f"{self._position}, but the data has only "
                             f"{data.shape[channel_axis]} channel(s) (shape {tuple(data.shape)})")
        parts = [data[(slice(None),) * channel_axis + (slice(c, c + 1),)] for c in self.channel_indices]
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts, channel_axis) if isinstance(data, torch.Tensor) else \
            np.concatenate([np.asarray(p) for p in parts], channel_axis)

    @property
    def _position(self) -> str:
        if len(self.names) == 1:
            return f"{self.names[0]} is channel {self.channel_indices[0]}"
        return f"{self.label} are channels {list(self.channel_indices)}"

    def plans(self, plans: dict) -> dict:
        """A copy of `plans` whose per-channel entries start with the subset's channels (input channels 0..k-1).

        The other channels' entries follow, in their original order. Prediction never uses them for correct
        input; they are kept because nnU-Net's preprocessor indexes these lists by input channel before the
        network sees the data: with them, a case given with too many files is preprocessed and then stopped by
        the network's channel check (which names the files to give) instead of an IndexError inside the
        preprocessor.
        """
        plans = deepcopy(plans)
        properties = plans.get("foreground_intensity_properties_per_channel")
        if properties is not None:
            order = self._subset_first(len(properties))
            plans["foreground_intensity_properties_per_channel"] = {
                str(new): properties[str(old)] for new, old in enumerate(order)}
        for configuration in plans["configurations"].values():
            for key in PER_CHANNEL_CONFIGURATION_KEYS:
                if key in configuration:
                    configuration[key] = [configuration[key][c] for c in self._subset_first(len(configuration[key]))]
        plans[SETTINGS_KEY] = {"channels": list(self.names), "source_channel_indices": list(self.channel_indices)}
        return plans

    def _subset_first(self, num_channels: int) -> list:
        if max(self.channel_indices) >= num_channels:
            raise ValueError(f"{self._position}, but the plans have only "
                             f"{num_channels} channel(s)")
        return list(self.channel_indices) + [c for c in range(num_channels) if c not in self.channel_indices]

    def dataset_json(self, dataset_json: dict) -> dict:
        dataset_json = deepcopy(dataset_json)
        dataset_json[SETTINGS_KEY] = {"channels": list(self.names),
                                      "source_channel_indices": list(self.channel_indices),
                                      "source_channel_names": dataset_json["channel_names"]}
        dataset_json["channel_names"] = {str(i): name for i, name in enumerate(self.names)}
        return dataset_json

    def dataset_class(self, multi_channel_dataset_class: type) -> type:
        """A subclass of nnU-Net's dataset class whose cases hold only these channels (final validation)."""
        subset = self

        class ChannelSubsetDataset(multi_channel_dataset_class):
            def load_case(self, identifier):
                data, seg, seg_prev, properties = super().load_case(identifier)
                return subset.select(data, channel_axis=0), seg, seg_prev, properties

        return ChannelSubsetDataset


@dataclass(frozen=True)
class StudentModality:
    """The one channel a single-modality student reads; its views come from the one-channel ChannelSubset."""
    name: str
    channel_index: int

    @classmethod
    def of_configuration(cls, plans: dict, configuration: str, dataset_json: dict,
                         resolved: dict | None = None) -> "StudentModality":
        """The student modality a configuration names (`resolved`: the configuration already resolved)."""
        settings = configuration_settings(resolved or resolved_configuration(plans, configuration))
        if "modality" not in settings:
            raise ConfigurationError(
                f"configuration {configuration!r} names no student modality. Add a student configuration with "
                f"`nnunet-protokd add-config -d DATASET -c {configuration} -m MODALITY` and train on "
                f"`{configuration}_MODALITY`")
        index = channel_index(dataset_json, settings["modality"])
        return cls(dataset_json["channel_names"][str(index)], index)

    @property
    def channels(self) -> ChannelSubset:
        return ChannelSubset((self.name,), (self.channel_index,))

    def select(self, data, channel_axis: int = 1):
        return self.channels.select(data, channel_axis)

    def single_channel_plans(self, plans: dict) -> dict:
        return self.channels.plans(plans)

    def single_channel_dataset_json(self, dataset_json: dict) -> dict:
        return self.channels.dataset_json(dataset_json)

    def dataset_class(self, multi_channel_dataset_class: type) -> type:
        return self.channels.dataset_class(multi_channel_dataset_class)


class InputChannelError(UserError, ValueError):
    """A model given a different number of input channels (files per case) than it was trained on."""


def describe_input_files(channel_names, num_channels: int | None = None, file_ending: str = "") -> str:
    """The files a model reads per case, e.g. "<case>_0000.nii.gz = T1ce only" or "<case>_0000 = T1ce,
    <case>_0001 = FLAIR"; without channel names (a plain nnU-Net model's plans) "<case>_0000 <case>_0001 ..." for
    `num_channels`. Prediction errors and model cards state the input rule in these words."""
    if channel_names is None:
        return " ".join(f"<case>_{c:04d}{file_ending}" for c in range(num_channels))
    if len(channel_names) == 1:
        return f"<case>_0000{file_ending} = {channel_names[0]} only"
    return ", ".join(f"<case>_{c:04d}{file_ending} = {name}" for c, name in enumerate(channel_names))


def model_channel_names(dataset_json: dict) -> list:
    """The input channels of a model folder's dataset.json, in the order of its files <case>_0000, _0001, ..."""
    return [dataset_json["channel_names"][str(c)] for c in range(len(dataset_json["channel_names"]))]


class InputChannelCheck:
    """Forward pre-hook: a clear error when a model gets a different number of channels than it was trained on
    (e.g. four modality files per case given to a one-modality student, or one file to the teacher)."""

    def __init__(self, num_input_channels: int, expected_files: str, hint: str = ""):
        self.num_input_channels = num_input_channels
        self.expected_files = expected_files
        self.hint = hint

    def __call__(self, module, args):
        received = args[0].shape[1]
        if received != self.num_input_channels:
            # nnU-Net's predictor gives the network tensors only: the case is the one its log names last
            # ("Predicting ..."); `nnunet-protokd predict` checks the files of every case before predicting
            raise InputChannelError(
                f"this model takes {self.num_input_channels} input channel(s) per case ({self.expected_files}) but "
                f"received {received}. Give the predictor exactly those files for every case (`nnunet-protokd "
                f"predict` checks them first and names the case).{self.hint}")


def with_input_channel_check(network: torch.nn.Module, num_input_channels: int, plans: dict,
                             hint: str = "") -> torch.nn.Module:
    """`plans` of the model: those of a channel subset (ChannelSubset.plans) name the files to give; `hint` is
    added to the error."""
    channels = plans.get(SETTINGS_KEY, {}).get("channels")
    network.register_forward_pre_hook(InputChannelCheck(num_input_channels,
                                                        describe_input_files(channels, num_input_channels), hint))
    return network
