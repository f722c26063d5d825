"""The protocol: the paper's Table-1 experiment as steps of nnU-Net commands, its Snakemake workflow, the seeded
evidence runs and the demo built on them, and the benchmark of what each trainer costs."""
