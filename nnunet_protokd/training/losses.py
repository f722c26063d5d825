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

import numpy as np
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
                      intra_class_only: bool = False, class_presence: str = "item") -> torch.Tensor:
    """ProtoKD Eq. (4): mean squared difference of the student's and the teacher's I2FV maps.

    Each network's maps use its own features and its own prototypes (Eq. 2) over the same ground-truth masks;
    cosine similarity makes them comparable whatever the two channel counts are.

    Args:
        student_features: (N, Cs, *S); teacher_features: (N, Ct, *S), Cs and Ct may differ.
        masks: (N, K, *S) ground-truth class masks (ground_truth_class_masks).
        intra_class_only: keep only M_k(i) with voxel i in class k (Table 3 ablation); by default all voxels,
            i.e. intra- and inter-class similarities.
        class_presence: "item": class k counts for item n when item n has voxels of k; "batch": only when every
            item of the batch has (the authors' code, which then averages over all items, classes and voxels).
    Returns:
        scalar: the squared differences averaged over voxels and over the (item, class) pairs that count
        (absent classes contribute nothing; with intra_class_only, over the voxels of each class). 0 if no
        class counts anywhere. The teacher is detached: gradients reach the student only.
    """
    if class_presence not in ("item", "batch"):
        raise ValueError(f"class_presence must be 'item' or 'batch', got {class_presence!r}")
    teacher_features = teacher_features.detach()
    student_prototypes, present = class_prototypes(student_features, masks)
    if class_presence == "batch":
        present = present.all(dim=0, keepdim=True).expand_as(present)
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
                       region_based: bool, soften_student: bool = False) -> torch.Tensor:
    """KD-Net's L_KD, Eq. (2) (Hu et al., MICCAI 2020; the L_KD of L = lambda L_KD + (1-lambda) L_GT + alpha L_KL).

    (1 - soft Dice) between the teacher's prediction softened by T, sigma(f_t / T), and the student's unsoftened
    prediction sigma(f_s), plus the cross-entropy of the student's logits against the teacher's hard prediction.
    Softmax outputs: the Dice term skips the background channel (as nnU-Net's Dice does), the hard prediction is
    the teacher's argmax and the cross-entropy is averaged over voxels. Region outputs: sigmoid per region, the
    hard prediction is sigmoid(teacher) > 0.5, binary cross-entropy averaged over all elements.

    Args:
        student_logits, teacher_logits: (N, K, *S).
        soften_student: divide the student's logits by T too in the Dice term (plugin 0.1.0's reading).
    Returns:
        scalar. The teacher is detached: gradients reach the student only.
    """
    student = student_logits.float()
    teacher = teacher_logits.detach().float()
    student_for_dice = student / temperature if soften_student else student
    if region_based:
        dice = soft_dice_loss(torch.sigmoid(student_for_dice), torch.sigmoid(teacher / temperature))
        cross_entropy = F.binary_cross_entropy_with_logits(student, (teacher > 0).float())
    else:
        dice = soft_dice_loss(F.softmax(student_for_dice, dim=1)[:, 1:], F.softmax(teacher / temperature, dim=1)[:, 1:])
        cross_entropy = F.cross_entropy(student, teacher.argmax(dim=1))
    return dice + cross_entropy


@in_float32
def bottleneck_kl_loss(student_bottleneck: torch.Tensor, teacher_bottleneck: torch.Tensor,
                       reduction: str = "sum") -> torch.Tensor:
    """KD-Net's L_KL, Eq. (3): KL(teacher || student) between the bottleneck features of each batch item, flattened
    and normalised by a softmax over all their C*S elements.

    Args:
        student_bottleneck, teacher_bottleneck: (N, C, *S) of identical shapes (KD-Net's teacher and student
            share the architecture apart from the input channels).
        reduction: "sum": the KL of an item's distributions (summed over its C*S elements), the paper's reading;
            "mean": that sum divided by C*S, a term about C*S times smaller. Both are averaged over the N items.
    Returns:
        scalar. The teacher is detached.
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


@in_float32
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
        scalar; 0 when there is no pair (e.g. the items' teachers are missing). Gradients reach the students only.
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
