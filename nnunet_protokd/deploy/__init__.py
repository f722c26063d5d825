"""Deployment: prediction after a check of the input files (in-process or as nnUNetv2_predict), and export of a
student as a plain nnU-Net model zip with its model card."""
