from nnunet_protokd.training.distillation import DistillationTrainer
from nnunet_protokd.training.losses import bottleneck_kl_loss, soft_label_kd_loss
from nnunet_protokd.training.teacher import TeacherError


class KDNetTrainer(DistillationTrainer):
    """KD-Net (Hu, Maillard et al., MICCAI 2020): L = lambda * L_KD + (1 - lambda) * L_GT + alpha * L_KL.

    L_GT: nnU-Net's segmentation loss (deep supervision included). L_KD (Eq. 2): soft Dice between the teacher's
    temperature-softened prediction and the student's unsoftened one (setting soften_student) plus cross-entropy
    against the teacher's hard prediction, on the full-resolution output. L_KL (Eq. 3): KL(teacher || student) of
    the softmax-normalised bottlenecks, summed over an item's elements (setting kl_reduction), which needs a teacher
    with the student's architecture apart from the input channels (checked before training starts). Settings come
    from the configuration.
    """
    loss_terms = ("kd_loss", "kl_loss")
    distilled_features = ("bottleneck",)

    def check_teacher(self, teacher, student_configuration):
        ours = student_configuration["architecture"]
        theirs = teacher.resolved_configuration()["architecture"]
        for key in ("n_stages", "features_per_stage", "strides"):
            if ours["arch_kwargs"].get(key) != theirs["arch_kwargs"].get(key):
                raise TeacherError(f"KD-Net matches bottlenecks, so the teacher needs the student's architecture: "
                                   f"its {key} {theirs['arch_kwargs'].get(key)} differ from the student's "
                                   f"{ours['arch_kwargs'].get(key)} ({teacher.checkpoint_path})")

    def segmentation_weight(self):
        return 1.0 - self.settings["lambda"]

    def distillation_terms(self, output, target, student_features, teacher_logits, teacher_features):
        logits = output[0] if self.enable_deep_supervision else output
        with self.gradient_if(self.settings["lambda"]):
            kd = soft_label_kd_loss(logits, teacher_logits, self.settings["temperature"],
                                    self.label_manager.has_regions, self.settings["soften_student"])
        with self.gradient_if(self.settings["alpha"]):
            kl = bottleneck_kl_loss(student_features["bottleneck"], teacher_features["bottleneck"],
                                    self.settings["kl_reduction"])
        return {"kd_loss": (self.settings["lambda"], kd), "kl_loss": (self.settings["alpha"], kl)}
