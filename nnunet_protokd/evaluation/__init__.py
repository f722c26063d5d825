"""Evaluation: per-case metrics (Dice, HD95), paired statistics, the Table-1 report and the figures of reports."""
