from nnunet_protokd.training.base import MultiModalityTrainer


class ProtoKDTeacherTrainer(MultiModalityTrainer):
    """The named multi-modality teacher: nnU-Net's own loss and schedule on all channels.

    Students look for it by this name in nnUNet_results (any plain multi-channel nnU-Net model of the same
    dataset and plans can be named instead)."""
