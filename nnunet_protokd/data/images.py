"""The checks of one scan file that the BraTS converter and `nnunet-protokd predict` share.

NIfTI voxels are read with nibabel because SimpleITK (ITK 5.4, which nnU-Net reads images with) silently turns
NaN into 0 and reads a truncated .nii.gz without complaint, filling the missing part: a broken scan would reach
nnU-Net as a plausible image instead of being reported.
"""
from __future__ import annotations

import os

import nibabel
import numpy as np
import SimpleITK as sitk

NIFTI_ENDINGS = (".nii", ".nii.gz")


def read_voxels(path: str) -> np.ndarray:
    """The voxels of an image file as stored (NIfTI: nibabel, with its scaling; other formats: SimpleITK)."""
    if path.endswith(NIFTI_ENDINGS):
        return np.asarray(nibabel.load(path).dataobj)
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def count_non_finite(path: str) -> int:
    """NaN/inf voxels of an image file."""
    return int(np.count_nonzero(~np.isfinite(read_voxels(path))))


def image_header(path: str) -> sitk.ImageFileReader:
    """The header of an image file as SimpleITK (nnU-Net's reader) reads it: GetDimension, GetNumberOfComponents,
    GetSize, GetSpacing, GetOrigin and GetDirection, without the voxels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader


def scan_problem(path: str, constant_allowed: bool = False) -> str | None:
    """What makes the image file at `path` unusable, as a phrase naming it, or None: not a file (a directory, a
    broken link), unreadable (or truncated), not one 2D or 3D scalar image (a vector image, a 4D series), NaN/inf
    voxels, or (unless `constant_allowed`, as for a label map without tumour) one value in every voxel, which is a
    broken export (an all-zero modality), not a scan."""
    if os.path.isdir(path):  # checked first: SimpleITK would try every reader on it, HDF5's noisily
        return f"{path} is a directory, not an image file"
    if not os.path.exists(path):  # anything else that exists is read (a named pipe too) and judged by its content
        return (f"{path} is not a file: a broken symbolic link or a link loop" if os.path.islink(path)
                else f"{path} does not exist")
    try:
        header = image_header(path)
        voxels = read_voxels(path)
    except Exception as exc:  # nibabel, gzip and SimpleITK raise several types; keep their reason for the user
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return f"cannot read {path}: {reason}"
    if header.GetNumberOfComponents() > 1:
        return (f"{path} holds {header.GetNumberOfComponents()} values per voxel (a vector image); a scan has one "
                f"value per voxel: give each component as a file of its own")
    if header.GetDimension() not in (2, 3):
        return (f"{path} is a {header.GetDimension()}D image of size {header.GetSize()}; one 2D or 3D scan per file "
                f"is expected (a 4D series holds several volumes: give each as a file of its own)")
    n_bad = int(np.count_nonzero(~np.isfinite(voxels)))
    if n_bad:
        return f"{path} has {n_bad} NaN/inf voxels"
    if not constant_allowed and (voxels.size == 0 or voxels.min() == voxels.max()):
        value = f" {voxels.flat[0]:g}" if voxels.size else ""
        return f"{path} holds the value{value} in every voxel: an empty scan (a broken export), not an image"
    return None
