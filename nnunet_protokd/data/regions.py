"""What is scored in a dataset: its regions (BraTS WT/TC/ET, also for a label-based BraTS conversion) or each
foreground label. The report, the evidence and LCKD's teacher election score the same."""
from __future__ import annotations

import numpy as np

from nnunet_protokd.data.brats import NNUNET_REGIONS

REGION_ABBREVIATIONS = {"whole tumor": "WT", "tumor core": "TC", "enhancing tumor": "ET"}


def evaluation_regions(dataset_json: dict) -> list[tuple[str, tuple]]:
    """(short name, labels) of what to score: the dataset's regions; for a label-based BraTS conversion the
    BraTS regions WT/TC/ET; otherwise each foreground label."""
    labels = dataset_json["labels"]
    if "regions_class_order" in dataset_json or dataset_json.get("brats_naming"):
        source = NNUNET_REGIONS if "regions_class_order" not in dataset_json else labels
        return [(REGION_ABBREVIATIONS.get(name, name), tuple(np.atleast_1d(value).tolist()))
                for name, value in source.items() if name != "background"]
    return [(name, (int(value),)) for name, value in labels.items() if name not in ("background", "ignore")]
