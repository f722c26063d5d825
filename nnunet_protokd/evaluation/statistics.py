"""Paired comparisons of two training methods whose unit is the trained model, the one verdict rule the reports apply
to them, multiplicity adjustment, and how p-values are written.

A method's replicates are its trained models (a seed; a (seed, fold) model under cross-validation): the cases one
model predicts share its weights, so they are not independent replicates of the method. `replicate_comparison`
therefore tests over the replicates' mean differences (the seed-level test), bootstraps hierarchically (replicates,
then cases within each), and keeps the case-level figures only as a description. `verdict` is the one rule that
turns a comparison into "better", "worse" or "no significant difference at this budget"; `distillation_verdict`
applies it to a student that learns from a teacher, first asking the same rule whether the teacher is better than
the baseline at all ("no knowledge to transfer at this budget" where it is not)."""
from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import statsmodels.api as sm
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

ALPHA = 0.05
POWER = 0.8
# resamples of the hierarchical bootstrap: the 2.5 % and 97.5 % percentiles of 10,000 draws move by about 0.001
# Dice between generator seeds on the committed run's spread
HIERARCHICAL_RESAMPLES = 10_000
NO_DIFFERENCE = "no significant difference at this budget"
# what a distilled student's verdict is replaced by where its teacher is not better than the unimodal baseline
NO_KNOWLEDGE = "no knowledge to transfer at this budget"
# a comparison of one trained model per method: its cases share that model, so no test of ours can call it
UNTESTED = "untested"


def paired_comparison(student: list, baseline: list, seed: int = 0) -> dict:
    """Student minus baseline over paired cases of one pair of models: mean, bootstrap 95 % CI, Wilcoxon and paired
    t-test p. Pooled over several trained models these figures describe the cases; they test nothing about the
    training method (`replicate_comparison` does)."""
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


def seed_level_test(replicate_means) -> dict:
    """The test whose unit is the trained model: a one-sample t-test of the replicates' mean differences against 0
    (scipy.stats.ttest_1samp, df = replicates - 1), their mean, its 95 % t-interval, their standard deviation and
    the smallest difference this many replicates could detect (`detectable_difference`). p, interval and detectable
    difference are None with fewer than two replicates or no spread between them."""
    means = np.asarray(list(replicate_means), float)
    result = {"replicates": int(len(means)), "mean": float(means.mean()) if len(means) else None,
              "df": int(len(means)) - 1, "sd": float(means.std(ddof=1)) if len(means) > 1 else None,
              "p": None, "ci95": None, "detectable_difference": None}
    if len(means) < 2 or np.allclose(means, means[0]):
        return result
    test = stats.ttest_1samp(means, 0.0)
    interval = test.confidence_interval(1 - ALPHA)
    return {**result, "p": float(test.pvalue), "ci95": [float(interval.low), float(interval.high)],
            "detectable_difference": detectable_difference(result["sd"], len(means))}


def detectable_difference(sd: float, replicates: int, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The smallest true mean difference that a two-sided one-sample t-test over `replicates` trained models, at
    `alpha`, detects with probability `power`, given the replicates' standard deviation `sd`:

        delta = d * sd,  d solving  P(|T| > t_{1 - alpha/2, k - 1}) = power  for T ~ noncentral t(k - 1, d sqrt(k))

    (statsmodels' TTestPower; close to (t_{1 - alpha/2, k-1} + t_{power, k-1}) sd / sqrt(k)). A null verdict rules
    out effects of about this size, not smaller ones. None with fewer than two replicates."""
    if replicates < 2 or sd is None:
        return None
    d = TTestPower().solve_power(nobs=replicates, alpha=alpha, power=power, alternative="two-sided")
    return float(d * sd)


def hierarchical_bootstrap_ci(groups: list, seed: int = 0, resamples: int = HIERARCHICAL_RESAMPLES) -> list:
    """Percentile 95 % CI of the mean of the replicates' mean differences, resampling replicates with replacement,
    then the cases within each resampled replicate (independently each time a replicate is drawn). groups: one
    array of case differences per replicate. A seeded numpy Generator: the same input gives the same interval."""
    rng = np.random.default_rng(seed)
    groups = [np.asarray(g, float) for g in groups]
    chosen = rng.integers(0, len(groups), size=(resamples, len(groups)))
    slot_means = np.empty((resamples, len(groups)))
    for slot in range(len(groups)):
        for index, values in enumerate(groups):
            rows = np.flatnonzero(chosen[:, slot] == index)
            draws = rng.integers(0, len(values), size=(len(rows), len(values)))
            slot_means[rows, slot] = values[draws].mean(axis=1)
    low, high = np.percentile(slot_means.mean(axis=1), [2.5, 97.5])
    return [float(low), float(high)]


# MixedLM's optimisers; each is tried and the usable fit (converged, finite likelihood, intercept and p) with the
# highest REML likelihood kept. Its default (BFGS, then L-BFGS) fails when the seeds' variance is near 0, the
# boundary: L-BFGS then reports "converged" with an infinite likelihood, an intercept that is not the data's (0.095
# for differences whose mean is -0.056) and p = nan, in 76 of 200 draws of pure noise (5 groups of 20 normal
# values); BFGS stops short of the boundary (a lower likelihood, 66.545 against 66.581 on KD-Net T1ce of the
# committed run). The derivative-free Powell and Nelder-Mead reach it.
MIXED_MODEL_OPTIMISERS = ("bfgs", "powell", "nm")


def random_intercept_check(groups: list) -> dict | None:
    """Cross-check of the seed-level test: the intercept of a linear mixed model of the case differences with a
    random intercept per replicate (statsmodels MixedLM, REML), with its Wald p. With few replicates its normal
    approximation is optimistic; it is shown, never used by `verdict`.

    {"mean", "p", "converged", "optimiser"}: of the MIXED_MODEL_OPTIMISERS' fits that converged to a finite
    likelihood, intercept and p, the one of highest likelihood; None with fewer than two replicates, constant
    values, or no such fit."""
    if len(groups) < 2:
        return None
    values = np.concatenate([np.asarray(g, float) for g in groups])
    labels = np.concatenate([np.full(len(g), i) for i, g in enumerate(groups)])
    if np.allclose(values, values[0]):
        return None
    best, best_likelihood = None, -np.inf
    for optimiser in MIXED_MODEL_OPTIMISERS:
        with warnings.catch_warnings():  # few groups: statsmodels warns about the boundary of the variance
            warnings.simplefilter("ignore")
            try:
                fit = sm.MixedLM(values, np.ones((len(values), 1)), groups=labels).fit(reml=True,
                                                                                      method=[optimiser])
                mean, p, likelihood = float(fit.params[0]), float(fit.pvalues[0]), float(fit.llf)
            except (np.linalg.LinAlgError, ValueError):
                continue
        if fit.converged and np.isfinite([mean, p, likelihood]).all() and likelihood > best_likelihood:
            best, best_likelihood = {"mean": mean, "p": p, "converged": True, "optimiser": optimiser}, likelihood
    return best


def replicate_comparison(student: dict, baseline: dict, seed: int = 0) -> dict:
    """Student minus baseline over the (replicate, case) pairs both have; student, baseline: {(replicate, case):
    value}, the replicate being the trained model (a seed, or a (seed, fold) model).

    {"n": pairs, "replicates", "mean_difference": the mean of the replicates' mean differences (the method's
    effect; with as many cases per replicate, the mean over the pairs), "median_difference": over the pairs,
    "per_replicate": {replicate: its mean difference}, "seed_level": seed_level_test of those,
    "hierarchical_ci95", "hierarchical_resamples", "mixed_model": random_intercept_check, "case_level":
    paired_comparison over the pairs (descriptive)}."""
    pairs = sorted(set(student) & set(baseline), key=lambda p: (str(p[0]), str(p[1])))
    by_replicate = {}
    for replicate, case in pairs:
        by_replicate.setdefault(str(replicate), []).append(student[(replicate, case)] - baseline[(replicate, case)])
    groups = list(by_replicate.values())
    differences = np.concatenate(groups) if groups else np.array([])
    case_level = paired_comparison([student[p] for p in pairs], [baseline[p] for p in pairs], seed)
    per_replicate = {replicate: float(np.mean(d)) for replicate, d in by_replicate.items()}
    return {"n": int(len(differences)), "replicates": len(groups),
            "mean_difference": float(np.mean(list(per_replicate.values()))),
            "median_difference": float(np.median(differences)), "per_replicate": per_replicate,
            "seed_level": seed_level_test(per_replicate.values()),
            "hierarchical_ci95": hierarchical_bootstrap_ci(groups, seed),
            "hierarchical_resamples": HIERARCHICAL_RESAMPLES,
            "mixed_model": random_intercept_check(groups),
            "case_level": {key: case_level[key] for key in ("ci95", "wilcoxon_p", "ttest_p")}}


def holm_adjust(p_values: dict) -> dict:
    """{name: Holm-adjusted p} of one family of comparisons (statsmodels' multipletests, method "holm"); a None p
    (no test) stays None and does not count in the family."""
    tested = {name: p for name, p in p_values.items() if p is not None}
    adjusted = dict(zip(tested, multipletests(list(tested.values()), method="holm")[1])) if tested else {}
    return {name: (float(adjusted[name]) if name in adjusted else None) for name in p_values}


class Verdict(NamedTuple):
    direction: str | None  # "better", "worse" or None (no significant difference, or no knowledge to transfer)
    failed: tuple  # the conditions that failed, as the sentences say them
    # False: a distilled student whose teacher is not better than the baseline there (`distillation_verdict`)
    knowledge: bool = True
    # False: one trained model per method, where no test can decide (its case-level figures only describe it)
    tested: bool = True

    @property
    def text(self) -> str:
        """'better', 'worse', 'no significant difference at this budget (why)', 'no knowledge to transfer at
        this budget (why)' or 'untested (why)'."""
        if self.direction:
            return self.direction
        said = UNTESTED if not self.tested else NO_DIFFERENCE if self.knowledge else NO_KNOWLEDGE
        return f"{said} ({self.why})"

    @property
    def why(self) -> str:
        """The failed conditions, as the parenthesis after a verdict that is neither better nor worse says them."""
        return "; ".join(self.failed)

    @property
    def word(self) -> str:
        """The verdict in a table cell: 'better', 'worse', 'no significant difference', 'no knowledge to
        transfer' or 'untested'."""
        if not self.tested:
            return UNTESTED
        return self.direction or ("no significant difference" if self.knowledge else "no knowledge to transfer")


def verdict(comparison: dict) -> Verdict:
    """The one rule by which a comparison (`replicate_comparison`) is called better or worse. It needs all of:

    - the seed-level t-test over the trained models at p < 0.05 (so at least two replicates);
    - the hierarchical bootstrap 95 % CI excluding 0;
    - the mean difference, the median case difference and all but at most one replicate pointing the same way.

    Otherwise it is "no significant difference at this budget", with each failed condition named. The case-level
    tests never decide: they count the cases of one trained model as independent."""
    level, interval = comparison["seed_level"], comparison["hierarchical_ci95"]
    mean = comparison["mean_difference"]
    sign = np.sign(mean)
    if comparison["replicates"] < 2:
        return Verdict(None, ("one trained model per method: a verdict needs the seed-level test over two or more",),
                       tested=False)
    failed = []
    if level["p"] is None:
        failed.append("no spread between the trained models: the seed-level test is undefined")
    elif level["p"] >= ALPHA:
        failed.append(f"seed-level p = {format_p(level['p'])} over {comparison['replicates']} trained models")
    if interval[0] <= 0 <= interval[1]:
        failed.append("the hierarchical CI includes 0")
    if sign == 0:
        failed.append("the mean difference is 0")
    elif np.sign(comparison["median_difference"]) != sign:
        failed.append(f"the median difference ({comparison['median_difference']:+.3f}) and the mean "
                      f"({mean:+.3f}) point different ways")
    against = sum(np.sign(d) != sign for d in comparison["per_replicate"].values())
    if sign != 0 and against > 1:
        failed.append(f"{against} of {comparison['replicates']} trained models point the other way")
    if failed:
        return Verdict(None, tuple(failed))
    return Verdict("better" if sign > 0 else "worse", ())


def distillation_verdict(comparison: dict, teacher_against_baseline: dict | None) -> Verdict:
    """The verdict of a model that learns from a teacher, on one region and modality: `verdict(comparison)`, unless
    the teacher itself is not better than the unimodal baseline there by the same rule
    (`verdict(teacher_against_baseline)`, the teacher minus the baseline over the same trained models). A teacher
    that is not better has nothing to pass on, so any difference of the student there is not an effect of
    distillation: the answer is then "no knowledge to transfer at this budget", whatever the student's own figures.

    With fewer than two trained models that question cannot be answered, and neither can the student's (`verdict`
    says so); without a teacher-against-baseline comparison the student's own verdict stands."""
    if teacher_against_baseline is not None and teacher_against_baseline["replicates"] >= 2:
        teacher = verdict(teacher_against_baseline)
        if teacher.direction != "better":
            level = teacher_against_baseline["seed_level"]["p"]
            reason = f"the teacher is {'worse than' if teacher.direction == 'worse' else 'not better than'} the " \
                     f"baseline there, {teacher_against_baseline['mean_difference']:+.3f}, seed-level p = " \
                     f"{format_p(level)}"
            return Verdict(None, (reason,), knowledge=False)
    return verdict(comparison)


def format_p(value) -> str:
    """A p-value in tables and sentences: two significant digits; "n/a" when the test was undefined."""
    return "n/a" if value is None else f"{value:.2g}"
