"""LCKD (Wang et al., MICCAI 2023): one network for every non-empty subset of the modalities.

The network (`ModalityFusionUNet`) is nnU-Net's U-Net for the configuration's plans, built for one input channel:
its encoder is shared by the modalities and applied to each available one separately (modalities folded into the
batch axis); missing ones are not encoded at all, so whatever their input holds cannot reach the output. At every
encoder level the features are fused before nnU-Net's decoder, in one of two ways (the setting `fusion`):
"slots" (the authors' code): one slot per modality, a missing modality's slot filled with the mean of the
available ones, the slots concatenated in modality order and brought back to the level's width by a 1x1
convolution block, so the decoder knows which modality is which; "mean": the average of the available modalities.
A model folder for a subset (`write_subset_model_folder`) shares the trained weights and declares fewer channels;
its network puts each of its input channels into that channel's slot of the trained model.

Training (trainers/LCKDTrainer.py) elects, per task, the modality with the best single-modality Dice on
held-out *training* cases (`single_modality_dice`, `elect_teachers`) and distils the teachers' bottleneck
features to the other available modalities (losses.cross_modal_kd_loss).
"""
from __future__ import annotations

import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer
import torch
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from nnunet_protokd.channels import with_input_channel_check
from nnunet_protokd.plans import method_settings
from nnunet_protokd.settings import SETTINGS_KEY

FUSIONS = ("slots", "mean")


class ModalityFusionUNet(nn.Module):
    """A dynamic_network_architectures U-Net whose one-channel encoder is applied to each available modality
    and whose skips are fused over the modalities before the decoder.

    Args:
        unet: nnU-Net's U-Net built for one input channel; its encoder and decoder are used.
        fusion: "slots" (a slot per modality, missing slots filled with the mean of the available modalities,
            concatenated, then a 1x1 convolution, normalisation and nonlinearity back to the level's width, one
            block per level in `fusion_blocks`) or "mean" (the average of the available modalities; no weights).
        num_modalities: M, the modalities the model was trained with (the slots).
        input_slots: the slot of each input channel (default 0..M-1); a subset model folder gives the trained
            channels its files hold, e.g. (1, 3) for T1ce and FLAIR of BraTS.

    forward(x, available=None):
        x: (N, K, *S), one channel per input modality (K = len(input_slots)).
        available: (N, K) or (K,) bool, which inputs each item has (default: all). Best kept on the host:
            the encoder's batch is assembled from it there.
    Returns nnU-Net's output: logits (N, classes, *S), or with deep supervision the list of them, largest first.
    `encoder.stages[-1]` outputs the bottleneck of each encoded (item, modality), in row-major order of
    `available`; `per_modality` lays those out as (N, K, ...).
    """

    def __init__(self, unet: nn.Module, fusion: str = "slots", num_modalities: int = 1, input_slots=None):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.encoder = unet.encoder
        self.decoder = unet.decoder
        self.fusion = fusion
        self.num_modalities = num_modalities
        self.input_slots = tuple(range(num_modalities)) if input_slots is None else tuple(int(s) for s in input_slots)
        if len(set(self.input_slots)) != len(self.input_slots) or \
                not all(0 <= slot < num_modalities for slot in self.input_slots):
            raise ValueError(f"input slots {self.input_slots} are not distinct modalities among {num_modalities}")
        self.fusion_blocks = None
        if fusion == "slots":
            encoder = self.encoder
            self.fusion_blocks = nn.ModuleList(
                ConvDropoutNormReLU(encoder.conv_op, num_modalities * width, width, 1, 1, encoder.conv_bias,
                                    encoder.norm_op, encoder.norm_op_kwargs, encoder.dropout_op,
                                    encoder.dropout_op_kwargs, encoder.nonlin, encoder.nonlin_kwargs)
                for width in encoder.output_channels)
            self.fusion_blocks.apply(InitWeights_He(1e-2))  # nnU-Net's initialisation of its U-Nets

    def forward(self, x: torch.Tensor, available: torch.Tensor | None = None):
        num_items, num_inputs = x.shape[:2]
        available_on_host = available_modalities(available, num_items, num_inputs)
        encoded = available_on_host.reshape(-1).nonzero().squeeze(1)
        owner = (encoded // num_inputs).to(x.device, non_blocking=True)
        counts = available_on_host.sum(dim=1).to(x.device, non_blocking=True)
        images = x.reshape(num_items * num_inputs, 1, *x.shape[2:])[encoded.to(x.device, non_blocking=True)]
        slot = None
        if self.fusion == "slots":  # row of each encoded (item, input) among the (item, slot) rows
            slots_of_inputs = torch.tensor(self.input_slots)
            slot = (encoded // num_inputs * self.num_modalities + slots_of_inputs[encoded % num_inputs]).to(x.device)
        fused = []
        for level, skip in enumerate(self.encoder(images)):
            summed = skip.new_zeros((num_items,) + skip.shape[1:]).index_add_(0, owner, skip)
            mean = summed / counts.to(skip.dtype).view(-1, *[1] * (skip.ndim - 1))
            if self.fusion == "mean":
                fused.append(mean)
                continue
            filled = mean.unsqueeze(1).expand(num_items, self.num_modalities, *skip.shape[1:])
            filled = filled.reshape(num_items * self.num_modalities, *skip.shape[1:]).index_copy(0, slot, skip)
            fused.append(self.fusion_blocks[level](filled.view(num_items, -1, *skip.shape[2:])))
        return self.decoder(fused)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        trained_with_slots = any(key.startswith("fusion_blocks.") for key in state_dict)
        if strict and trained_with_slots != (self.fusion == "slots"):
            trained = "slots" if trained_with_slots else "mean"
            raise RuntimeError(
                f"these LCKD weights were trained with {trained!r} fusion but the model folder's plans.json asks for "
                f"{self.fusion!r} (LCKD models of nnunet-protokd 0.1.0 used 'mean' fusion and did not record it): "
                f"in plans.json, under the configuration's \"{SETTINGS_KEY}\", set \"LCKDTrainer\": "
                f"{{\"fusion\": \"{trained}\"}}")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @staticmethod
    def per_modality(encoded_features: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """(P, C, *S) features of the encoded (item, modality) pairs -> (N, M, C, *S), zeros where unavailable."""
        available_on_host = available.detach().cpu().bool()
        num_items, num_modalities = available_on_host.shape
        encoded = available_on_host.reshape(-1).nonzero().squeeze(1).to(encoded_features.device)
        dense = encoded_features.new_zeros((num_items * num_modalities,) + encoded_features.shape[1:])
        dense = dense.index_copy(0, encoded, encoded_features)
        return dense.view(num_items, num_modalities, *encoded_features.shape[1:])


def available_modalities(available, num_items: int, num_modalities: int) -> torch.Tensor:
    """`available` as an (N, M) bool tensor on the host; every item needs at least one modality."""
    if available is None:
        return torch.ones((num_items, num_modalities), dtype=torch.bool)
    available = torch.as_tensor(available).detach().cpu().bool()
    if available.shape[-1] != num_modalities:
        raise ValueError(f"availability mask of shape {tuple(available.shape)} for {num_modalities} modalities")
    available = available.expand(num_items, num_modalities)
    if not bool(available.any(dim=1).all()):
        raise ValueError("every batch item needs at least one available modality")
    return available


def build_fusion_network(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                         enable_deep_supervision: bool = True) -> nn.Module:
    """nnU-Net's network of the plans with one input channel, as a ModalityFusionUNet of `num_input_channels`
    modalities (the channels the model folder declares; prediction with other files fails with a clear error).

    The fusion comes from the configuration's LCKDTrainer settings (LCKDTrainer records them all in the model
    folder's plans.json). The plans of a subset model folder (ChannelSubset.plans) name the trained channels its
    inputs are, and keep one per-channel intensity entry for every trained channel: that count is the number of
    slots."""
    unet = nnunet_trainer.nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, 1,
                                                                   num_output_channels, enable_deep_supervision)
    plans = plans_manager.plans
    input_slots = plans.get(SETTINGS_KEY, {}).get("source_channel_indices")
    num_modalities = num_input_channels if input_slots is None else \
        len(plans["foreground_intensity_properties_per_channel"])
    fusion = method_settings(configuration_manager.configuration, "LCKDTrainer")["fusion"]
    network = ModalityFusionUNet(unet, fusion, num_modalities, input_slots)
    return with_input_channel_check(network, num_input_channels, plans,
                                    " To predict from fewer modalities, write a model folder for them with "
                                    "`nnunet-protokd lckd-subset -d DATASET -c CONFIGURATION -m MODALITY ...`.")


class FixedSubsetNetwork(nn.Module):
    """The fusion network with one fixed set of available modalities, called like a plain network (x -> logits)
    by nnU-Net's predictor; x keeps every channel and the unavailable ones are ignored."""

    def __init__(self, network: ModalityFusionUNet, available: torch.Tensor):
        super().__init__()
        self.network = network
        self.available = available.bool().cpu()

    def forward(self, x):
        return self.network(x, self.available.expand(x.shape[0], -1))
