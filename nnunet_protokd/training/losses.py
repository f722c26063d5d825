"""Distillation losses as pure functions of tensors.

Shapes: N batch items, K classes (or R regions), C feature channels, S... spatial axes (2D or 3D), V voxels
(the product of S). "Region-based" means nnU-Net's sigmoid outputs, one channel per (possibly overlapping) region;
otherwise the outputs are softmax logits over mutually exclusive labels, background included.

Every public loss runs with autocast switched off (`without_autocast`) and computes in float32: nnU-Net trains under
CUDA autocast, which would otherwise run the matmuls below in float16 whatever `.float()` was called before them,
and a sum over the ~2 million voxels of a BraTS patch overflows float16 (max 65504). Inputs at full resolution
(logits, decoder features, masks) are not cast whole: every reduction over voxels runs chunk by chunk
(`summed_over_voxel_chunks`), each chunk cast to float32 and its sums accumulated in float32, so that no
full-size float32 copy of a network's output exists (a 112x160x128 patch, batch 2, 32 decoder channels: 0.59 GB
per copy) and the gradients are those of the unchunked float32 computation. ProtoKD's two terms write their
gradient out (autograd Functions whose backward runs chunk by chunk too): autograd through the chunks would either
keep their float32 intermediates or, for half-precision inputs, recompute every chunk's forward in backward. Their
per-chunk work is a named kernel function (`_summed_kl_chunk`, `_kl_gradient_chunk`, `_map_pass_chunk`,
`_prototype_gradient_chunk`), run as it is or compiled (`chunk_kernel`).
"""
from __future__ import annotations

import functools
import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# voxels of each item in one chunk, by device type. CUDA: 2^17 (a float32 chunk of 32 channels of a batch of 2 is
# 32 MB; on a GPU the chunked reductions are launch-bound, measured on an H200: fewer chunks, not smaller ones). CPU:
# 2^15 (8 MB): at BraTS size (2x32x96x160x160) ProtoKD's prototype term took 2.3 s forward+backward on bfloat16
# inputs in chunks of 2^17 voxels, 1.7 s in chunks of 2^16 and 0.6 s in chunks of 2^15 (float32: 0.81, 0.58, 0.56 s;
# 2-core CPU, one process, medians of 4): blocks of tens of MB, allocated and freed for every chunk, come fresh
# from the operating system each time, smaller ones are reused
VOXELS_PER_CHUNK = {"cuda": 2 ** 17, "cpu": 2 ** 15}


def voxels_per_chunk(tensor: torch.Tensor) -> int:
    """The default chunk size (voxels per item) for reductions over `tensor`'s voxels, by its device type."""
    return VOXELS_PER_CHUNK.get(tensor.device.type, VOXELS_PER_CHUNK["cuda"])


def without_autocast(loss):
    """Runs `loss` with autocast disabled on the device of its first tensor argument, so that its reductions and
    matmuls run in the float32 it casts to (full-size inputs chunk by chunk: summed_over_voxel_chunks). Gradients
    flow back through the casts to the network's (float16/bfloat16) outputs. The hand-written backward passes below
    run under it too."""
    @functools.wraps(loss)
    def full_precision_loss(*args, **kwargs):
        device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type, enabled=False):
            return loss(*args, **kwargs)
    return full_precision_loss


@functools.cache
def _compiled(kernel):
    return torch.compile(kernel, dynamic=False)


def chunk_kernel(kernel, compile_kernels: bool):
    """`kernel` (a function of one chunk of voxels) itself, or torch.compile's version of it (one per process and
    kernel; every chunk has the same shape but the last, so each is compiled for two shapes).

    Why compile: a chunk's float32 work is a dozen elementwise passes and small matmuls over the same voxels,
    each reading and writing the whole chunk (on CUDA, each one kernel launch); compiled, the elementwise passes
    fuse into a few loops (CPU) or kernels (CUDA). ProtoKDTrainer compiles its kernels exactly when it compiles
    the networks (nnU-Net's choice: CUDA and nnUNet_compile), which needs the same tools (a C++ compiler on CPU,
    Triton on CUDA). The values are those of the eager kernel within float32 rounding."""
    return _compiled(kernel) if compile_kernels else kernel


def voxel_chunks(voxel_tensors, chunk_voxels: int | None = None) -> list[tuple]:
    """(N, X, V) tensors (e.g. features flattened over S) cut along V into chunks of chunk_voxels voxels (default:
    voxels_per_chunk of the first tensor; V in one chunk when V <= chunk_voxels): a list of tuples, one chunk of
    every tensor each. Views, no copies; one torch.split per tensor, whose backward puts the chunks' gradients (from
    every pass over them) together once."""
    chunk_voxels = chunk_voxels or voxels_per_chunk(voxel_tensors[0])
    return list(zip(*(torch.split(t, chunk_voxels, dim=-1) for t in voxel_tensors)))


def _split_like(tensor: torch.Tensor, chunks: list) -> tuple:
    """`tensor` (N, X, V) cut along V as `chunks` (voxel_chunks) are: views to write a chunk's result into."""
    return tensor.split([chunk[0].shape[-1] for chunk in chunks], dim=-1)


def summed_over_voxel_chunks(per_chunk, chunks: list, shared=()) -> tuple:
    """sum over chunks j of per_chunk(*chunks[j], *shared), accumulated in float32.

    Args:
        per_chunk: maps one chunk of the voxel tensors (in their own dtype; it casts them to float32) and the shared
            tensors to a tuple of float32 tensors whose shapes do not depend on the chunk (sums over its voxels).
        chunks: voxel_chunks of the (N, X, V) tensors.
        shared: small tensors every chunk gets whole (e.g. prototypes); gradients reach them too.
    Returns:
        the tuple of sums. Where more than one chunk casts a tensor that needs a gradient from half precision to
        float32, each chunk is checkpointed: its float32 copies and intermediates are freed after its forward pass
        and recomputed chunk by chunk in the backward pass, so that no full-size float32 copy of the half-precision
        tensor exists at any time (float32 inputs need no copy, and are not recomputed). The gradients are those of
        the unchunked computation either way.
    """
    recompute = len(chunks) > 1 and torch.is_grad_enabled() and \
        any(t.requires_grad and t.dtype != torch.float32 for t in chunks[0])
    totals = None
    for chunk in chunks:
        sums = checkpoint(per_chunk, *chunk, *shared, use_reentrant=False, preserve_rng_state=False) \
            if recompute else per_chunk(*chunk, *shared)
        totals = sums if totals is None else tuple(total + s for total, s in zip(totals, sums))
    return totals


def _log_sigmoid(logits: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|)) elementwise, a new float32 tensor; no autograd graph needed.

    F.logsigmoid's value, finite for every finite x and within float32 rounding of it (absolute error below 1e-6;
    where exp(-|x|) is under float32's epsilon the log term rounds to 0, an absolute error of at most 6e-8). Why
    not F.logsigmoid: on CPU it also fills the buffer its own backward would use and is not vectorised, 1.0 ms per
    chunk of 2x3x2^15 float32 voxels against 0.18 ms for these five passes (log1p is as slow; log of 1 + u is not)."""
    return logits.clamp_max(0.0) - logits.abs().neg_().exp_().add_(1.0).log_()


def _bernoulli_or_softmax_kl(student: torch.Tensor, teacher: torch.Tensor, region_based: bool) -> torch.Tensor:
    """Elementwise KL(teacher || student) of float32 logits (N, K, ...): per-region Bernoulli KL
    p log(p/q) + (1-p) log((1-p)/(1-q)), or the softmax KL's terms. Forward only: _SummedKL writes the gradient.

    With p = sigmoid(t), q = sigmoid(s) and log(1-p) = log p - t, the Bernoulli KL is
    log p - log q + (1-p)(s - t) = logsigmoid(t) - logsigmoid(s) + sigmoid(-t)(s - t): stable for any logits, and
    two transcendental passes over the teacher and one over the student instead of six (its gradient in s is
    q - p)."""
    if region_based:
        return _log_sigmoid(teacher) - _log_sigmoid(student) + torch.sigmoid(-teacher) * (student - teacher)
    log_p, log_q = F.log_softmax(teacher, dim=1), F.log_softmax(student, dim=1)
    return log_p.exp() * (log_p - log_q)


@without_autocast
def pixelwise_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                      region_based: bool, chunk_voxels: int | None = None,
                      compile_kernels: bool = False) -> torch.Tensor:
    """ProtoKD Eq. (1): KL(teacher || student) of temperature-softened predictions.

    Args:
        student_logits, teacher_logits: (N, K, *S) raw network outputs, any floating dtype.
        temperature: T > 0; both logits are divided by T before the softmax/sigmoid.
        region_based: softmax over K classes (False) or an independent Bernoulli per region channel (True).
        chunk_voxels: voxels per float32 chunk (summed_over_voxel_chunks); the value does not depend on it.
        compile_kernels: run the per-chunk work through torch.compile (chunk_kernel).
    Returns:
        float32 scalar, the KL divergence averaged over all N*K*S elements (the mean reduction of the authors'
        code; for softmax this is the per-voxel KL divided by K). No T^2 factor. The teacher is detached:
        gradients reach the student only.
    """
    total = _SummedKL.apply(student_logits.flatten(2), teacher_logits.detach().flatten(2), temperature, region_based,
                            chunk_voxels, compile_kernels)
    return total / student_logits.numel()


def _summed_kl_chunk(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                     region_based: bool) -> torch.Tensor:
    """Kernel: float32 sum of the elementwise KL(teacher || student) of one chunk of logits (N, K, v), each / T."""
    return _bernoulli_or_softmax_kl(student.float() / temperature, teacher.float() / temperature, region_based).sum()


def _kl_gradient_chunk(student: torch.Tensor, teacher: torch.Tensor, temperature: float, region_based: bool,
                       scale: torch.Tensor) -> torch.Tensor:
    """Kernel: the KL sum's gradient in one chunk of the student's logits, (q - p) * scale in their dtype."""
    softened_student, softened_teacher = student.float() / temperature, teacher.float() / temperature
    if region_based:
        difference = torch.sigmoid(softened_student) - torch.sigmoid(softened_teacher)
    else:
        difference = torch.softmax(softened_student, dim=1) - torch.softmax(softened_teacher, dim=1)
    return (difference * scale).to(student.dtype)


class _SummedKL(torch.autograd.Function):
    """forward(student (N, K, V), teacher (N, K, V) detached, temperature, region_based, chunk_voxels,
    compile_kernels): the float32 sum of the elementwise KL(teacher || student) of the logits divided by the
    temperature, chunk by chunk.

    Its gradient in the student's logits is (q - p) / T elementwise (q, p: the student's and the teacher's
    softened softmax or sigmoid), computed chunk by chunk in backward from the two logits alone: nothing computed
    in forward is kept, and no chunk's KL is recomputed (autograd through half-precision chunks would have to)."""

    @staticmethod
    def forward(ctx, student, teacher, temperature: float, region_based: bool, chunk_voxels: int | None,
                compile_kernels: bool):
        summed_kl = chunk_kernel(_summed_kl_chunk, compile_kernels)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for student_chunk, teacher_chunk in voxel_chunks((student, teacher), chunk_voxels):
            total += summed_kl(student_chunk, teacher_chunk, temperature, region_based)
        ctx.save_for_backward(student, teacher)
        ctx.arguments = temperature, region_based, chunk_voxels, compile_kernels
        return total

    @staticmethod
    @without_autocast
    def backward(ctx, grad_total):
        student, teacher = ctx.saved_tensors
        temperature, region_based, chunk_voxels, compile_kernels = ctx.arguments
        kl_gradient = chunk_kernel(_kl_gradient_chunk, compile_kernels)
        grad = torch.empty_like(student)
        scale = grad_total.float() / temperature
        chunks = voxel_chunks((student, teacher), chunk_voxels)
        for (student_chunk, teacher_chunk), grad_chunk in zip(chunks, _split_like(grad, chunks)):
            grad_chunk.copy_(kl_gradient(student_chunk, teacher_chunk, temperature, region_based, scale))
        return grad, None, None, None, None, None


def disjoint_region_classes(regions) -> tuple[list[tuple], list[tuple]]:
    """The disjoint classes into which nnU-Net's (nested or overlapping) regions cut a dataset's labels.

    Labels contained in the same regions form one class; the background (label 0, in no region) comes first, the
    others follow in the order of their smallest label. For BraTS's regions WT {1,2,3} ⊃ TC {2,3} ⊃ ET {3} these are
    background, WT-TC (oedema), TC-ET (necrosis) and ET: the four classes of ProtoKD's authors; BraTS 2024's resection
    cavity, a region {4} outside WT, adds a fifth.

    Args:
        regions: the dataset's regions in output-channel order (nnU-Net's LabelManager.foreground_regions), each a
            label or a sequence of labels.
    Returns:
        (classes, membership): classes[k] the labels of class k; membership[k][r] whether class k lies in region r.
    """
    region_sets = [{int(label) for label in np.atleast_1d(region)} for region in regions]
    groups = {}
    for label in sorted({0}.union(*region_sets)):
        groups.setdefault(tuple(label in region for region in region_sets), []).append(label)
    return [tuple(labels) for labels in groups.values()], list(groups)


def ground_truth_class_masks(target: torch.Tensor, region_based: bool, num_classes: int,
                             region_membership=None) -> torch.Tensor:
    """The voxel sets whose feature means are the prototypes of Eq. (2), from the ground truth.

    Args:
        target: label-based (N, 1, *S) integer labels 0..num_classes-1; region-based (N, R, *S) binary region
            maps as nnU-Net's data loader produces them.
        num_classes: label-based only: number of labels including background.
        region_membership: region-based only: membership[k][r] of disjoint classes (disjoint_region_classes);
            None for the regions themselves as classes.
    Returns:
        (N, K, *S) float masks. Label-based: K = num_classes one-hot masks. Region-based with region_membership: one
        disjoint mask per class, a voxel in class k when the regions containing it are exactly class k's.
        Region-based without: K = R + 1, background (no region) first, then each region as its own foreground
        class; regions may overlap.
    """
    if region_based and region_membership is not None:
        # each voxel's set of regions as a bit code, compared with each class's code
        code = torch.zeros_like(target[:, 0], dtype=torch.int32)
        for r in range(target.shape[1]):
            code |= (target[:, r] > 0).int() << r
        class_codes = torch.tensor([sum(int(inside) << r for r, inside in enumerate(member))
                                    for member in region_membership], dtype=torch.int32, device=target.device)
        return (code.unsqueeze(1) == class_codes.view(1, -1, *[1] * (code.ndim - 1))).float()
    if region_based:
        regions = target.float()
        background = 1.0 - regions.amax(dim=1, keepdim=True)
        return torch.cat((background, regions), dim=1)
    labels = target[:, 0].long()
    return F.one_hot(labels, num_classes).movedim(-1, 1).float()


def _masked_sums(features: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chunk: sums (N, K, C) of the feature vectors of each class's voxels and counts (N, K) of those voxels,
    from features (N, C, v) and masks (N, K, v). One batched matmul, in float32."""
    masks = masks.float()
    # (C, v) x (v, K), then the small result transposed: the gradient reaches the features as a contiguous (N, C, v)
    # block, not as a transposed one that every later addition would have to stride through
    return torch.bmm(features.float(), masks.transpose(1, 2)).transpose(1, 2), masks.sum(dim=2)


def _prototypes_and_counts(chunks: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (2) from voxel_chunks of (features (N, C, V), masks (N, K, V)): prototypes (N, K, C), counts (N, K)."""
    sums, counts = summed_over_voxel_chunks(_masked_sums, chunks)
    return sums / counts.clamp_min(1.0).unsqueeze(2), counts


@without_autocast
def class_prototypes(features: torch.Tensor, masks: torch.Tensor,
                     chunk_voxels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ProtoKD Eq. (2): c_k = mean of the feature vectors z_i of the voxels i in class k, per batch item.

    Args:
        features: (N, C, *S) feature maps.
        masks: (N, K, *S) class masks at the same resolution (see ground_truth_class_masks).
        chunk_voxels: voxels per float32 chunk of the masked sums (summed_over_voxel_chunks).
    Returns:
        prototypes (N, K, C) float32, zero for absent classes; present (N, K) bool, True where class k has voxels
        in item n. No division by zero.
    """
    prototypes, counts = _prototypes_and_counts(voxel_chunks((features.flatten(2), masks.flatten(2)), chunk_voxels))
    return prototypes, counts > 0


def _cosine_maps(features: torch.Tensor, unit_prototypes: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (3) on flat features (N, C, v) and unit-length prototypes (N, K, C): (N, K, v) float32 cosines, and the
    feature norms (N, 1, v) they were divided by.

    <c_k, z_i> / max(|z_i|, eps), the cosine with the feature vector normalised as F.normalize does, computed
    without a normalised copy of the C-channel features: the chunk's squares are a temporary, summed at once, and
    only K-channel and one-channel tensors are kept for backward."""
    features = features.float()
    norms = _feature_norms(features, eps)
    return torch.bmm(unit_prototypes, features) / norms, norms


def _feature_norms(features: torch.Tensor, eps: float) -> torch.Tensor:
    """max(|z_i|, eps) of float32 flat features (N, C, v): (N, 1, v).

    Computed as sqrt(max(|z|^2, eps^2)): the same value, and a zero gradient below eps as with clamp_min after the
    norm; summing squares over C is about twice as fast as linalg.vector_norm over a non-innermost axis, forward
    and backward (measured on CPU: 60 -> 37 ms per chunk of 2 x 32 x 2^17)."""
    return (features * features).sum(dim=1, keepdim=True).clamp_min(eps * eps).sqrt()


def _map_pass_chunk(features: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, unit_student: torch.Tensor,
                    unit_teacher: torch.Tensor, eps: float, intra_class_only: bool, keep: bool) -> tuple:
    """Kernel: one chunk of Eqs. (3)-(4) and what backward needs of it (_SquaredMapDifferences).

    Args: the chunk's flat features (N, Cs, v) and teacher features (N, Ct, v), any dtype; its masks (N, K, v);
    the unit prototypes (N, K, Cs) and (N, K, Ct). Returns float32 (summed squared differences (N, K), then, with
    `keep`, w (N, K, v), a (N, K, v) and the chunk's sums of w z (N, K, Cs); else None for these three)."""
    features = features.float()  # once: the weighted sums below read it too
    maps, norm = _cosine_maps(features, unit_student, eps)
    difference = maps - _cosine_maps(teacher, unit_teacher, eps)[0]
    squared = difference.square()
    summed = (squared * mask.float()).sum(2) if intra_class_only else squared.sum(2)
    if not keep:
        return summed, None, None, None
    weight = (difference * mask.float() if intra_class_only else difference) / norm
    along_weight = weight * maps / norm * (norm > eps)
    return summed, weight, along_weight, torch.bmm(weight, features.transpose(1, 2))


def _prototype_gradient_chunk(features: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                              along_weight: torch.Tensor, slope: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """Kernel: dL/dz for one chunk of the student's features (N, Cs, v), in their dtype (_SquaredMapDifferences).

    `features * -along` is float32 whatever the features' dtype (type promotion), without a cast of its own."""
    along = (slope * along_weight).sum(1, keepdim=True)  # (N, 1, v)
    coefficients = torch.cat((slope * weight, mask.float()), dim=1)  # [2 g w; m] (N, 2K, v)
    return torch.baddbmm(features * -along, linear, coefficients).to(features.dtype)


class _SquaredMapDifferences(torch.autograd.Function):
    """The prototype term's reductions over voxels, Eqs. (2)-(4), with its gradient written out.

    forward(student (N, Cs, V), teacher (N, Ct, V) detached, masks (N, K, V), intra_class_only, chunk_voxels, eps,
    compile_kernels) -> (summed (N, K): sum over voxels of (M_k^s(i) - M_k^t(i))^2, times the mask of k with
    intra_class_only; counts (N, K): voxels per class), float32, computed in chunks of voxels cast to float32.

    Autograd through the chunks would keep float32 copies of the student's features (or, to avoid them,
    recompute every chunk's forward in backward: both networks' maps again). The gradient needs much less. With
    g_k the upstream gradient of summed_k, w_k(i) = (M_k^s(i) - M_k^t(i)) [m_k(i)] / |z_i| (the mask with
    intra_class_only) and the cosine maps M_k^s(i) = <c_k, z_i> / |z_i| of the unit prototypes c_k,
        dL/dz_i = sum_k 2 g_k w_k(i) c_k - z_i sum_k 2 g_k a_k(i)  +  sum_k m_k(i) dL/dp_k / n_k,
    with a_k(i) = w_k(i) M_k^s(i) / |z_i| (0 where |z_i| <= eps, the norm clamped, as in autograd),
    dL/dc_k = 2 g_k sum_i w_k(i) z_i, dL/dp_k through c_k = p_k / max(|p_k|, eps), and n_k the voxels of class k
    (p_k = its mean feature, Eq. 2). Only g depends on the upstream gradient, so the forward's pass over the maps,
    which has each chunk in float32 anyway, also keeps w and a ((N, K, V) float32 each, 2K/Cs the size of a
    float32 copy of the features) and the (N, K, Cs) sums of w z: backward is one pass over the student's chunks,
    writing dL/dz into the gradient in the features' dtype. Under torch.no_grad nothing is kept.
    """

    @staticmethod
    def forward(ctx, student, teacher, masks, intra_class_only: bool, chunk_voxels: int | None, eps: float,
                compile_kernels: bool):
        chunks = voxel_chunks((student, teacher, masks), chunk_voxels)
        student_prototypes, counts = _prototypes_and_counts([(features, mask) for features, _, mask in chunks])
        teacher_prototypes, _ = _prototypes_and_counts([(features, mask) for _, features, mask in chunks])
        unit_student = F.normalize(student_prototypes, dim=2, eps=eps)
        unit_teacher = F.normalize(teacher_prototypes, dim=2, eps=eps)
        map_pass = chunk_kernel(_map_pass_chunk, compile_kernels)
        keep = ctx.needs_input_grad[0]
        summed = torch.zeros(masks.shape[:2], dtype=torch.float32, device=student.device)
        if keep:
            weights, along_weights = (torch.empty(masks.shape, dtype=torch.float32, device=student.device)
                                      for _ in range(2))
            weighted_feature_sums = torch.zeros_like(unit_student)
            kept = zip(_split_like(weights, chunks), _split_like(along_weights, chunks))
        else:
            kept = itertools.repeat((None, None))
        for (features, teacher_chunk, mask), (weight_chunk, along_weight_chunk) in zip(chunks, kept):
            sums, weight, along_weight, weighted = map_pass(features, teacher_chunk, mask, unit_student,
                                                            unit_teacher, eps, intra_class_only, keep)
            summed += sums
            if keep:
                weight_chunk.copy_(weight)
                along_weight_chunk.copy_(along_weight)
                weighted_feature_sums += weighted
        if keep:
            ctx.save_for_backward(student, masks, weights, along_weights, weighted_feature_sums, student_prototypes,
                                  unit_student, counts)
        ctx.chunk_voxels, ctx.eps, ctx.compile_kernels = chunk_voxels, eps, compile_kernels
        ctx.mark_non_differentiable(counts)
        return summed, counts

    @staticmethod
    @without_autocast
    def backward(ctx, grad_summed, _grad_counts):
        student, masks, weights, along_weights, weighted_feature_sums, prototypes, unit, counts = ctx.saved_tensors
        slope = 2.0 * grad_summed.float().unsqueeze(2)  # d summed_k / d difference_k(i) = 2 difference_k(i)
        grad_unit = slope * weighted_feature_sums
        lengths = prototypes.norm(dim=2, keepdim=True)
        radial = (unit * grad_unit).sum(2, keepdim=True)
        grad_prototypes = torch.where(lengths > ctx.eps, (grad_unit - unit * radial) / lengths, grad_unit / ctx.eps)
        # one matmul per chunk for both linear parts: [c_k | dL/dp_k / n_k] (N, C, 2K) x [2 g w; m] (N, 2K, v)
        linear = torch.cat((unit, grad_prototypes / counts.clamp_min(1.0).unsqueeze(2)), dim=1).transpose(1, 2)
        prototype_gradient = chunk_kernel(_prototype_gradient_chunk, ctx.compile_kernels)
        grad = torch.empty_like(student)
        chunks = voxel_chunks((student, masks, weights, along_weights), ctx.chunk_voxels)
        for (features, mask, weight, along_weight), grad_chunk in zip(chunks, _split_like(grad, chunks)):
            grad_chunk.copy_(prototype_gradient(features, mask, weight, along_weight, slope, linear))
        return grad, None, None, None, None, None, None


@without_autocast
def prototype_similarity_maps(features: torch.Tensor, prototypes: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """ProtoKD Eq. (3): M_k(i) = cos(z_i, c_k) for every voxel i and class k (the I2FV maps).

    Args:
        features: (N, C, *S); prototypes: (N, K, C).
    Returns:
        (N, K, *S) float32 cosine similarities in [-1, 1]; 0 where a feature vector or prototype is all zeros.
        (prototype_kd_loss reduces these maps chunk by chunk and never holds them whole.)
    """
    maps, _ = _cosine_maps(features.flatten(2), F.normalize(prototypes.float(), dim=2, eps=eps), eps)
    return maps.view(maps.shape[:2] + features.shape[2:])


@without_autocast
def prototype_kd_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, masks: torch.Tensor,
                      intra_class_only: bool = False, class_presence: str = "item",
                      chunk_voxels: int | None = None, compile_kernels: bool = False) -> torch.Tensor:
    """ProtoKD Eq. (4): mean squared difference of the student's and the teacher's I2FV maps.

    Each network's maps use its own features and its own prototypes (Eq. 2) over the same ground-truth masks;
    cosine similarity makes them comparable whatever the two channel counts are.

    Args:
        student_features: (N, Cs, *S); teacher_features: (N, Ct, *S), Cs and Ct may differ; any floating dtype.
        masks: (N, K, *S) ground-truth class masks (ground_truth_class_masks).
        intra_class_only: keep only M_k(i) with voxel i in class k (Table 3 ablation); by default all voxels,
            i.e. intra- and inter-class similarities.
        class_presence: "item": class k counts for item n when item n has voxels of k; "batch": only when every
            item of the batch has (the authors' code, which then averages over all items, classes and voxels).
        chunk_voxels: voxels per float32 chunk: two passes over the voxels, the prototypes' sums, then the maps'
            squared differences summed per (item, class) with what backward needs; one in backward
            (_SquaredMapDifferences).
        compile_kernels: run the per-chunk work of the maps through torch.compile (chunk_kernel).
    Returns:
        float32 scalar: the squared differences averaged over voxels and over the (item, class) pairs that count
        (absent classes contribute nothing; with intra_class_only, over the voxels of each class). 0 if no
        class counts anywhere. The teacher is detached: gradients reach the student only.
    """
    if class_presence not in ("item", "batch"):
        raise ValueError(f"class_presence must be 'item' or 'batch', got {class_presence!r}")
    eps = 1e-8  # prototype_similarity_maps' default
    summed, counts = _SquaredMapDifferences.apply(student_features.flatten(2), teacher_features.detach().flatten(2),
                                                  masks.flatten(2), intra_class_only, chunk_voxels, eps,
                                                  compile_kernels)
    present = counts > 0
    if class_presence == "batch":
        present = present.all(dim=0, keepdim=True).expand_as(present)
    per_class = summed / (counts.clamp_min(1.0) if intra_class_only else masks[0, 0].numel())
    weights = present.float()
    return (per_class * weights).sum() / weights.sum().clamp_min(1.0)


def _dice_sums(probabilities: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chunk of (N, K, v) float32 values: sum(p r) and sum(p) + sum(r) over the voxels, each (N, K)."""
    return (probabilities * reference).sum(2), probabilities.sum(2) + reference.sum(2)


def _one_minus_dice(intersection: torch.Tensor, denominator: torch.Tensor, eps: float) -> torch.Tensor:
    return 1.0 - ((2.0 * intersection + eps) / (denominator + eps)).mean()


@without_autocast
def soft_dice_loss(probabilities: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5,
                   chunk_voxels: int | None = None) -> torch.Tensor:
    """1 - soft Dice of probabilities against a (soft or hard) reference, per item and channel.

    Args:
        probabilities, reference: (N, K, *S) values in [0, 1].
    Returns:
        float32 scalar: 1 - mean over N*K of (2 sum(p r) + eps) / (sum(p) + sum(r) + eps), sums over S (in
        float32 chunks of chunk_voxels voxels).
    """
    def sums(p, r):
        return _dice_sums(p.float(), r.float())
    return _one_minus_dice(*summed_over_voxel_chunks(sums, voxel_chunks((probabilities.flatten(2),
                                                                         reference.flatten(2)), chunk_voxels)), eps)


@without_autocast
def soft_label_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                       region_based: bool, soften_student: bool = False,
                       chunk_voxels: int | None = None) -> torch.Tensor:
    """KD-Net's L_KD, Eq. (2) (Hu et al., MICCAI 2020; the L_KD of L = lambda L_KD + (1-lambda) L_GT + alpha L_KL).

    (1 - soft Dice) between the teacher's prediction softened by T, sigma(f_t / T), and the student's unsoftened
    prediction sigma(f_s), plus the cross-entropy of the student's logits against the teacher's hard prediction.
    Softmax outputs: the Dice term skips the background channel (as nnU-Net's Dice does), the hard prediction is
    the teacher's argmax and the cross-entropy is averaged over voxels. Region outputs: sigmoid per region, the
    hard prediction is sigmoid(teacher) > 0.5, binary cross-entropy averaged over all elements.

    Args:
        student_logits, teacher_logits: (N, K, *S), any floating dtype.
        soften_student: divide the student's logits by T too in the Dice term (plugin 0.1.0's reading).
        chunk_voxels: voxels per float32 chunk; one pass gives the Dice sums and the cross-entropy's sum.
    Returns:
        float32 scalar. The teacher is detached: gradients reach the student only.
    """
    def dice_and_cross_entropy_sums(student, teacher):
        student, teacher = student.float(), teacher.float()
        student_for_dice = student / temperature if soften_student else student
        if region_based:
            sums = _dice_sums(torch.sigmoid(student_for_dice), torch.sigmoid(teacher / temperature))
            cross_entropy = F.binary_cross_entropy_with_logits(student, (teacher > 0).float(), reduction="sum")
        else:
            sums = _dice_sums(F.softmax(student_for_dice, dim=1)[:, 1:], F.softmax(teacher / temperature, dim=1)[:, 1:])
            cross_entropy = F.cross_entropy(student, teacher.argmax(dim=1), reduction="sum")
        return (*sums, cross_entropy)

    intersection, denominator, cross_entropy = summed_over_voxel_chunks(
        dice_and_cross_entropy_sums, voxel_chunks((student_logits.flatten(2), teacher_logits.detach().flatten(2)),
                                                  chunk_voxels))
    averaged_over = student_logits.numel() if region_based else student_logits.numel() // student_logits.shape[1]
    return _one_minus_dice(intersection, denominator, 1e-5) + cross_entropy / averaged_over


@without_autocast
def bottleneck_kl_loss(student_bottleneck: torch.Tensor, teacher_bottleneck: torch.Tensor,
                       reduction: str = "sum") -> torch.Tensor:
    """KD-Net's L_KL, Eq. (3): KL(teacher || student) between the bottleneck features of each batch item, flattened
    and normalised by a softmax over all their C*S elements.

    Not chunked: the softmax spans each item's whole bottleneck, which is small (BraTS plans: 320x7x5x4 per item,
    0.18 MB in float32).

    Args:
        student_bottleneck, teacher_bottleneck: (N, C, *S) of identical shapes (KD-Net's teacher and student
            share the architecture apart from the input channels).
        reduction: "sum": the KL of an item's distributions (summed over its C*S elements), the paper's reading;
            "mean": that sum divided by C*S, a term about C*S times smaller. Both are averaged over the N items.
    Returns:
        float32 scalar. The teacher is detached.
    Raises:
        ValueError if the shapes differ.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if student_bottleneck.shape != teacher_bottleneck.shape:
        raise ValueError(f"bottleneck shapes differ: student {tuple(student_bottleneck.shape)}, teacher "
                         f"{tuple(teacher_bottleneck.shape)}; KD-Net needs a teacher with the student's architecture")
    log_p = F.log_softmax(teacher_bottleneck.detach().float().flatten(1), dim=1)
    log_q = F.log_softmax(student_bottleneck.float().flatten(1), dim=1)
    per_element = log_p.exp() * (log_p - log_q)
    return (per_element.sum(dim=1) if reduction == "sum" else per_element.mean(dim=1)).mean()


@without_autocast
def cross_modal_kd_loss(bottlenecks: torch.Tensor, available: torch.Tensor, teacher_modalities,
                        pair_reduction: str = "sum") -> torch.Tensor:
    """LCKD's cross-modal distillation: L1 distance from each elected teacher modality's bottleneck features
    (detached) to those of every other modality available in the same batch item.

    Args:
        bottlenecks: (N, M, C, *S) the shared encoder's bottleneck features of each of the M modalities of each
            item, before fusion; entries of unavailable modalities are never read (they may hold anything).
        available: (N, M) bool, which modalities each item has.
        teacher_modalities: indices (into M) of the elected teachers, the union over tasks.
        pair_reduction: how the (teacher, student) pairs combine, student != teacher. "sum" (the authors' code):
            for each pair the mean absolute difference over the C*S elements of the items that have both (with a
            subset drawn per batch: nn.L1Loss over the batch), summed over the pairs. "mean" (plugin 0.1.0): the
            mean absolute difference averaged over all (item, pair) combinations present.
    Returns:
        float32 scalar; 0 when there is no pair (e.g. the items' teachers are missing). Gradients reach the
        students only. Not chunked: bottlenecks are small (BraTS plans: 320x7x5x4 per item and modality).
    """
    if pair_reduction not in ("sum", "mean"):
        raise ValueError(f"pair_reduction must be 'sum' or 'mean', got {pair_reduction!r}")
    # which pairs exist is decided on the host (one copy at most), so that no step waits on the device
    available_on_host = available.detach().cpu()
    available = available.to(bottlenecks.device)
    total = bottlenecks.new_zeros((), dtype=torch.float32)
    pairs = 0
    for teacher in sorted(set(int(t) for t in teacher_modalities)):
        target = bottlenecks[:, teacher].detach().float()
        for student in range(bottlenecks.shape[1]):
            items_with_pair = int((available_on_host[:, teacher] & available_on_host[:, student]).sum())
            if student == teacher or items_with_pair == 0:
                continue
            present = available[:, teacher] & available[:, student]
            distance = (bottlenecks[:, student].float() - target).abs().flatten(1).mean(dim=1)
            summed = torch.where(present, distance, torch.zeros_like(distance)).sum()
            if pair_reduction == "sum":
                total = total + summed / items_with_pair
            else:
                total = total + summed
                pairs += items_with_pair
    return total if pair_reduction == "sum" else total / max(pairs, 1)
