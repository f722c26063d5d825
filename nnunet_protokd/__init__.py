"""nnunet-protokd: single-modality brain-tumour segmentation distilled from a multi-modality nnU-Net teacher.

Kept free of heavy imports: the trainer-path hook (see trainer_path.py) imports this package at every
interpreter start-up of the environment it is registered in.
"""
__version__ = "0.2.0"
