#!/usr/bin/env python3
"""Turn nnU-Net predictions of a converted BraTS dataset back into BraTS label maps (0/1/2, and 4 or 3 for
enhancing tumour: see --et-label).

    python dataset_conversion/convert_predictions_to_brats.py predictions/ brats_labels/ \\
        --reference /data/BraTS_Validation

The code is nnunet_protokd/data/brats_labels.py, which needs only numpy and SimpleITK: an exported student carries a
copy of it as convert_predictions_to_brats.py, for sites without the plugin (nnunet-protokd export).
"""
import sys

from nnunet_protokd.data.brats_labels import main

if __name__ == "__main__":
    sys.exit(main())
