"""The distillation losses under autocast at a BraTS-size patch.

On CUDA nnU-Net runs every training step under autocast (float16); CPU autocast with float16 or bfloat16 is the
stand-in here (it casts the same matmul-like ops). Inputs are shaped like nnU-Net's default BraTS plans:
3d_fullres patch 112x160x128, batch 2, 32 full-resolution decoder features, a 320-channel bottleneck.
"""
import pytest
import torch
import torch.nn.functional as F

from nnunet_protokd.training.losses import (
    bottleneck_kl_loss,
    cross_modal_kd_loss,
    ground_truth_class_masks,
    pixelwise_kd_loss,
    prototype_kd_loss,
    soft_label_kd_loss,
)

BRATS_PATCH = (112, 160, 128)
BATCH = 2
AUTOCAST_DTYPES = [torch.float16, torch.bfloat16]
# Relative difference allowed between the loss of half-precision network outputs (what autocast produces)
# and the float32 loss of the same outputs before rounding: the rounding of the inputs (float16: 11-bit,
# bfloat16: 8-bit significand) is all that remains once the losses run in float32. Measured at this size (largest
# of the eight losses, bottleneck_kl): 1.4e-5 (float16) and 9.0e-5 (bfloat16); the tolerances leave a margin.
INPUT_ROUNDING_TOLERANCE = {torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.fixture(scope="module")
def brats_size():
    """Student/teacher outputs and features of one BraTS-size batch, with a spherical tumour (WT ⊃ TC ⊃ ET)."""
    generator = torch.Generator().manual_seed(0)

    def features(channels, shape=BRATS_PATCH):
        # decoder features come out of a LeakyReLU: mostly positive, so a sum over voxels grows with their count
        return F.leaky_relu(torch.randn(BATCH, channels, *shape, generator=generator), 0.01)

    centre = [torch.arange(n, dtype=torch.float32) - n / 2 for n in BRATS_PATCH]
    radius = (centre[0].view(-1, 1, 1) ** 2 + centre[1].view(1, -1, 1) ** 2 + centre[2].view(1, 1, -1) ** 2).sqrt()
    regions = torch.stack([radius < 40, radius < 20, (radius < 20) & (radius > 12)]).to(torch.uint8)
    labels = (regions.sum(0, keepdim=True) + (radius > 12) * regions[1]).clamp(max=3)  # 0 bg, 1-3 disjoint
    available = torch.tensor([[True, True, False, True], [False, True, True, True]])
    return {
        "student_features": features(32), "teacher_features": features(32),
        "region_masks": ground_truth_class_masks(regions.expand(BATCH, -1, -1, -1, -1), True, 3),
        "label_masks": ground_truth_class_masks(labels.expand(BATCH, -1, -1, -1, -1), False, 4),
        "student_regions": torch.randn(BATCH, 3, *BRATS_PATCH, generator=generator) * 4,
        "teacher_regions": torch.randn(BATCH, 3, *BRATS_PATCH, generator=generator) * 4,
        "student_labels": torch.randn(BATCH, 4, *BRATS_PATCH, generator=generator) * 4,
        "teacher_labels": torch.randn(BATCH, 4, *BRATS_PATCH, generator=generator) * 4,
        "student_bottleneck": features(320, (7, 5, 4)), "teacher_bottleneck": features(320, (7, 5, 4)),
        "modality_bottlenecks": features(4 * 320, (7, 5, 4)).view(BATCH, 4, 320, 7, 5, 4), "available": available,
    }


LOSSES = {
    "pixelwise_kd, regions": lambda x: pixelwise_kd_loss(x["student_regions"], x["teacher_regions"], 10.0, True),
    "pixelwise_kd, labels": lambda x: pixelwise_kd_loss(x["student_labels"], x["teacher_labels"], 10.0, False),
    "prototype_kd, regions": lambda x: prototype_kd_loss(x["student_features"], x["teacher_features"],
                                                         x["region_masks"]),
    "prototype_kd, labels, intra-class": lambda x: prototype_kd_loss(x["student_features"], x["teacher_features"],
                                                                     x["label_masks"], intra_class_only=True),
    "soft_label_kd, regions": lambda x: soft_label_kd_loss(x["student_regions"], x["teacher_regions"], 5.0, True),
    "soft_label_kd, labels": lambda x: soft_label_kd_loss(x["student_labels"], x["teacher_labels"], 5.0, False),
    "bottleneck_kl": lambda x: bottleneck_kl_loss(x["student_bottleneck"], x["teacher_bottleneck"]),
    "cross_modal_kd": lambda x: cross_modal_kd_loss(x["modality_bottlenecks"], x["available"], [1, 3]),
}
NETWORK_OUTPUTS = ("student_features", "teacher_features", "student_regions", "teacher_regions", "student_labels",
                   "teacher_labels", "student_bottleneck", "teacher_bottleneck", "modality_bottlenecks")


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("name", LOSSES)
def test_loss_is_computed_in_float32_under_autocast(brats_size, name, dtype):
    """Float32 inputs give the float32 value under autocast: nothing inside the loss drops to half precision
    (before the fix, prototype_kd under float16 autocast summed 2 million voxels in float16 and returned NaN)."""
    reference = LOSSES[name](brats_size)
    with torch.autocast("cpu", dtype=dtype):
        value = LOSSES[name](brats_size)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("name", LOSSES)
def test_loss_of_half_precision_outputs_is_close_to_float32(brats_size, name, dtype):
    """Under autocast the network's outputs arrive in half precision; the loss of those outputs stays within
    the input rounding of its float32 value."""
    reference = LOSSES[name](brats_size)
    rounded = {k: v.to(dtype) if k in NETWORK_OUTPUTS else v for k, v in brats_size.items()}
    with torch.autocast("cpu", dtype=dtype):
        value = LOSSES[name](rounded)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    torch.testing.assert_close(value, reference, rtol=INPUT_ROUNDING_TOLERANCE[dtype], atol=1e-7)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_losses_of_large_half_precision_outputs_stay_finite_at_brats_size(brats_size, dtype):
    """Half-precision decoder features and logits of large magnitude (|z| up to ~4000: their sums over the 2.3
    million voxels of a patch overflow float16 a hundred times over), as autocast hands them to the losses: the
    values and the student's gradients are finite. The reductions run in float32 chunks, without a full-size
    float32 copy of the features (tests/test_losses.py checks the copy and the chunked values)."""
    generator = torch.Generator().manual_seed(1)
    student = (brats_size["student_features"] * 1000).to(dtype).requires_grad_()
    teacher = (brats_size["teacher_features"] * 1000).to(dtype)
    logits = (torch.randn(BATCH, 3, *BRATS_PATCH, generator=generator) * 100).to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        proto = prototype_kd_loss(student, teacher, brats_size["region_masks"])
        kd = pixelwise_kd_loss(logits, brats_size["teacher_regions"].to(dtype), 10.0, True) \
            + soft_label_kd_loss(logits, brats_size["teacher_regions"].to(dtype), 5.0, True)
    # scaled as GradScaler's first step scales the loss: a float16 gradient per voxel of a mean over 2.3 million
    # voxels underflows otherwise (GradScaler's business, not the loss's)
    ((proto + kd) * 2.0 ** 16).backward()
    assert proto.dtype == torch.float32 and torch.isfinite(proto) and proto > 0 and torch.isfinite(kd)
    for gradient in (student.grad, logits.grad):
        assert torch.isfinite(gradient).all() and gradient.float().abs().sum() > 0
