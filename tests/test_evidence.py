"""The evidence protocol's statistics on synthetic per-case scores whose answers are known."""
import numpy as np
import pytest

from nnunet_protokd.evidence import bernoulli_kl, compare_with_baseline, gradient_shares, headline, plateaus, \
    pooled_dice

REGIONS = ["WT", "TC", "ET"]


def summary(per_method: dict) -> dict:
    """A report summary.json with the given {key: {case: (WT, TC, ET)}} Dice values."""
    return {"regions": REGIONS, "results": {
        key: {"per_case": {case: {r: {"dice": v} for r, v in zip(REGIONS, values)} for case, values in cases.items()}}
        for key, cases in per_method.items()}}


def scores(rng, offset):
    return {f"case_{i}": tuple(np.clip(0.6 + offset + rng.normal(0, 0.05, 3), 0, 1)) for i in range(10)}


def test_a_better_student_is_reported_better_and_an_equal_one_as_no_difference():
    rng = np.random.default_rng(0)
    summaries = {}
    for seed in (0, 1, 2):
        baseline = scores(rng, 0.0)
        summaries[seed] = summary({
            "unimodal:T1": baseline,
            "protokd:T1": {c: tuple(v + 0.05 + rng.normal(0, 0.01) for v in values) for c, values in baseline.items()},
            "kdnet:T1": {c: tuple(v + rng.normal(0, 0.02) for v in values) for c, values in baseline.items()},
            "teacher": scores(rng, 0.2)})
    dice = pooled_dice(summaries, REGIONS)
    assert len(dice["protokd:T1"]) == 30 and (1, "case_3") in dice["kdnet:T1"]
    comparisons = compare_with_baseline(dice, REGIONS)
    assert set(comparisons) == {"protokd:T1", "kdnet:T1"}  # teacher and baseline have no baseline
    better = comparisons["protokd:T1"]["mean"]
    assert better["n"] == 30 and better["ci95"][0] > 0.04 and better["wilcoxon_p"] < 1e-4
    # per-seed mean differences: the variation between training runs, which the case-level test does not see
    assert len(better["per_seed"]) == 3 and all(0.04 < d < 0.06 for d in better["per_seed"].values())
    assert comparisons["kdnet:T1"]["mean"]["ci95"][0] < 0 < comparisons["kdnet:T1"]["mean"]["ci95"][1]
    sentence = headline({"comparisons": comparisons})
    assert "ProtoKD (T1): better than the unimodal baseline, mean Dice +0.05" in sentence
    assert "KD-Net (T1): no significant difference at this budget from the unimodal baseline" in sentence
    # the demo quotes the committed evidence run beside its own figures
    one_seed = compare_with_baseline({k: {p: v for p, v in d.items() if p[0] == 0} for k, d in dice.items()}, REGIONS)
    demo = headline({"comparisons": one_seed}, {"settings": {"seeds": [0, 1, 2]}, "comparisons": comparisons})
    assert "n = 10 (seed, case) pairs (the evidence run, seeds 0, 1, 2: +0.05" in demo and "per seed" not in demo


def test_bernoulli_kl_is_zero_for_agreement_positive_otherwise_and_finite_for_certain_probabilities():
    teacher = np.array([0.0, 0.3, 1.0, 0.9])
    assert np.allclose(bernoulli_kl(teacher, teacher), 0, atol=1e-12)
    disagreement = bernoulli_kl(teacher, 1 - teacher)
    assert np.all(np.isfinite(disagreement)) and np.all(disagreement[[0, 2, 3]] > 1)
    # KL(t || s) of Bernoulli distributions, by hand for t = 0.3, s = 0.7
    assert disagreement[1] == pytest.approx(0.3 * np.log(0.3 / 0.7) + 0.7 * np.log(0.7 / 0.3))


def test_plateau_and_gradient_shares_from_learning_curves():
    rising = {"pseudo_dice": list(np.linspace(0, 0.5, 10)), "grad_norms": {}}
    flat = {"pseudo_dice": [0.1, 0.5] + [0.8] * 8, "grad_norms": {"seg_loss": [3.0, 1.0], "kd_loss": [1.0, 1.0]}}
    curves = {seed: {"unimodal:T1": rising, "protokd:T1": flat} for seed in (0, 1)}
    plateau = plateaus(curves)
    assert plateau["protokd:T1"]["change_over_last_fifth"] == pytest.approx(0)
    assert plateau["unimodal:T1"]["change_over_last_fifth"] == pytest.approx(2 * 0.5 / 9)
    shares = gradient_shares(curves)
    assert set(shares) == {"protokd:T1"}
    assert shares["protokd:T1"]["first_epoch"] == {"seg_loss": 0.75, "kd_loss": 0.25}
    assert shares["protokd:T1"]["last_epoch"] == {"seg_loss": 0.5, "kd_loss": 0.5}
