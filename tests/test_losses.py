"""The distillation losses against slow, obviously correct references written here with loops and numpy."""
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nnunet_protokd.training import losses
from nnunet_protokd.training.losses import (
    bottleneck_kl_loss,
    class_prototypes,
    disjoint_region_classes,
    ground_truth_class_masks,
    pixelwise_kd_loss,
    prototype_kd_loss,
    prototype_similarity_maps,
    soft_label_kd_loss,
)

SHAPES = [(2, 3, (5, 6)), (3, 4, (4, 5, 6)), (1, 2, (3, 3, 3))]  # (N, K, spatial)


def reference_kd(student, teacher, temperature, region_based):
    s, t = student.double().numpy() / temperature, teacher.double().numpy() / temperature
    n_items, n_classes = s.shape[:2]
    s, t = s.reshape(n_items, n_classes, -1), t.reshape(n_items, n_classes, -1)
    total, count = 0.0, 0
    for n in range(n_items):
        for v in range(s.shape[2]):
            if region_based:
                for k in range(n_classes):
                    p, q = 1 / (1 + math.exp(-t[n, k, v])), 1 / (1 + math.exp(-s[n, k, v]))
                    total += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
                    count += 1
            else:
                p = np.exp(t[n, :, v]) / np.exp(t[n, :, v]).sum()
                q = np.exp(s[n, :, v]) / np.exp(s[n, :, v]).sum()
                total += float(np.sum(p * np.log(p / q)))
                count += n_classes
    return total / count


def reference_maps(features, mask):
    """Prototype of one class of one item and the cosine map of every voxel to it."""
    vectors = features.reshape(features.shape[0], -1).T  # (V, C)
    prototype = vectors[mask.reshape(-1) > 0].mean(axis=0)
    maps = np.zeros(len(vectors))
    for v, z in enumerate(vectors):
        norms = np.linalg.norm(z) * np.linalg.norm(prototype)
        maps[v] = z @ prototype / norms if norms > 0 else 0.0
    return maps


def reference_proto(student, teacher, masks, intra_class_only, class_presence="item"):
    """Eq. (4); "batch": as the authors' prototype_loss, a class only if every item has it, then the mean over
    items, those classes and voxels."""
    student, teacher, masks = student.double().numpy(), teacher.double().numpy(), masks.double().numpy()
    per_class = []
    for n in range(masks.shape[0]):
        for k in range(masks.shape[1]):
            if masks[n, k].sum() == 0:
                continue  # class absent from this item
            if class_presence == "batch" and any(masks[m, k].sum() == 0 for m in range(masks.shape[0])):
                continue  # class absent from another item of the batch
            diff = (reference_maps(student[n], masks[n, k]) - reference_maps(teacher[n], masks[n, k])) ** 2
            if intra_class_only:
                diff = diff[masks[n, k].reshape(-1) > 0]
            per_class.append(diff.mean())
    return float(np.mean(per_class)) if per_class else 0.0


def random_labels(rng, n_items, n_classes, spatial):
    labels = torch.from_numpy(rng.integers(0, n_classes, size=(n_items, 1, *spatial)))
    labels[0][labels[0] == n_classes - 1] = 0  # the last class is absent from item 0
    if n_items > 2:
        labels[-1] = 0  # an item with background only
    return labels


def nested_regions(labels, n_regions):
    """nnU-Net-style region targets: region r holds labels >= r + 1 (like WT ⊃ TC ⊃ ET)."""
    return torch.cat([(labels >= r + 1) for r in range(n_regions)], dim=1).to(torch.uint8)


@pytest.mark.parametrize("region_based", [False, True])
@pytest.mark.parametrize("n_items, n_classes, spatial", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 10.0])
def test_pixelwise_kd_matches_reference(n_items, n_classes, spatial, temperature, region_based):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(n_items, n_classes, *spatial, generator=generator) * 3
    teacher = torch.randn(n_items, n_classes, *spatial, generator=generator) * 3
    student.requires_grad_()
    loss = pixelwise_kd_loss(student, teacher, temperature, region_based)
    assert loss.item() == pytest.approx(reference_kd(student.detach(), teacher, temperature, region_based),
                                        rel=1e-4, abs=1e-7)
    assert pixelwise_kd_loss(teacher, teacher, temperature, region_based).item() == pytest.approx(0.0, abs=1e-6)
    # the gradient (written out in the loss: (q - p) / T) is autograd's through the float64 textbook KL
    loss.backward()
    leaf = student.detach().double().requires_grad_()
    s_, t = leaf / temperature, teacher.double() / temperature
    if region_based:
        p, q = torch.sigmoid(t), torch.sigmoid(s_)
        textbook = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    else:
        log_p, log_q = torch.log_softmax(t, dim=1), torch.log_softmax(s_, dim=1)
        textbook = log_p.exp() * (log_p - log_q)
    textbook.mean().backward()
    torch.testing.assert_close(student.grad.double(), leaf.grad, rtol=1e-4, atol=1e-9)


def test_region_kd_is_finite_and_exact_at_extreme_logits():
    """Saturated sigmoids (logits of +-30 to +-80, where p or 1-p underflow float32's precision): the Bernoulli KL
    and its gradient stay finite and equal the float64 computation, and identical logits give 0."""
    teacher = torch.tensor([-80.0, -30.0, 0.0, 30.0, 80.0, 80.0, -80.0, 3.0]).view(1, 8, 1, 1)
    student = torch.tensor([80.0, -29.0, 30.0, -30.0, 79.0, -80.0, 80.0, -3.0]).view(1, 8, 1, 1).requires_grad_()
    loss = pixelwise_kd_loss(student, teacher, 1.0, True)
    loss.backward()
    t, s_ = teacher.double(), student.detach().double().requires_grad_()
    p, log_p, log_q = torch.sigmoid(t), torch.nn.functional.logsigmoid(t), torch.nn.functional.logsigmoid(s_)
    expected = (p * (log_p - log_q) + (1 - p) * (torch.nn.functional.logsigmoid(-t)
                                                 - torch.nn.functional.logsigmoid(-s_))).mean()
    expected.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(student.grad.double(), s_.grad, rtol=1e-5, atol=1e-9)
    assert pixelwise_kd_loss(teacher, teacher, 1.0, True).item() == 0.0


@pytest.mark.parametrize("region_based", [False, True])
@pytest.mark.parametrize("n_items, n_classes, spatial", SHAPES)
@pytest.mark.parametrize("intra_class_only", [False, True])
def test_prototype_loss_matches_reference(n_items, n_classes, spatial, region_based, intra_class_only):
    rng = np.random.default_rng(1)
    labels = random_labels(rng, n_items, n_classes, spatial)
    target = nested_regions(labels, n_classes - 1) if region_based else labels
    masks = ground_truth_class_masks(target, region_based, n_classes)
    assert masks.shape == (n_items, n_classes, *spatial)
    # teacher and student with different channel counts: cosine similarity makes them comparable
    student = torch.from_numpy(rng.normal(size=(n_items, 5, *spatial))).float()
    teacher = torch.from_numpy(rng.normal(size=(n_items, 9, *spatial))).float()
    loss = prototype_kd_loss(student, teacher, masks, intra_class_only)
    assert loss.item() == pytest.approx(reference_proto(student, teacher, masks, intra_class_only), rel=1e-4)


def textbook_prototype_loss(student, teacher, masks, intra_class_only=False, class_presence="item"):
    """Eqs. (2)-(4) in float64 with F.normalize, whole tensors: prototypes as masked means, cosine maps, the mean
    squared difference over voxels (with intra_class_only: over each class's voxels) and the (item, class) pairs
    present (class_presence "batch": only classes every item has)."""
    masks, teacher = masks.double().flatten(2), teacher.detach().double().flatten(2)
    student = student.double().flatten(2)
    counts = masks.sum(2)

    def maps(features):
        prototypes = torch.bmm(masks, features.transpose(1, 2)) / counts.clamp_min(1).unsqueeze(2)
        unit_features = torch.nn.functional.normalize(features, dim=1, eps=1e-8)
        return torch.bmm(torch.nn.functional.normalize(prototypes, dim=2, eps=1e-8), unit_features)
    squared = (maps(student) - maps(teacher)).square()
    per_class = (squared * masks).sum(2) / counts.clamp_min(1) if intra_class_only else squared.mean(2)
    present = counts > 0
    if class_presence == "batch":
        present = present.all(dim=0, keepdim=True).expand_as(present)
    return (per_class * present.double()).sum() / present.double().sum()


@pytest.mark.parametrize("intra_class_only, class_presence", [(False, "item"), (True, "item"), (False, "batch")])
def test_prototype_loss_gradient_is_the_textbook_one_also_at_zero_feature_vectors(intra_class_only, class_presence):
    """The student's gradient of Eq. (4) (written out by hand in the loss: _SquaredMapDifferences) equals
    autograd's through the plain float64 formula (F.normalize, no chunks), for every setting of the term, also
    where a feature vector is all zeros (a dead voxel after an activation): finite, not NaN."""
    rng = np.random.default_rng(3)
    labels = random_labels(rng, 2, 4, (6, 7, 5))
    masks = ground_truth_class_masks(nested_regions(labels, 3), True, 4,
                                     disjoint_region_classes([[1, 2, 3], [2, 3], [3]])[1])
    student = torch.from_numpy(rng.normal(size=(2, 6, 6, 7, 5))).float()
    student[0, :, 1, 2] = 0.0  # a row of voxels whose feature vectors are zero
    teacher = torch.from_numpy(rng.normal(size=(2, 8, 6, 7, 5))).float()
    expected_student = student.double().requires_grad_()
    expected = textbook_prototype_loss(expected_student, teacher, masks, intra_class_only, class_presence)
    expected.backward()
    for chunk_voxels in (10 ** 6, 37):  # one chunk, and many
        student_input = student.clone().requires_grad_()
        loss = prototype_kd_loss(student_input, teacher, masks, intra_class_only, class_presence,
                                 chunk_voxels=chunk_voxels)
        loss.backward()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert torch.isfinite(student_input.grad).all()
        torch.testing.assert_close(student_input.grad.double(), expected_student.grad, rtol=1e-4, atol=1e-7)


def label_group_masks(labels, groups):
    """(N, K, *S) masks of label groups, straight from the integer labels."""
    labels = labels[:, 0].numpy()
    return torch.from_numpy(np.stack([np.isin(labels, group) for group in groups], axis=1).astype(np.float32))


def test_disjoint_classes_of_brats_regions_are_the_authors_four():
    # WT {1,2,3} ⊃ TC {2,3} ⊃ ET {3}: background, oedema (WT-TC), necrosis (TC-ET), enhancing tumour (ET)
    classes, membership = disjoint_region_classes([(1, 2, 3), (2, 3), (3,)])
    assert classes == [(0,), (1,), (2,), (3,)]
    assert membership == [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]
    # labels that no region tells apart form one class; overlapping regions that are not nested work too
    assert disjoint_region_classes([(1, 2, 3), (3,)])[0] == [(0,), (1, 2), (3,)]
    assert disjoint_region_classes([[1, 2], [2, 3]])[0] == [(0,), (1,), (2,), (3,)]
    assert disjoint_region_classes([1, 2])[0] == [(0,), (1,), (2,)]  # single-label regions


# (regions in output-channel order, the disjoint label groups they cut the labels 0..3 into, written out by hand)
REGION_SETS = [([(1, 2, 3), (2, 3), (3,)], [(0,), (1,), (2,), (3,)]),
               ([(1, 2, 3), (3,)], [(0,), (1, 2), (3,)]),
               ([(1, 2), (2, 3)], [(0,), (1,), (2,), (3,)])]


@pytest.mark.parametrize("regions, groups", REGION_SETS)
@pytest.mark.parametrize("n_items, spatial", [(2, (5, 6)), (3, (4, 5, 6))])
@pytest.mark.parametrize("class_presence", ["item", "batch"])
def test_prototype_loss_over_disjoint_region_classes_matches_reference(regions, groups, n_items, spatial,
                                                                       class_presence):
    rng = np.random.default_rng(4)
    labels = random_labels(rng, n_items, 4, spatial)  # label 3 absent from item 0; with 3 items one is background
    target = torch.cat([torch.from_numpy(np.isin(labels.numpy(), region)) for region in regions], 1).to(torch.uint8)
    masks = ground_truth_class_masks(target, True, 4, disjoint_region_classes(regions)[1])
    expected_masks = label_group_masks(labels, groups)
    assert torch.equal(masks, expected_masks) and torch.all(masks.sum(1) == 1)  # one class per voxel
    student = torch.from_numpy(rng.normal(size=(n_items, 5, *spatial))).float()
    teacher = torch.from_numpy(rng.normal(size=(n_items, 9, *spatial))).float()
    for intra_class_only in (False, True):
        loss = prototype_kd_loss(student, teacher, masks, intra_class_only, class_presence)
        assert loss.item() == pytest.approx(
            reference_proto(student, teacher, expected_masks, intra_class_only, class_presence), rel=1e-4)


@pytest.mark.parametrize("region_based", [False, True])
@pytest.mark.parametrize("n_items, n_classes, spatial", SHAPES)
def test_batch_class_presence_matches_the_authors_reference(n_items, n_classes, spatial, region_based):
    rng = np.random.default_rng(5)
    labels = random_labels(rng, n_items, n_classes, spatial)
    target = nested_regions(labels, n_classes - 1) if region_based else labels
    masks = ground_truth_class_masks(target, region_based, n_classes)
    student = torch.from_numpy(rng.normal(size=(n_items, 3, *spatial))).float()
    teacher = torch.from_numpy(rng.normal(size=(n_items, 4, *spatial))).float()
    loss = prototype_kd_loss(student, teacher, masks, False, "batch")
    assert loss.item() == pytest.approx(reference_proto(student, teacher, masks, False, "batch"), rel=1e-4, abs=1e-9)
    with pytest.raises(ValueError, match="class_presence must be"):
        prototype_kd_loss(student, teacher, masks, False, "items")


def test_region_masks_put_background_first_and_keep_overlaps():
    labels = torch.tensor([[[0, 1, 2, 3]]])
    masks = ground_truth_class_masks(nested_regions(labels[:, None], 3)[:, :, 0], True, 4)
    assert masks[0].tolist() == [[1, 0, 0, 0], [0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]


def test_prototypes_skip_absent_classes_without_nan():
    features = torch.randn(2, 3, 4, 4)
    masks = torch.zeros(2, 3, 4, 4)
    masks[:, 0] = 1  # background everywhere: classes 1 and 2 absent in both items
    prototypes, present = class_prototypes(features, masks)
    assert present.tolist() == [[True, False, False]] * 2
    assert torch.all(prototypes[:, 1:] == 0) and torch.isfinite(prototypes).all()
    torch.testing.assert_close(prototypes[:, 0], features.mean(dim=(2, 3)))
    loss = prototype_kd_loss(features, torch.randn(2, 6, 4, 4), masks)
    assert torch.isfinite(loss) and loss > 0  # the background-only items still contribute their background term
    assert prototype_kd_loss(features, features, torch.zeros(2, 3, 4, 4)).item() == 0.0


def test_zero_features_give_zero_similarity_not_nan():
    maps = prototype_similarity_maps(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 3))
    assert torch.all(maps == 0)


def test_identical_student_and_teacher_features_give_zero_loss():
    features = torch.randn(2, 4, 3, 3, 3)
    masks = ground_truth_class_masks(torch.randint(0, 3, (2, 1, 3, 3, 3)), False, 3)
    assert prototype_kd_loss(features, features.clone(), masks).item() == pytest.approx(0.0, abs=1e-10)
    # scaling the features changes neither prototypes' directions nor cosine maps
    assert prototype_kd_loss(3 * features, features, masks).item() == pytest.approx(0.0, abs=1e-10)


def assert_gradients_reach_the_student_only(loss, student_tensors, teacher_tensors):
    loss.backward()
    assert all(tensor.grad is None for tensor in teacher_tensors)
    for tensor in student_tensors:
        assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


@pytest.mark.parametrize("region_based", [False, True])
def test_gradients_reach_the_student_only(region_based):
    student_logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher_logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    student_features = torch.randn(2, 5, 4, 4, requires_grad=True)
    teacher_features = torch.randn(2, 7, 4, 4, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 4, 4))
    target = nested_regions(labels, 2) if region_based else labels
    masks = ground_truth_class_masks(target, region_based, 3)
    loss = pixelwise_kd_loss(student_logits, teacher_logits, 10.0, region_based) \
        + prototype_kd_loss(student_features, teacher_features, masks)
    assert_gradients_reach_the_student_only(loss, (student_logits, student_features),
                                            (teacher_logits, teacher_features))


def test_half_precision_inputs_are_computed_in_float32():
    student = torch.randn(1, 3, 8, 8).half()
    teacher = torch.randn(1, 3, 8, 8).half()
    loss = pixelwise_kd_loss(student, teacher, 10.0, False)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(pixelwise_kd_loss(student.float(), teacher.float(), 10.0, False).item())


def reference_soft_label_kd(student, teacher, temperature, region_based, soften_student=False):
    """KD-Net's L_KD, Eq. (2), with explicit loops over items and channels: 1 - Dice(sigma(f_t / T), sigma(f_s))
    plus the cross-entropy against the teacher's hard prediction (soften_student: sigma(f_s / T) instead)."""
    s, t = student.double().numpy(), teacher.double().numpy()
    n_items, n_classes = s.shape[:2]
    s, t = s.reshape(n_items, n_classes, -1), t.reshape(n_items, n_classes, -1)
    sigmoid = lambda x: 1 / (1 + np.exp(-x))
    student_temperature = temperature if soften_student else 1.0
    if region_based:
        soft_s, soft_t, channels = sigmoid(s / student_temperature), sigmoid(t / temperature), range(n_classes)
    else:
        softmax = lambda x: np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
        soft_s, soft_t = softmax(s / student_temperature), softmax(t / temperature)
        channels = range(1, n_classes)
    dices = []
    for n in range(n_items):
        for k in channels:
            dices.append((2 * np.sum(soft_s[n, k] * soft_t[n, k]) + 1e-5)
                         / (soft_s[n, k].sum() + soft_t[n, k].sum() + 1e-5))
    cross_entropy, count = 0.0, 0
    for n in range(n_items):
        for v in range(s.shape[2]):
            if region_based:
                for k in range(n_classes):
                    hard = 1.0 if sigmoid(t[n, k, v]) > 0.5 else 0.0
                    p = sigmoid(s[n, k, v])
                    cross_entropy -= hard * math.log(p) + (1 - hard) * math.log(1 - p)
                    count += 1
            else:
                hard = int(np.argmax(t[n, :, v]))
                cross_entropy -= s[n, hard, v] - math.log(np.exp(s[n, :, v]).sum())
                count += 1
    return 1 - np.mean(dices) + cross_entropy / count


@pytest.mark.parametrize("region_based", [False, True])
@pytest.mark.parametrize("n_items, n_classes, spatial", SHAPES)
@pytest.mark.parametrize("soften_student", [False, True])
def test_soft_label_kd_matches_reference(n_items, n_classes, spatial, region_based, soften_student):
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(n_items, n_classes, *spatial, generator=generator) * 2
    teacher = torch.randn(n_items, n_classes, *spatial, generator=generator) * 2
    loss = soft_label_kd_loss(student, teacher, 5.0, region_based, soften_student)
    assert loss.item() == pytest.approx(reference_soft_label_kd(student, teacher, 5.0, region_based, soften_student),
                                        rel=1e-4)


def test_soft_label_kd_follows_eq_2_by_default():
    """Eq. 2 softens the teacher only: the default is that, and it is not the 0.1.0 reading (both softened)."""
    generator = torch.Generator().manual_seed(6)
    student = torch.randn(2, 3, 4, 4, generator=generator) * 8
    teacher = student + torch.randn(2, 3, 4, 4, generator=generator)
    default = soft_label_kd_loss(student, teacher, 5.0, True)
    assert default.item() == pytest.approx(reference_soft_label_kd(student, teacher, 5.0, True, False), rel=1e-5)
    assert abs(default.item() - soft_label_kd_loss(student, teacher, 5.0, True, soften_student=True).item()) > 0.05


def reference_bottleneck_kl(student, teacher, reduction="sum"):
    """Eq. (3): per item, KL between the softmax distributions over all C*S elements ("mean": divided by C*S)."""
    total = 0.0
    for s, t in zip(student.double().numpy(), teacher.double().numpy()):
        p = np.exp(t.ravel()) / np.exp(t.ravel()).sum()
        q = np.exp(s.ravel()) / np.exp(s.ravel()).sum()
        kl = float(np.sum(p * np.log(p / q)))
        total += kl if reduction == "sum" else kl / t.size
    return total / len(student)


@pytest.mark.parametrize("shape", [(2, 8, 3, 4), (3, 16, 2, 3, 4)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_bottleneck_kl_matches_reference(shape, reduction):
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    assert bottleneck_kl_loss(student, teacher, reduction).item() == pytest.approx(
        reference_bottleneck_kl(student, teacher, reduction), rel=1e-5)
    assert bottleneck_kl_loss(teacher, teacher, reduction).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="reduction must be"):
        bottleneck_kl_loss(student, teacher, "batchmean")


def test_bottleneck_kl_refuses_different_shapes():
    with pytest.raises(ValueError, match=r"bottleneck shapes differ: student \(2, 8, 3, 4\), teacher \(2, 16, 3, 4\)"):
        bottleneck_kl_loss(torch.zeros(2, 8, 3, 4), torch.zeros(2, 16, 3, 4))


@pytest.mark.parametrize("region_based", [False, True])
def test_kdnet_gradients_reach_the_student_only(region_based):
    student_logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher_logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    student_bottleneck = torch.randn(2, 8, 2, 2, requires_grad=True)
    teacher_bottleneck = torch.randn(2, 8, 2, 2, requires_grad=True)
    loss = soft_label_kd_loss(student_logits, teacher_logits, 5.0, region_based) \
        + bottleneck_kl_loss(student_bottleneck, teacher_bottleneck)
    assert_gradients_reach_the_student_only(loss, (student_logits, student_bottleneck),
                                            (teacher_logits, teacher_bottleneck))


# ----- chunked float32 reductions over voxels

CHUNKED_LOSSES = {
    "pixelwise_kd, labels": lambda x, chunk, **options: pixelwise_kd_loss(
        x["student_logits"], x["teacher_logits"], 10.0, False, chunk_voxels=chunk, **options),
    "pixelwise_kd, regions": lambda x, chunk, **options: pixelwise_kd_loss(
        x["student_logits"], x["teacher_logits"], 10.0, True, chunk_voxels=chunk, **options),
    "prototype_kd": lambda x, chunk, **options: prototype_kd_loss(
        x["student_features"], x["teacher_features"], x["masks"], chunk_voxels=chunk, **options),
    "prototype_kd, intra-class": lambda x, chunk, **options: prototype_kd_loss(
        x["student_features"], x["teacher_features"], x["masks"], intra_class_only=True, chunk_voxels=chunk,
        **options),
    "soft_label_kd, labels": lambda x, chunk: soft_label_kd_loss(x["student_logits"], x["teacher_logits"], 5.0, False,
                                                                chunk_voxels=chunk),
    "soft_label_kd, regions": lambda x, chunk: soft_label_kd_loss(x["student_logits"], x["teacher_logits"], 5.0, True,
                                                                 chunk_voxels=chunk),
}
COMPILED_KERNEL_LOSSES = ["pixelwise_kd, labels", "pixelwise_kd, regions", "prototype_kd", "prototype_kd, intra-class"]


def chunking_inputs(dtype=torch.float32, spatial=(6, 7, 9)):
    generator = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 3, (2, 1, *spatial), generator=generator)
    inputs = {"student_logits": torch.randn(2, 3, *spatial, generator=generator) * 3,
              "teacher_logits": torch.randn(2, 3, *spatial, generator=generator) * 3,
              "student_features": torch.randn(2, 5, *spatial, generator=generator),
              "teacher_features": torch.randn(2, 4, *spatial, generator=generator),
              "masks": ground_truth_class_masks(labels, False, 3)}
    return {k: v.to(dtype).requires_grad_(k.startswith("student")) if k != "masks" else v for k, v in inputs.items()}


def value_and_student_gradients(name, inputs, chunk, **options):
    for key in ("student_logits", "student_features"):
        inputs[key].grad = None
    loss = CHUNKED_LOSSES[name](inputs, chunk, **options)
    loss.backward()
    return loss.detach(), [inputs[key].grad.clone() for key in ("student_logits", "student_features")
                           if inputs[key].grad is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", CHUNKED_LOSSES)
def test_chunked_reductions_equal_the_unchunked_value_and_gradients(name, dtype):
    """Whatever the chunk size (a few voxels, not dividing V, all but one of the 378 voxels), the value and the
    student's gradients are those of the whole float32 computation; half-precision inputs (chunks recomputed in
    backward) alike, within the rounding of their gradient to bfloat16."""
    inputs = chunking_inputs(dtype)
    reference, reference_gradients = value_and_student_gradients(name, inputs, 10 ** 6)
    assert reference.dtype == torch.float32 and reference_gradients
    for chunk in (5, 64, 377):
        value, gradients = value_and_student_gradients(name, inputs, chunk)
        torch.testing.assert_close(value, reference, rtol=1e-6, atol=1e-7)
        for gradient, expected in zip(gradients, reference_gradients, strict=True):
            atol = 1e-7 if dtype == torch.float32 else 1e-2 * float(expected.abs().max())
            torch.testing.assert_close(gradient.float(), expected.float(), rtol=1e-5, atol=atol)


@pytest.mark.parametrize("name", COMPILED_KERNEL_LOSSES)
def test_compiled_chunk_kernels_give_the_eager_values_and_gradients(name, monkeypatch):
    """ProtoKD's chunk kernels through torch.compile (what its trainer does when nnU-Net compiles the networks,
    on CUDA; forced here on CPU), on bfloat16 inputs in chunks that do not divide the voxels: the eager value and
    the student's gradients, with and without gradient (a term of weight 0 is computed under no_grad)."""
    inputs = chunking_inputs(torch.bfloat16)
    expected, expected_gradients = value_and_student_gradients(name, inputs, 64)
    compiled_kernels = []

    def compiled(kernel):
        compiled_kernels.append(kernel.__name__)
        return compile_once(kernel)

    compile_once = losses._compiled
    monkeypatch.setattr(losses, "_compiled", compiled)
    value, gradients = value_and_student_gradients(name, inputs, 64, compile_kernels=True)
    # forward and backward both ran through torch.compile
    assert set(compiled_kernels) == ({"_summed_kl_chunk", "_kl_gradient_chunk"} if name.startswith("pixelwise")
                                     else {"_map_pass_chunk", "_prototype_gradient_chunk"})
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
    for gradient, reference in zip(gradients, expected_gradients, strict=True):
        # compiled float32 arithmetic may differ in its last bits, then round to a neighbouring bfloat16
        torch.testing.assert_close(gradient.float(), reference.float(), rtol=1e-2,
                                   atol=1e-2 * float(reference.abs().max()))
    with torch.no_grad():
        torch.testing.assert_close(CHUNKED_LOSSES[name](inputs, 64, compile_kernels=True), expected, rtol=1e-5,
                                   atol=1e-7)


def largest_float32_tensor(function) -> int:
    """The element count of the largest float32 tensor any torch operation makes while `function` runs."""
    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, op, types, args=(), kwargs=None):
            out = op(*args, **(kwargs or {}))
            for tensor in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                    Largest.numel = max(Largest.numel, tensor.numel())
            return out

    with Largest():
        function()
    return Largest.numel


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_no_full_size_float32_copy_of_half_precision_features(dtype):
    """ProtoKD's loss on half-precision decoder features, forward and backward: no float32 tensor as large as the
    features (the copy that did not fit at BraTS size) is ever made; the largest is one chunk of them."""
    chunk = 512
    student = torch.randn(2, 16, 16, 16, 16).to(dtype).requires_grad_()
    teacher = torch.randn(2, 16, 16, 16, 16).to(dtype)
    masks = ground_truth_class_masks(torch.randint(0, 3, (2, 1, 16, 16, 16)), False, 3)

    def forward_and_backward():
        prototype_kd_loss(student, teacher, masks, chunk_voxels=chunk).backward()

    largest = largest_float32_tensor(forward_and_backward)
    assert student.grad is not None and torch.isfinite(student.grad.float()).all()
    # the float32 masks (3 channels) are the largest full-size float32 tensor; a feature chunk is 2 x 16 x 512
    assert largest <= max(masks.numel(), 2 * 16 * chunk) < student.numel()
