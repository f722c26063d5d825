"""Distillation losses as pure functions of tensors.

Shapes: N batch items, K classes (or R regions), C feature channels, S... spatial axes (2D or 3D).
"Region-based" means nnU-Net's sigmoid outputs, one channel per (possibly overlapping) region; otherwise
the outputs are softmax logits over mutually exclusive labels, background included.

Every public loss runs with autocast switched off and its inputs cast to float32 (`in_float32`): nnU-Net
trains under CUDA autocast, which would otherwise run the matmuls below in float16 whatever `.float()` was
called before them, and a sum over the ~2 million voxels of a BraTS patch overflows float16 (max 65504).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def in_float32(loss):
    """Runs `loss` with autocast disabled on the device of its first tensor argument and every floating-point
    tensor argument cast to float32, so that reductions and matmuls are float32 under any autocast. Gradients
    flow back through the casts to the network's (float16/bfloat16) outputs."""
    @functools.wraps(loss)
    def full_precision_loss(*args, **kwargs):
        def cast(value):
            return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type, enabled=False):
            return loss(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
    return full_precision_loss


@in_float32
def pixelwise_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                      region_based: bool) -> torch.Tensor:
    """ProtoKD Eq. (1): KL(teacher || student) of temperature-softened predictions.

    Args:
        student_logits, teacher_logits: (N, K, *S) raw network outputs.
        temperature: T > 0; both logits are divided by T before the softmax/sigmoid.
        region_based: softmax over K classes (False) or an independent Bernoulli per region channel (True).
    Returns:
        scalar, the KL divergence averaged over all N*K*S elements (the mean reduction of the authors'
        code; for softmax this is the per-voxel KL divided by K). No T^2 factor. The teacher is detached:
        gradients reach the student only.
    """
    student = student_logits.float() / temperature
    teacher = teacher_logits.detach().float() / temperature
    if region_based:
        # per-region Bernoulli KL: p log(p/q) + (1-p) log((1-p)/(1-q)), written with log-sigmoids for stability
        log_p, log_not_p = F.logsigmoid(teacher), F.logsigmoid(-teacher)
        log_q, log_not_q = F.logsigmoid(student), F.logsigmoid(-student)
        kl = log_p.exp() * (log_p - log_q) + log_not_p.exp() * (log_not_p - log_not_q)
    else:
        log_p, log_q = F.log_softmax(teacher, dim=1), F.log_softmax(student, dim=1)
        kl = log_p.exp() * (log_p - log_q)
    return kl.mean()


def ground_truth_class_masks(target: torch.Tensor, region_based: bool, num_classes: int) -> torch.Tensor:
    """The voxel sets whose feature means are the prototypes of Eq. (2), from the ground truth.

    Args:
        target: label-based (N, 1, *S) integer labels 0..num_classes-1; region-based (N, R, *S) binary region
            maps as nnU-Net's data loader produces them.
        num_classes: label-based only: number of labels including background.
    Returns:
        (N, K, *S) float masks. Label-based: K = num_classes one-hot masks. Region-based: K = R + 1, background
        (no region) first, then each region as its own foreground class; regions may overlap.
    """
    if region_based:
        regions = target.float()
        background = 1.0 - regions.amax(dim=1, keepdim=True)
        return torch.cat((background, regions), dim=1)
    labels = target[:, 0].long()
    return F.one_hot(labels, num_classes).movedim(-1, 1).float()


@in_float32
def class_prototypes(features: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ProtoKD Eq. (2): c_k = mean of the feature vectors z_i of the voxels i in class k, per batch item.

    Args:
        features: (N, C, *S) feature maps.
        masks: (N, K, *S) class masks at the same resolution (see ground_truth_class_masks).
    Returns:
        prototypes (N, K, C), zero for absent classes; present (N, K) bool, True where class k has voxels in
        item n. One batched matmul; no division by zero.
    """
    flat_features = features.float().flatten(2)  # (N, C, V)
    flat_masks = masks.float().flatten(2)  # (N, K, V)
    counts = flat_masks.sum(dim=2)  # (N, K)
    sums = torch.bmm(flat_masks, flat_features.transpose(1, 2))  # (N, K, C)
    prototypes = sums / counts.clamp_min(1.0).unsqueeze(2)
    return prototypes, counts > 0


@in_float32
def prototype_similarity_maps(features: torch.Tensor, prototypes: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """ProtoKD Eq. (3): M_k(i) = cos(z_i, c_k) for every voxel i and class k (the I2FV maps).

    Args:
        features: (N, C, *S); prototypes: (N, K, C).
    Returns:
        (N, K, *S) cosine similarities in [-1, 1]; 0 where a feature vector or prototype is all zeros.
    """
    unit_features = F.normalize(features.float().flatten(2), dim=1, eps=eps)  # (N, C, V)
    unit_prototypes = F.normalize(prototypes.float(), dim=2, eps=eps)  # (N, K, C)
    maps = torch.bmm(unit_prototypes, unit_features)  # (N, K, V)
    return maps.view(maps.shape[:2] + features.shape[2:])


@in_float32
def prototype_kd_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, masks: torch.Tensor,
                      intra_class_only: bool = False) -> torch.Tensor:
    """ProtoKD Eq. (4): mean squared difference of the student's and the teacher's I2FV maps.

    Each network's maps use its own features and its own prototypes (Eq. 2) over the same ground-truth masks;
    cosine similarity makes them comparable whatever the two channel counts are.

    Args:
        student_features: (N, Cs, *S); teacher_features: (N, Ct, *S), Cs and Ct may differ.
        masks: (N, K, *S) ground-truth class masks (ground_truth_class_masks).
        intra_class_only: keep only M_k(i) with voxel i in class k (Table 3 ablation); by default all voxels,
            i.e. intra- and inter-class similarities.
    Returns:
        scalar: the squared differences averaged over voxels and over the classes present in each item
        (absent classes contribute nothing; with intra_class_only, over the voxels of each class). 0 if no
        class is present anywhere. The teacher is detached: gradients reach the student only.
    """
    teacher_features = teacher_features.detach()
    student_prototypes, present = class_prototypes(student_features, masks)
    teacher_prototypes, _ = class_prototypes(teacher_features, masks)
    squared = (prototype_similarity_maps(student_features, student_prototypes)
               - prototype_similarity_maps(teacher_features, teacher_prototypes)).square().flatten(2)  # (N, K, V)
    if intra_class_only:
        flat_masks = masks.float().flatten(2)
        per_class = (squared * flat_masks).sum(2) / flat_masks.sum(2).clamp_min(1.0)
    else:
        per_class = squared.mean(2)
    weights = present.float()
    return (per_class * weights).sum() / weights.sum().clamp_min(1.0)


@in_float32
def soft_dice_loss(probabilities: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - soft Dice of probabilities against a (soft or hard) reference, per item and channel.

    Args:
        probabilities, reference: (N, K, *S) values in [0, 1].
    Returns:
        scalar: 1 - mean over N*K of (2 sum(p r) + eps) / (sum(p) + sum(r) + eps), sums over S.
    """
    axes = tuple(range(2, probabilities.ndim))
    intersection = (probabilities * reference).sum(axes)
    denominator = probabilities.sum(axes) + reference.sum(axes)
    return 1.0 - ((2.0 * intersection + eps) / (denominator + eps)).mean()


@in_float32
def soft_label_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                       region_based: bool) -> torch.Tensor:
    """KD-Net's L_KD (Hu et al., MICCAI 2020; the L_KD term of L = lambda L_KD + (1-lambda) L_GT + alpha L_KL).

    (1 - soft Dice) between the student's and the teacher's predictions both softened by T, plus the
    cross-entropy of the student's plain logits against the teacher's hard prediction. Softmax outputs: the
    Dice term skips the background channel (as nnU-Net's Dice does), the hard prediction is the teacher's
    argmax and the cross-entropy is averaged over voxels. Region outputs: sigmoid per region, the hard
    prediction is sigmoid(teacher) > 0.5, binary cross-entropy averaged over all elements.

    Args:
        student_logits, teacher_logits: (N, K, *S).
    Returns:
        scalar. The teacher is detached: gradients reach the student only.
    """
    student = student_logits.float()
    teacher = teacher_logits.detach().float()
    if region_based:
        dice = soft_dice_loss(torch.sigmoid(student / temperature), torch.sigmoid(teacher / temperature))
        cross_entropy = F.binary_cross_entropy_with_logits(student, (teacher > 0).float())
    else:
        dice = soft_dice_loss(F.softmax(student / temperature, dim=1)[:, 1:],
                              F.softmax(teacher / temperature, dim=1)[:, 1:])
        cross_entropy = F.cross_entropy(student, teacher.argmax(dim=1))
    return dice + cross_entropy


@in_float32
def bottleneck_kl_loss(student_bottleneck: torch.Tensor, teacher_bottleneck: torch.Tensor) -> torch.Tensor:
    """KD-Net's L_KL: KL(teacher || student) between the bottleneck features of each batch item, flattened and
    normalised by a softmax over all their C*S elements.

    Args:
        student_bottleneck, teacher_bottleneck: (N, C, *S) of identical shapes (KD-Net's teacher and student
            share the architecture apart from the input channels).
    Returns:
        scalar: the KL summed over the elements of an item, averaged over the N items. The teacher is detached.
    Raises:
        ValueError if the shapes differ.
    """
    if student_bottleneck.shape != teacher_bottleneck.shape:
        raise ValueError(f"bottleneck shapes differ: student {tuple(student_bottleneck.shape)}, teacher "
                         f"{tuple(teacher_bottleneck.shape)}; KD-Net needs a teacher with the student's architecture")
    log_p = F.log_softmax(teacher_bottleneck.detach().float().flatten(1), dim=1)
    log_q = F.log_softmax(student_bottleneck.float().flatten(1), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


@in_float32
def cross_modal_kd_loss(bottlenecks: torch.Tensor, available: torch.Tensor, teacher_modalities) -> torch.Tensor:
    """LCKD's cross-modal distillation: L1 distance from each elected teacher modality's bottleneck features
    (detached) to those of every other modality available in the same batch item.

    Args:
        bottlenecks: (N, M, C, *S) the shared encoder's bottleneck features of each of the M modalities of each
            item, before fusion; entries of unavailable modalities are never read (they may hold anything).
        available: (N, M) bool, which modalities each item has.
        teacher_modalities: indices (into M) of the elected teachers, the union over tasks.
    Returns:
        scalar: the mean absolute difference over the C*S elements of a (teacher, student) pair, averaged over
        all pairs present in the batch (teacher and student both available, student != teacher); 0 when there
        is no such pair (e.g. the items' teachers are missing). Gradients reach the students only.
    """
    # which pairs exist is decided on the host (one copy at most), so that no step waits on the device
    available_on_host = available.detach().cpu()
    available = available.to(bottlenecks.device)
    total = bottlenecks.new_zeros((), dtype=torch.float32)
    pairs = 0
    for teacher in sorted(set(int(t) for t in teacher_modalities)):
        target = bottlenecks[:, teacher].detach().float()
        for student in range(bottlenecks.shape[1]):
            pairs_in_batch = int((available_on_host[:, teacher] & available_on_host[:, student]).sum())
            if student == teacher or pairs_in_batch == 0:
                continue
            present = available[:, teacher] & available[:, student]
            distance = (bottlenecks[:, student].float() - target).abs().flatten(1).mean(dim=1)
            total = total + torch.where(present, distance, torch.zeros_like(distance)).sum()
            pairs += pairs_in_batch
    return total / max(pairs, 1)
