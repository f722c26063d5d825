"""Data in: BraTS conversion (2018-2023 layouts and their label conventions), the phantoms that stand in for BraTS,
the checks of one scan file, and what a dataset scores (its regions). Imports nothing above it."""
