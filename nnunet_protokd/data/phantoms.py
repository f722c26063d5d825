"""Synthetic BraTS-like brain MRI phantoms written in the BraTS folder layout.

Real BraTS data cannot be downloaded in tests or demos, so this module builds small, skull-stripped
four-modality volumes with a glioma (oedema, tumour core, enhancing tumour) and writes them exactly
as the BraTS 2018-2020 or BraTS 2023 releases are laid out on disk; the BraTS 2024 post-treatment glioma
naming adds a resection cavity beside the tumour core. Each choice below follows an MRI or
annotation fact, written beside it; none was chosen by looking at a segmentation method's result.

The realism audit (`audit_phantoms`, reported by `nnunet-protokd evidence`) measures two facts of real data:

1. Each tumour sub-region is seen best in its "main" modality, yet real MRI carries weak but non-zero evidence
   of it in the others (Menze et al., IEEE TMI 2015, the BraTS paper: whole tumour from FLAIR/T2, tumour core
   from T2 and T1ce, enhancing tumour from T1ce). The audit's contrast-to-noise ratio (CNR: difference of the
   region means over their pooled within-region standard deviation, which holds noise, texture and bias) of
   each region boundary, median of 12 high-grade cases at the default shape, seed 0:

   | boundary                       | T1   | T1ce | T2   | FLAIR |
   |--------------------------------|------|------|------|-------|
   | whole tumour vs normal brain   | 1.5  | 0.35 | 3.3  | 4.9   |
   | tumour core vs oedema          | 0.34 | 2.7  | 1.0  | 1.8   |
   | enhancing vs the other tumour  | 1.1  | 6.7  | 1.6  | 1.4   |

   Strong (> 2.5) only where radiology reads the region; weak but non-zero (0.3-1.8) elsewhere: a T1 image shows
   enhancing tumour faintly (it is roughly iso-intense to grey matter but brighter than necrosis and oedema),
   and the core only barely. tests/test_phantoms.py keeps these bands.
2. Human annotations disagree at boundaries: inter-rater Dice in BraTS is about 0.85-0.9 for whole tumour and
   lower for the core and enhancing tumour (Menze et al. 2015 report about 0.85 / 0.75 / 0.74). The label map
   written is therefore not the tissue map that made the images but an annotation of it: the tissue map
   resampled through a smooth random displacement of ANNOTATION_DISPLACEMENT_VOXELS (per axis, standard
   deviation), one per case and annotator. Two independent annotations of one phantom agree at about Dice
   0.84 / 0.70 / 0.62 (whole tumour / core / enhancing; `audit_phantoms`), close to the rater-vs-rater figures
   above; a smaller displacement would make the annotations cleaner than any human's.
"""
import os

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

MODALITIES = ("t1", "t1ce", "t2", "flair")

_NAMINGS = ("brats2018", "brats2023", "brats2024")
_BRATS2023_SUFFIX = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
# BraTS volumes are stored with the x and y axes flipped relative to the index grid (LPS vs RAS).
_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
_BASE_ORIGIN_XYZ = np.array([-90.0, 126.0, -72.0])

# Tissue classes of the internal label map (0 = outside the brain).
_CSF, _GM, _WM, _OEDEMA, _NECROSIS, _NON_ENHANCING, _ENHANCING, _CAVITY = range(1, 9)
# Mean intensity per class (index = class) in arbitrary MRI-like units, from textbook appearance:
# T1 WM > GM > CSF with enhancing tumour ~iso to GM; T1ce the same but enhancing tumour very bright;
# T2 CSF and fluid-rich lesions bright; FLAIR like T2 with CSF suppressed, oedema brightest.
_TISSUE_INTENSITIES = {
    #          bg   CSF   GM    WM    ED    NCR   NET   ET
    "t1":    [0.0, 250., 550., 800., 470., 220., 400., 570.],
    "t1ce":  [0.0, 270., 580., 820., 490., 240., 430., 1400.],
    "t2":    [0.0, 1500., 850., 650., 1250., 1350., 1150., 1000.],
    "flair": [0.0, 120., 600., 480., 1100., 700., 950., 850.],
}
# Standard deviation (voxels, per axis) of the smooth displacement between the tissue map and its annotation:
# the amplitude at which two annotations of one phantom agree as two BraTS raters do (see the module docstring)
ANNOTATION_DISPLACEMENT_VOXELS = 0.5
# Tumour class -> segmentation label; BraTS 2023 renamed enhancing tumour from 4 to 3, BraTS 2024's post-treatment
# glioma labels the resection cavity 4.
_SEG_LABELS = {"brats2018": {_OEDEMA: 2, _NECROSIS: 1, _NON_ENHANCING: 1, _ENHANCING: 4},
               "brats2023": {_OEDEMA: 2, _NECROSIS: 1, _NON_ENHANCING: 1, _ENHANCING: 3},
               "brats2024": {_OEDEMA: 2, _NECROSIS: 1, _NON_ENHANCING: 1, _ENHANCING: 3, _CAVITY: 4}}


def generate_brats_phantoms(output_folder: str, num_hgg: int = 8, num_lgg: int = 4, seed: int = 0,
                            shape_zyx: tuple = (32, 48, 48), spacing_xyz: tuple = (1.2, 1.2, 2.0),
                            with_segmentation: bool = True, naming: str = "brats2018",
                            first_case_index: int = 0) -> list[str]:
    """Write num_hgg high-grade and num_lgg low-grade phantom cases to output_folder.

    naming="brats2018" (also the 2019/2020 layout) writes HGG/<case>/<case>_<modality>.nii.gz and
    LGG/...; naming="brats2023" writes a flat <case>/<case>-t1n|t1c|t2w|t2f.nii.gz layout (HGG cases
    first, then LGG); naming="brats2024" the same layout with a small resection cavity (label 4) in every
    case. with_segmentation=False omits the seg file (validation/test layout).
    Case numbers start at first_case_index, so that held-out sets get ids of their own.
    Returns the absolute case folders written, HGG cases first, in case-number order.
    """
    shape_zyx, spacing_xyz = _validate_arguments(output_folder, num_hgg, num_lgg, seed, shape_zyx,
                                                 spacing_xyz, naming, first_case_index)
    output_folder = os.path.abspath(output_folder)
    # One independent stream per (grade, case number), so a case id always has the same content for a
    # given seed whatever the counts or first_case_index (this equals SeedSequence(seed).spawn(2)[g].spawn).
    jobs = [(grade, number, np.random.SeedSequence(seed, spawn_key=(grade_index, number)))
            for grade_index, (grade, count) in enumerate((("HGG", num_hgg), ("LGG", num_lgg)))
            for number in range(first_case_index, first_case_index + count)]

    os.makedirs(output_folder, exist_ok=True)
    case_folders = []
    for case_number, (grade, number, case_seed) in enumerate(jobs):
        if naming == "brats2018":
            case_id = f"Brats18_PHANTOM_{grade}_{number:03d}"
            case_folder = os.path.join(output_folder, grade, case_id)
            file_names = {m: f"{case_id}_{m}.nii.gz" for m in MODALITIES}
            seg_name = f"{case_id}_seg.nii.gz"
        else:
            case_id = f"BraTS-GLI-{first_case_index + case_number:05d}-000"
            case_folder = os.path.join(output_folder, case_id)
            file_names = {m: f"{case_id}-{_BRATS2023_SUFFIX[m]}.nii.gz" for m in MODALITIES}
            seg_name = f"{case_id}-seg.nii.gz"

        rng = np.random.default_rng(case_seed)
        images, tissue = _simulate_case(rng, shape_zyx, high_grade=(grade == "HGG"), cavity=naming == "brats2024")
        origin = tuple(float(v) for v in _BASE_ORIGIN_XYZ + rng.uniform(-3.0, 3.0, size=3))
        os.makedirs(case_folder)
        for modality in MODALITIES:
            _write(images[modality], os.path.join(case_folder, file_names[modality]), spacing_xyz, origin)
        if with_segmentation:
            annotation = _annotate(rng, tissue)
            seg = np.zeros(shape_zyx, dtype=np.uint8)
            for tissue_class, label in _SEG_LABELS[naming].items():
                seg[annotation == tissue_class] = label
            _write(seg, os.path.join(case_folder, seg_name), spacing_xyz, origin)
        case_folders.append(case_folder)
    return case_folders


def _validate_arguments(output_folder, num_hgg, num_lgg, seed, shape_zyx, spacing_xyz, naming,
                        first_case_index):
    for name, count in (("num_hgg", num_hgg), ("num_lgg", num_lgg)):
        if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {count!r}")
    if num_hgg + num_lgg == 0:  # one grade may be absent (a cohort of glioblastomas only), not both
        raise ValueError("num_hgg and num_lgg are both 0: nothing to generate")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if len(shape_zyx) != 3 or any(int(n) != n or n < 16 for n in shape_zyx):
        raise ValueError(f"shape_zyx must be three integers >= 16, got {shape_zyx!r}")
    if len(spacing_xyz) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing_xyz):
        raise ValueError(f"spacing_xyz must be three positive numbers, got {spacing_xyz!r}")
    if (not isinstance(first_case_index, (int, np.integer)) or isinstance(first_case_index, bool)
            or first_case_index < 0):
        raise ValueError(f"first_case_index must be a non-negative integer, got {first_case_index!r}")
    if naming not in _NAMINGS:
        raise ValueError(f"naming must be one of {_NAMINGS}, got {naming!r}")
    if os.path.exists(output_folder) and (not os.path.isdir(output_folder) or os.listdir(output_folder)):
        raise ValueError(f"output_folder {output_folder!r} exists and is not an empty folder; "
                         f"refusing to write phantoms into it")
    return tuple(int(n) for n in shape_zyx), tuple(float(s) for s in spacing_xyz)


def _write(array, path, spacing_xyz, origin_xyz):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin_xyz)
    image.SetDirection(_DIRECTION)
    sitk.WriteImage(image, path, useCompression=True)


def _smooth_field(rng, shape, correlation):
    """Zero-mean, unit-variance random field varying over ~correlation of the image extent."""
    # Cubic upsampling of a coarse noise grid is much cheaper than large-sigma gaussian filtering.
    coarse_shape = [max(2, int(round(1.0 / correlation)) + 1)] * 3
    field = ndimage.zoom(rng.standard_normal(coarse_shape), [n / c for n, c in zip(shape, coarse_shape)],
                         order=3, mode="nearest")
    return (field - field.mean()) / field.std()


def _annotate(rng, tissue, displacement_voxels=ANNOTATION_DISPLACEMENT_VOXELS):
    """An annotator's tissue map: `tissue` read through a smooth random displacement field (each component a
    smooth field with standard deviation `displacement_voxels`), kept inside the brain. Boundaries move by a
    fraction of a voxel to a voxel or two, as a human's outline does; compartments do not change otherwise."""
    shape = tissue.shape
    displacement = np.stack([displacement_voxels * _smooth_field(rng, shape, 0.15) for _ in range(3)])
    annotated = ndimage.map_coordinates(tissue, np.indices(shape, dtype=float) + displacement, order=0,
                                        mode="nearest")
    return np.where(tissue > 0, annotated, 0).astype(tissue.dtype)


def _ellipsoid_distance(grid, centre, radii):
    """Normalised ellipsoidal radius: < 1 inside the ellipsoid."""
    return np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)))


def _irregular_blob(rng, grid, shape, centre, radii, roughness):
    distance = _ellipsoid_distance(grid, centre, radii)
    return distance * (1.0 + roughness * _smooth_field(rng, shape, 0.2)) < 1.0


def _simulate_case(rng, shape, high_grade, cavity=False):
    """Return ({modality: float32 image}, int tissue-class map) for one case; `cavity`: after resection."""
    # Coordinates in units of the image extent (each axis spans about [-0.5, 0.5]), so the anatomy
    # scales with shape_zyx instead of being tied to a voxel size.
    grid = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) / n for n in shape], indexing="ij", sparse=True)

    # Brain: an ellipsoid filling 55-75% of each axis with a smooth random boundary deformation.
    brain_centre = rng.uniform(-0.03, 0.03, size=3)
    brain_radii = rng.uniform(0.28, 0.37, size=3)
    deformation = 0.07 * np.clip(_smooth_field(rng, shape, 0.3), -2.5, 2.5)
    depth = _ellipsoid_distance(grid, brain_centre, brain_radii) / (1.0 + deformation)
    brain = depth < 1.0

    # Normal tissue: cortical grey-matter ribbon with sulcal CSF, deep grey nuclei, ventricles.
    tissue = np.where(brain, _WM, 0).astype(np.uint8)
    cortex = brain & (depth > 0.78 + 0.05 * _smooth_field(rng, shape, 0.2))
    tissue[cortex] = _GM
    tissue[cortex & (_smooth_field(rng, shape, 0.1) > 1.2)] = _CSF
    tissue[brain & (depth > 0.95 + 0.02 * _smooth_field(rng, shape, 0.2))] = _CSF
    tissue[(depth < 0.45) & (_smooth_field(rng, shape, 0.15) > 1.3)] = _GM
    ventricle_radii = np.array([0.16, 0.35, 0.1]) * brain_radii * rng.uniform(0.7, 1.3)
    for side in (-1.0, 1.0):
        offset = np.array([0.05, 0.0, side * 0.15]) * brain_radii / 0.32
        tissue[_ellipsoid_distance(grid, brain_centre + offset, ventricle_radii) < 1.0] = _CSF

    tissue = _add_tumour(rng, grid, shape, brain, depth, tissue, high_grade)
    if cavity:  # after every other draw, so that the other namings' phantoms stay what they were
        tissue = _add_cavity(rng, grid, shape, brain, tissue)

    # Within-class texture shared by all modalities (the underlying microstructure), stronger in tumour.
    texture = 1.0 + 0.04 * _smooth_field(rng, shape, 0.08)
    texture[tissue >= _OEDEMA] += 0.06 * _smooth_field(rng, shape, 0.08)[tissue >= _OEDEMA]

    images = {}
    for modality in MODALITIES:
        class_means = np.array(_TISSUE_INTENSITIES[modality]) * rng.uniform(0.93, 1.07, size=8)
        # a resection cavity fills with fluid: CSF's signal in every sequence (dark on T1 and FLAIR, bright on T2)
        class_means = np.append(class_means, class_means[_CSF])
        gain = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))  # scanner-dependent global scaling
        wm_level = class_means[_WM] * gain
        clean = ndimage.gaussian_filter(class_means[tissue] * texture, sigma=0.5)  # partial volume
        bias = 1.0 + rng.uniform(0.15, 0.25) * np.clip(_smooth_field(rng, shape, 0.6) / 2.0, -1.0, 1.0)
        signal = clean * bias * gain
        # Rician noise: magnitude of the signal plus complex gaussian noise.
        noise_sigma = rng.uniform(0.02, 0.05) * wm_level
        noisy = np.hypot(signal + noise_sigma * rng.standard_normal(shape),
                         noise_sigma * rng.standard_normal(shape))
        # Skull-stripped: exactly 0 outside, strictly positive inside, so every modality has the same
        # nonzero mask (nnU-Net crops to the nonzero region of any channel).
        images[modality] = np.where(brain, np.maximum(noisy, 1e-3 * wm_level), 0.0).astype(np.float32)
    return images, tissue


def _add_tumour(rng, grid, shape, brain, depth, tissue, high_grade):
    """Overwrite tissue with oedema and a tumour core; resample degenerate draws."""
    # Every high-grade case gets a visible enhancing rim: ~30 voxels at the default shape, scaled by volume.
    min_enhancing = max(4, int(round(30 * np.prod(shape) / (32 * 48 * 48))))
    # A floor of a few voxels per radius keeps tiny volumes from producing sub-voxel compartments.
    voxel = 1.0 / np.array(shape)
    candidates = np.argwhere(brain & (depth < 0.5))
    for _ in range(50):
        centre_index = candidates[rng.integers(len(candidates))]
        core_centre = np.array([axis.ravel()[i] for axis, i in zip(grid, centre_index)])
        core_radii = np.maximum(rng.uniform(0.06, 0.12, size=3), 2.2 * voxel)
        # Oedema surrounds the core, usually eccentrically; low-grade tumours tend to have less of it.
        oedema_scale = rng.uniform(1.3, 1.9, size=3) if high_grade else rng.uniform(1.1, 1.6, size=3)
        oedema_radii = np.maximum(core_radii * oedema_scale, 3 * voxel)
        oedema_centre = core_centre + rng.uniform(-0.3, 0.3, size=3) * (oedema_radii - core_radii)
        core = brain & _irregular_blob(rng, grid, shape, core_centre, core_radii, 0.15)
        oedema = _irregular_blob(rng, grid, shape, oedema_centre, oedema_radii, 0.2)
        # A margin of oedema always surrounds the core; it spreads through parenchyma but not into
        # ventricles or sulci.
        oedema = (oedema | ndimage.binary_dilation(core, iterations=2)) & brain & (tissue != _CSF)
        candidate = tissue.copy()
        candidate[oedema] = _OEDEMA
        if high_grade:
            # Enhancing rim around a necrotic centre.
            necrosis_radii = np.maximum(core_radii * rng.uniform(0.45, 0.7, size=3), 1.2 * voxel)
            necrosis_centre = core_centre + rng.uniform(-0.15, 0.15, size=3) * core_radii
            necrosis = core & _irregular_blob(rng, grid, shape, necrosis_centre, necrosis_radii, 0.1)
            candidate[core] = _ENHANCING
            candidate[necrosis] = _NECROSIS
            required = (_OEDEMA, _NECROSIS, _ENHANCING)
        else:
            # Non-enhancing core; only a minority of low-grade tumours show a small enhancing focus.
            candidate[core] = _NON_ENHANCING
            if rng.random() < 0.25:
                focus_radii = np.maximum(core_radii * rng.uniform(0.2, 0.35, size=3), 1.0 * voxel)
                focus_centre = core_centre + rng.uniform(-0.4, 0.4, size=3) * core_radii
                candidate[core & (_ellipsoid_distance(grid, focus_centre, focus_radii) < 1.0)] = _ENHANCING
            required = (_OEDEMA, _NON_ENHANCING)
        counts = np.bincount(candidate.ravel(), minlength=_ENHANCING + 1)
        if all(counts[c] > 0 for c in required) and (not high_grade or counts[_ENHANCING] >= min_enhancing):
            return candidate
    raise RuntimeError("could not place a valid tumour; the volume shape is probably too small")


def _add_cavity(rng, grid, shape, brain, tissue):
    """A resection cavity: an ellipsoid about half the core's size centred on the core's edge, in a random
    direction, replacing the tumour (and oedema) there, as where part of the tumour was removed."""
    core_voxels = np.argwhere(np.isin(tissue, (_NECROSIS, _NON_ENHANCING, _ENHANCING)))
    size = np.array(shape)
    centre = (core_voxels.mean(0) - (size - 1) / 2) / size
    half_extent = (np.ptp(core_voxels, axis=0) + 1) / size / 2
    radii = np.maximum(0.5 * half_extent, 1.5 / size)
    for _ in range(20):
        direction = rng.standard_normal(3)
        cavity = brain & (_ellipsoid_distance(grid, centre + half_extent * direction / np.linalg.norm(direction),
                                              radii) < 1.0)
        candidate = np.where(cavity, _CAVITY, tissue).astype(tissue.dtype)
        if cavity.sum() >= 4 and np.isin(candidate, (_NECROSIS, _NON_ENHANCING, _ENHANCING)).any():
            return candidate
    raise RuntimeError("could not place a resection cavity; the volume shape is probably too small")


# the region boundaries the audit measures: (name, the region's tissue classes, the classes it borders)
_AUDITED_BOUNDARIES = (
    ("whole tumour vs normal brain", (_OEDEMA, _NECROSIS, _NON_ENHANCING, _ENHANCING), (_GM, _WM)),
    ("tumour core vs oedema", (_NECROSIS, _NON_ENHANCING, _ENHANCING), (_OEDEMA,)),
    ("enhancing vs the other tumour", (_ENHANCING,), (_OEDEMA, _NECROSIS, _NON_ENHANCING)),
)
_AUDITED_REGIONS = (("whole tumour", (_OEDEMA, _NECROSIS, _NON_ENHANCING, _ENHANCING)),
                    ("tumour core", (_NECROSIS, _NON_ENHANCING, _ENHANCING)), ("enhancing tumour", (_ENHANCING,)))


def contrast_to_noise_ratio(image: np.ndarray, region: np.ndarray, reference: np.ndarray) -> float:
    """|mean(region) - mean(reference)| / sqrt((var(region) + var(reference)) / 2) of one image."""
    pooled = np.sqrt((image[region].var() + image[reference].var()) / 2)
    return float(abs(image[region].mean() - image[reference].mean()) / pooled)


def audit_phantoms(num_cases: int = 12, seed: int = 0, shape_zyx: tuple = (32, 48, 48)) -> dict:
    """The realism audit of the module docstring on `num_cases` high-grade cases of `seed`: {"cnr": {boundary:
    {modality: median CNR}}, "inter_rater_dice": {region: median Dice of two independent annotations}}."""
    cnr, agreement = {}, {}
    for number in range(num_cases):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, number)))
        images, tissue = _simulate_case(rng, tuple(shape_zyx), high_grade=True)
        for boundary, region, reference in _AUDITED_BOUNDARIES:
            for modality in MODALITIES:
                cnr.setdefault(boundary, {}).setdefault(modality, []).append(contrast_to_noise_ratio(
                    images[modality], np.isin(tissue, region), np.isin(tissue, reference)))
        first, second = _annotate(rng, tissue), _annotate(rng, tissue)
        for name, classes in _AUDITED_REGIONS:
            a, b = np.isin(first, classes), np.isin(second, classes)
            agreement.setdefault(name, []).append(2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum())))
    return {"cases": num_cases, "seed": seed, "shape_zyx": list(shape_zyx),
            "cnr": {b: {m: float(np.median(v)) for m, v in per.items()} for b, per in cnr.items()},
            "inter_rater_dice": {name: float(np.median(v)) for name, v in agreement.items()}}
