"""Paired comparisons of two models over the same cases, the significance rule the reports apply to them, and how
p-values are written."""
from __future__ import annotations

import numpy as np
from scipy import stats


def significant(comparison: dict) -> bool:
    """A paired comparison counts as a difference only when the rank test (Wilcoxon p < 0.05) and the bootstrap
    95 % CI of the mean (excluding 0) agree: with the (seed, case) pairs of a few trained models, either alone
    overstates the evidence."""
    return rank_test_rejects(comparison) and (comparison["ci95"][0] > 0 or comparison["ci95"][1] < 0)


def rank_test_rejects(comparison: dict) -> bool:
    """The Wilcoxon half of `significant`: p < 0.05 (None when there are too few pairs for the test)."""
    return comparison["wilcoxon_p"] is not None and comparison["wilcoxon_p"] < 0.05


def paired_comparison(student: list, baseline: list, seed: int = 0) -> dict:
    """Student minus baseline over paired cases: mean, bootstrap 95 % CI, Wilcoxon and paired t-test p."""
    student, baseline = np.asarray(student, float), np.asarray(baseline, float)
    differences = student - baseline
    result = {"n": int(len(differences)), "mean_difference": float(differences.mean())}
    if len(differences) < 2 or np.allclose(differences, differences[0]):
        # no spread: the tests and the bootstrap are undefined
        return {**result, "ci95": [float(differences.mean())] * 2, "wilcoxon_p": None, "ttest_p": None}
    interval = stats.bootstrap((differences,), np.mean, confidence_level=0.95, n_resamples=2000,
                               method="percentile", random_state=np.random.default_rng(seed)).confidence_interval
    wilcoxon = stats.wilcoxon(student, baseline) if np.any(differences != 0) else None
    return {**result, "ci95": [float(interval.low), float(interval.high)],
            "wilcoxon_p": float(wilcoxon.pvalue) if wilcoxon is not None else None,
            "ttest_p": float(stats.ttest_rel(student, baseline).pvalue)}


def format_p(value) -> str:
    """A p-value in tables and sentences: two significant digits; "n/a" when the test was undefined."""
    return "n/a" if value is None else f"{value:.2g}"
