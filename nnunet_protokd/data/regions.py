"""What is scored in a dataset: its regions (BraTS WT/TC/ET, and RC for BraTS 2024, also for a label-based BraTS
conversion) or each foreground label. The report, the evidence and LCKD's teacher election score the same."""
from __future__ import annotations

import numpy as np

from nnunet_protokd.data.brats_labels import REGION_ABBREVIATIONS, generation_of


def evaluation_regions(dataset_json: dict) -> list[tuple[str, tuple]]:
    """(short name, labels) of what to score: the dataset's regions; for a label-based BraTS conversion the
    regions of its BraTS generation (WT/TC/ET, and RC for BraTS 2024); otherwise each foreground label."""
    labels = dataset_json["labels"]
    convention = generation_of(dataset_json)
    if "regions_class_order" in dataset_json or convention is not None:
        source = convention.nnunet_regions if "regions_class_order" not in dataset_json else labels
        return [(REGION_ABBREVIATIONS.get(name, name), tuple(np.atleast_1d(value).tolist()))
                for name, value in source.items() if name != "background"]
    return [(name, (int(value),)) for name, value in labels.items() if name not in ("background", "ignore")]
