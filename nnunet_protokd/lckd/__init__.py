"""LCKD (Wang et al., MICCAI 2023): its fusion network, its teacher election and the model folders that predict from a
subset of the modalities."""
