"""Modality dropout: nnU-Net's own network on every channel, trained with random channels set to zero, and the same
network restricted to a subset of its channels by slicing its first convolution.

A zero input channel contributes nothing to the first convolution's output but that convolution's bias, which
does not depend on the input. So the network whose first convolution keeps only the weights of the present
channels (`sliced_state_dict`) computes exactly what the full network computes when the missing channels are zero
(`ZeroFilledNetwork`, what training showed it). That holds only when the network's input goes to one convolution
and to nothing else (a normalisation of the input, say, would see the zeros): `first_convolution` checks it.
"""
from __future__ import annotations

import os

import torch
from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier
from torch import nn

from nnunet_protokd.errors import ConfigurationError, TeacherError
from nnunet_protokd.methods import METHODS
from nnunet_protokd.training.teacher import TeacherCheckpoint, checked_multi_channel_model

SUBSET_SAMPLINGS = ("per_size", "per_subset")


class NotSliceableError(ConfigurationError):
    """A network whose input does not go to exactly one convolution: slicing that convolution to some channels
    would not equal feeding zeros for the others."""


def random_kept_channels(num_items: int, num_channels: int, sampling: str = "per_size",
                         keep_all_probability: float = 0.0,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, M) bool, the channels each training item keeps (every item keeps at least one).

    Each item keeps all M channels with probability `keep_all_probability`; otherwise "per_size" (ivadomed's and
    our default) draws the number of kept channels uniformly from 1..M and then a uniform subset of that size, and
    "per_subset" draws one of the 2^M - 1 non-empty subsets uniformly (so subsets of about M/2 channels dominate).
    Both can also keep all M channels: 1/M resp. 1/(2^M - 1) of the time.
    """
    if sampling not in SUBSET_SAMPLINGS:
        raise ValueError(f"sampling must be one of {SUBSET_SAMPLINGS}, got {sampling!r}")
    if sampling == "per_size":
        sizes = torch.randint(1, num_channels + 1, (num_items, 1), generator=generator)
        # the channels of smallest random rank are the kept ones: a uniform subset of each item's size
        ranks = torch.rand((num_items, num_channels), generator=generator).argsort(dim=1).argsort(dim=1)
        kept = ranks < sizes
    else:
        codes = torch.randint(1, 2 ** num_channels, (num_items,), generator=generator)
        kept = ((codes[:, None] >> torch.arange(num_channels)) & 1).bool()
    keep_all = torch.rand((num_items, 1), generator=generator) < keep_all_probability
    return kept | keep_all


def zero_missing_channels(data: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """data (N, M, *S) with the channels that `kept` ((N, M) or (M,) bool) marks False set to 0 (whatever they
    held, NaN included)."""
    mask = kept.to(data.device, torch.bool).expand(data.shape[0], data.shape[1])
    return torch.where(mask.view(*mask.shape, *(1,) * (data.dim() - 2)), data, torch.zeros((), dtype=data.dtype,
                                                                                           device=data.device))


class ZeroFilledNetwork(nn.Module):
    """A network on every channel with one fixed set of available channels, called like a plain network
    (x (N, M, *S) -> logits) by nnU-Net's predictor; the unavailable channels are set to 0 first."""

    def __init__(self, network: nn.Module, available: torch.Tensor):
        super().__init__()
        self.network = network
        self.available = available.bool()

    def forward(self, x):
        return self.network(zero_missing_channels(x, self.available))


def minimal_input_shape(num_input_channels: int, configuration_manager) -> tuple:
    """(1, C, *S): a small input the configuration's network takes: twice the product of its strides per axis, so
    that the bottleneck has more than one voxel (instance normalisation needs two)."""
    strides = torch.tensor(configuration_manager.pool_op_kernel_sizes).prod(dim=0)
    return (1, num_input_channels, *(2 * strides).tolist())


def first_convolution(network: nn.Module, input_shape: tuple) -> tuple:
    """The names of the one convolution that the network's input goes to: every path to it in the network (nnU-Net's
    U-Nets reach one module by several, e.g. `encoder.stages.0.0.convs.0.conv` and `.all_modules.0`, and each is a
    key of the state dict).

    Found by one forward pass on zeros of `input_shape` (N, C, *S), watching which modules receive the input
    tensor itself. Raises NotSliceableError unless exactly one module does and it is an ungrouped convolution
    over the C channels: otherwise the input reaches something that a zero channel would not leave alone
    (a normalisation, a linear layer, a second branch). Operations written out in a forward method (x * 2,
    x.mean()) are not modules and are not seen.
    """
    names = {}
    for name, module in network.named_modules(remove_duplicate=False):
        names.setdefault(module, []).append(name)
    x = torch.zeros(input_shape)
    receivers = []

    def watch(module, args):
        if args and args[0] is x and not any(True for _ in module.children()):
            receivers.append(module)

    handles = [module.register_forward_pre_hook(watch) for module in network.modules()]
    training = network.training
    try:
        network.eval()
        with torch.no_grad():
            network(x)
    finally:
        network.train(training)
        for handle in handles:
            handle.remove()
    described = ", ".join(f"{names[m][0] or 'the network'} ({type(m).__name__})" for m in receivers) or "no module"
    convolutions = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    if len(receivers) != 1 or not isinstance(receivers[0], convolutions) or receivers[0].groups != 1 \
            or receivers[0].in_channels != input_shape[1]:
        raise NotSliceableError(
            f"{type(network).__name__}: its input goes to {described}, not to one convolution over all "
            f"{input_shape[1]} channels alone, so a model for fewer channels cannot be made by slicing the first "
            f"convolution (it would not equal the full model fed zeros for the missing channels)")
    return tuple(names[receivers[0]])


def sliced_state_dict(state_dict: dict, convolution: tuple, channel_indices) -> dict:
    """A copy of `state_dict` whose convolution (its names, `first_convolution`; its weight (out, M, *K)) keeps only
    the input channels `channel_indices`, in that order: (out, k, *K). Its bias and every other tensor are
    unchanged."""
    sliced = dict(state_dict)
    weights = state_dict[f"{convolution[0]}.weight"][:, list(channel_indices)].clone()
    for name in convolution:
        sliced[f"{name}.weight"] = weights
    return sliced


def locate_modality_dropout_start(plans: dict, configuration: str, fold, dataset_json: dict, results_folder: str,
                                  resolved: dict) -> TeacherCheckpoint:
    """The modality-dropout model a student (plans, configuration, fold; `resolved` its configuration) starts from
    when its setting `start_from` is "modality_dropout": ModalityDropoutTrainer's checkpoint_final.pth of the same
    dataset, plans and fold (a model trained on the student's validation cases would leak them), on the
    configuration the student's inherits from, checked as a teacher is (checked_multi_channel_model)."""
    trainer = METHODS["moddrop"].trainer
    role = f"modality-dropout start of {plans['dataset_name']} {configuration} fold {fold}"
    base = plans["configurations"][configuration].get("inherits_from")
    if not results_folder:
        raise TeacherError(f"{role}: set nnUNet_results, where the {trainer} model folder is looked for")
    checkpoint = os.path.join(results_folder, plans["dataset_name"],
                              convert_trainer_plans_config_to_identifier(trainer, plans["plans_name"], base),
                              f"fold_{fold}", "checkpoint_final.pth")
    return checked_multi_channel_model(
        role, checkpoint, f"Train it to the end first (nnUNetv2_train {plans['dataset_name']} {base} {fold} -tr "
                          f"{trainer}), or start from random weights (start_from=random, the papers')",
        plans, fold, dataset_json, resolved)


def start_from_modality_dropout(network: nn.Module, start: TeacherCheckpoint, channel_name: str,
                                input_shape: tuple) -> None:
    """Loads into a one-channel student `network` (input (1, 1, *S) of `input_shape` reaches its first
    convolution) the weights of the modality-dropout model `start`, its first convolution sliced to the student's
    channel `channel_name`: the student starts as the modality-dropout model fed that channel alone. A network of
    another architecture is refused (TeacherError naming the checkpoint)."""
    channels = [start.dataset_json["channel_names"][str(i)] for i in range(len(start.channel_indices))]
    convolution = first_convolution(network, input_shape)
    weights = sliced_state_dict(start.network_weights, convolution, [channels.index(channel_name)])
    try:
        network.load_state_dict(weights)
    except RuntimeError as exc:  # torch's message lists the missing, unexpected and mis-shaped tensors
        raise TeacherError(f"{start.checkpoint_path}: its network is not the student's architecture, so the "
                           f"student cannot start from it: {str(exc).splitlines()[0]}") from None
