from functools import cached_property

from nnunet_protokd.training.distillation import DistillationTrainer
from nnunet_protokd.training.losses import (
    disjoint_region_classes,
    ground_truth_class_masks,
    pixelwise_kd_loss,
    prototype_kd_loss,
)


class ProtoKDTrainer(DistillationTrainer):
    """ProtoKD (Wang et al., ICASSP 2023): L = L_seg + alpha * L_kd + beta * L_proto.

    L_kd: KL(teacher || student) of the full-resolution outputs at temperature T (Eq. 1): softmax over the labels
    of a label dataset, a Bernoulli KL per sigmoid output of a region dataset (there is no softmax to match).
    L_proto: the squared difference of student and teacher similarity maps between the last decoder features and
    the ground-truth class prototypes (Eqs. 2-4). Its classes are the labels of a label dataset and, by default,
    the disjoint classes of a region dataset's regions (BraTS: background, WT-TC, TC-ET, ET, the authors' four, and
    RC for BraTS 2024; setting `classes`), the same for every item and batch. Deep-supervision outputs below full
    resolution get the segmentation loss only: the teacher runs without deep supervision and the paper distils one
    output. Settings come from the configuration; a zero weight drops a term from the loss (it is still computed
    without gradient and logged, to show how far the student is from the teacher). The two terms' per-chunk kernels
    are compiled when the networks are (nnU-Net's choice; training/losses.py: chunk_kernel).
    """
    loss_terms = ("kd_loss", "proto_loss")
    distilled_features = ("decoder",)

    @cached_property
    def region_membership(self):
        """Membership of the prototype classes in the regions; None for a label dataset or the regions as classes."""
        if not self.label_manager.has_regions or self.settings["classes"] == "regions":
            return None
        return disjoint_region_classes(self.label_manager.foreground_regions)[1]

    @property
    def prototype_classes(self) -> list:
        """The labels of each prototype class, background first."""
        if not self.label_manager.has_regions:
            return [[int(label)] for label in self.label_manager.all_labels]
        regions = [[int(label) for label in region] for region in self.label_manager.foreground_regions]
        if self.region_membership is None:
            return [[0]] + regions
        return [list(labels) for labels in disjoint_region_classes(self.label_manager.foreground_regions)[0]]

    def record(self) -> dict:
        return {**super().record(), "prototype_classes": self.prototype_classes}

    def distillation_terms(self, output, target, student_features, teacher_logits, teacher_features):
        logits, full_resolution_target = (output[0], target[0]) if self.enable_deep_supervision else (output, target)
        region_based = self.label_manager.has_regions
        masks = ground_truth_class_masks(full_resolution_target, region_based,
                                         self.label_manager.num_segmentation_heads, self.region_membership)
        compiled = self._do_i_compile()  # the losses' chunk kernels are compiled when the networks are
        with self.gradient_if(self.settings["alpha"]):
            kd = pixelwise_kd_loss(logits, teacher_logits, self.settings["temperature"], region_based,
                                   compile_kernels=compiled)
        with self.gradient_if(self.settings["beta"]):
            proto = prototype_kd_loss(student_features["decoder"], teacher_features["decoder"], masks,
                                      self.settings["intra_class_only"], self.settings["class_presence"],
                                      compile_kernels=compiled)
        return {"kd_loss": (self.settings["alpha"], kd), "proto_loss": (self.settings["beta"], proto)}
