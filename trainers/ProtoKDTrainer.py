from nnunet_protokd.distillation import DistillationTrainer
from nnunet_protokd.losses import ground_truth_class_masks, pixelwise_kd_loss, prototype_kd_loss


class ProtoKDTrainer(DistillationTrainer):
    """ProtoKD (Wang et al., ICASSP 2023): L = L_seg + alpha * L_kd + beta * L_proto.

    L_kd: KL(teacher || student) of the full-resolution outputs at temperature T (Eq. 1). L_proto: the squared
    difference of student and teacher similarity maps between the last decoder features and the ground-truth
    class prototypes (Eqs. 2-4). Deep-supervision outputs below full resolution get the segmentation loss only:
    the teacher runs without deep supervision and the paper distils one output. Settings (alpha, beta,
    temperature, intra_class_only) come from the configuration; a zero weight drops a term from the loss
    (it is still computed without gradient and logged, to show how far the student is from the teacher).
    """
    loss_terms = ("kd_loss", "proto_loss")

    def distillation_terms(self, output, target, student_features, teacher_logits, teacher_features):
        logits, full_resolution_target = (output[0], target[0]) if self.enable_deep_supervision else (output, target)
        region_based = self.label_manager.has_regions
        masks = ground_truth_class_masks(full_resolution_target, region_based,
                                         self.label_manager.num_segmentation_heads)
        with self.gradient_if(self.settings["alpha"]):
            kd = pixelwise_kd_loss(logits, teacher_logits, self.settings["temperature"], region_based)
        with self.gradient_if(self.settings["beta"]):
            proto = prototype_kd_loss(student_features["decoder"], teacher_features["decoder"], masks,
                                      self.settings["intra_class_only"])
        return {"kd_loss": (self.settings["alpha"], kd), "proto_loss": (self.settings["beta"], proto)}
