from nnunet_protokd.training.base import SingleModalityTrainer


class UnimodalTrainer(SingleModalityTrainer):
    """The unimodal baseline: nnU-Net's network, loss and schedule on the configuration's one modality."""
