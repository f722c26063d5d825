"""Capturing intermediate features of nnU-Net's U-Nets in the forward pass that computes the logits."""
from __future__ import annotations

from contextlib import contextmanager

import torch


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The plain network inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if isinstance(network, torch.nn.parallel.DistributedDataParallel):
            network = network.module
        elif hasattr(network, "_orig_mod"):  # torch.compile's OptimizedModule
            network = network._orig_mod
        else:
            return network


@contextmanager
def compiled_submodules_plain(root: torch.nn.Module):
    """Within the block, every torch.compile'd submodule of `root` is the plain module it wraps; restored after.

    nnU-Net compiles its Dice loss with the network (`loss.dc = torch.compile(loss.dc)` in _build_loss), so a pass
    that must not run a compiled graph (the per-term gradient probe: one backward per term over a retained graph,
    which a compiled backward refuses when it donates buffers, and otherwise gets wrong) swaps them out here."""
    swapped = [(parent, name, child) for parent in root.modules() for name, child in parent.named_children()
               if hasattr(child, "_orig_mod")]
    for parent, name, child in swapped:
        setattr(parent, name, child._orig_mod)
    try:
        yield root
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


FEATURES = ("bottleneck", "decoder")  # what FeatureCapture can keep


class FeatureCapture:
    """Forward hooks on a dynamic_network_architectures U-Net (PlainConvUNet, ResidualEncoderUNet, ...).

    While `recording()` is active, each forward pass stores into the yielded dict those of `names` (default both):
      "bottleneck": output of encoder.stages[-1], (N, C_bottleneck, *S_bottleneck);
      "decoder":    output of decoder.stages[-1], the last decoder features at full resolution, before the
                    1x1 segmentation head, (N, C_0, *S).
    Keep only what a loss uses: under no_grad (a teacher) a kept feature map outlives the forward that would have
    freed it (the decoder features at BraTS size: 0.6 GiB in float32).
    The hooks stay registered (torch.compile does not have to re-trace when they come and go) but keep
    nothing outside `recording()`, so no activation outlives the step that produced it. `remove()` detaches
    them; the object is also a context manager that does so on exit.
    """

    def __init__(self, network: torch.nn.Module, names: tuple = FEATURES):
        unknown = set(names) - set(FEATURES)
        if unknown:
            raise ValueError(f"FeatureCapture keeps {FEATURES}, not {sorted(unknown)}")
        unet = unwrap(network)
        try:
            modules = {"bottleneck": unet.encoder.stages[-1], "decoder": unet.decoder.stages[-1]}
        except (AttributeError, IndexError, TypeError):
            raise TypeError(f"cannot capture features of {type(unet).__name__}: expected a "
                            f"dynamic_network_architectures U-Net with encoder.stages and decoder.stages") from None
        self._store = None
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in names]

    def _hook(self, name):
        def keep_output(module, inputs, output):
            if self._store is not None:
                self._store[name] = output
        return keep_output

    @contextmanager
    def recording(self):
        features = {}
        self._store = features
        try:
            yield features
        finally:
            self._store = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
