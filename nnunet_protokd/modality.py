"""The one place where a multi-channel dataset becomes a single-modality student's view of it.

Students train on the multi-channel preprocessed data (a distilling teacher needs every channel of the same
augmented patch) and see only their own channel: `StudentModality.select` cuts batches and cases, and
`single_channel_plans` / `single_channel_dataset_json` cut the plans and dataset.json that the student's model
folder carries, so that `nnUNetv2_predict` reads one file per case and normalises it exactly like training did.
"""
from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass

import torch

from nnunet_protokd.configurations import (SETTINGS_KEY, ConfigurationError, channel_index,
                                           configuration_settings, resolved_configuration)

# keys of a plans configuration that hold one entry per input channel
PER_CHANNEL_CONFIGURATION_KEYS = ("normalization_schemes", "use_mask_for_norm")


@dataclass(frozen=True)
class StudentModality:
    name: str
    channel_index: int

    @classmethod
    def of_configuration(cls, plans: dict, configuration: str, dataset_json: dict) -> "StudentModality":
        settings = configuration_settings(resolved_configuration(plans, configuration))
        if "modality" not in settings:
            raise ConfigurationError(
                f"configuration {configuration!r} names no student modality. Add a student configuration with "
                f"`nnunet-protokd add-config -d DATASET -c {configuration} -m MODALITY` and train on "
                f"`{configuration}_MODALITY`")
        index = channel_index(dataset_json, settings["modality"])
        return cls(dataset_json["channel_names"][str(index)], index)

    def select(self, data, channel_axis: int = 1):
        """The student's channel of a batch (N, C, ...) or, with channel_axis=0, of a case (C, ...); the channel
        axis stays, with size 1. Works on torch tensors, numpy and blosc2 arrays (which read only that channel)."""
        if data.shape[channel_axis] <= self.channel_index:
            raise ValueError(f"{self.name} is channel {self.channel_index}, but the data has only "
                             f"{data.shape[channel_axis]} channel(s) (shape {tuple(data.shape)})")
        index = (slice(None),) * channel_axis + (slice(self.channel_index, self.channel_index + 1),)
        return data[index]

    def single_channel_plans(self, plans: dict) -> dict:
        """A copy of `plans` whose per-channel entries start with the student's channel (input channel 0).

        The other channels' entries follow, in their original order. Prediction never uses them for correct
        input; they are kept because nnU-Net's preprocessor indexes these lists by input channel before the
        network sees the data: with them, a case given with four files is preprocessed and then stopped by the
        network's channel check (which names the file to give) instead of an IndexError inside the preprocessor.
        """
        plans = deepcopy(plans)
        properties = plans.get("foreground_intensity_properties_per_channel")
        if properties is not None:
            order = self._student_first(len(properties))
            plans["foreground_intensity_properties_per_channel"] = {
                str(new): properties[str(old)] for new, old in enumerate(order)}
        for configuration in plans["configurations"].values():
            for key in PER_CHANNEL_CONFIGURATION_KEYS:
                if key in configuration:
                    configuration[key] = [configuration[key][c] for c in self._student_first(len(configuration[key]))]
        plans[SETTINGS_KEY] = {"single_channel_of": self.name, "source_channel_index": self.channel_index}
        return plans

    def _student_first(self, num_channels: int) -> list:
        if self.channel_index >= num_channels:
            raise ValueError(f"{self.name} is channel {self.channel_index}, but the plans have only "
                             f"{num_channels} channel(s)")
        return [self.channel_index] + [c for c in range(num_channels) if c != self.channel_index]

    def single_channel_dataset_json(self, dataset_json: dict) -> dict:
        dataset_json = deepcopy(dataset_json)
        dataset_json[SETTINGS_KEY] = {"single_channel_of": self.name, "source_channel_index": self.channel_index,
                                      "source_channel_names": dataset_json["channel_names"]}
        dataset_json["channel_names"] = {"0": self.name}
        return dataset_json

    def dataset_class(self, multi_channel_dataset_class: type) -> type:
        """A subclass of nnU-Net's dataset class whose cases hold only the student's channel (final validation)."""
        student = self

        class StudentChannelDataset(multi_channel_dataset_class):
            def load_case(self, identifier):
                data, seg, seg_prev, properties = super().load_case(identifier)
                return student.select(data, channel_axis=0), seg, seg_prev, properties

        return StudentChannelDataset


class InputChannelCheck:
    """Forward pre-hook: a clear error when a model gets a different number of channels than it was trained on
    (e.g. four modality files per case given to a one-modality student, or one file to the teacher)."""

    def __init__(self, num_input_channels: int, expected_files: str):
        self.num_input_channels = num_input_channels
        self.expected_files = expected_files

    def __call__(self, module, args):
        received = args[0].shape[1]
        if received != self.num_input_channels:
            raise ValueError(f"this model takes {self.num_input_channels} input channel(s) per case "
                             f"({self.expected_files}) but received {received}. Give the predictor exactly those "
                             f"files for every case.")


def with_input_channel_check(network: torch.nn.Module, num_input_channels: int, configuration: dict) -> torch.nn.Module:
    modality = configuration_settings(configuration).get("modality")
    if modality is not None:
        expected = f"<case>_0000 = {modality} only"
    else:
        expected = " ".join(f"<case>_{c:04d}" for c in range(num_input_channels))
    network.register_forward_pre_hook(InputChannelCheck(num_input_channels, expected))
    return network
