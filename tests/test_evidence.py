"""The evidence protocol's statistics on synthetic per-case scores whose answers are known."""
import json
import os
from dataclasses import asdict
from unittest import mock

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from nnunet_protokd.evaluation.statistics import (
    detectable_difference,
    format_p,
    hierarchical_bootstrap_ci,
    random_intercept_check,
    replicate_comparison,
    verdict,
)
from nnunet_protokd.protocol.evidence import (
    EvidenceSettings,
    bernoulli_kl,
    compare_with_baseline,
    evidence_from_raw,
    forest_rows,
    gradient_shares,
    headline,
    plateau_status,
    plateaus,
    pooled_dice,
    student_verdict,
    write_evidence_report,
)

REGIONS = ["WT", "TC", "ET"]


def per_case(cases: dict) -> dict:
    """A report's per-case scores of one model from {case: (WT, TC, ET)} Dice values."""
    return {case: {r: {"dice": float(v), "hd95": 2.0, "hd95_one_empty": False} for r, v in zip(REGIONS, values)}
            for case, values in cases.items()}


def scores(rng, offset, n=10):
    return {f"case_{i}": tuple(np.clip(0.6 + offset + rng.normal(0, 0.05, 3), 0, 1)) for i in range(n)}


def shifted(baseline: dict, shift) -> dict:
    """The baseline's cases plus `shift(case)` on every region."""
    return {c: tuple(v + shift(c) for v in values) for c, values in baseline.items()}


def paired(differences: dict, rng) -> tuple:
    """{(seed, case): value} of a baseline and a student whose difference is `differences[seed][i]` on case i."""
    baseline, student = {}, {}
    for seed, values in differences.items():
        for i, d in enumerate(values):
            baseline[(seed, f"case_{i}")] = b = rng.uniform(0.5, 0.8)
            student[(seed, f"case_{i}")] = b + d
    return student, baseline


def test_a_better_student_is_reported_better_and_an_equal_one_as_no_difference():
    rng = np.random.default_rng(0)
    raw = {}
    for seed in ("0", "1", "2"):
        baseline = scores(rng, 0.0)
        raw[seed] = {"unimodal:T1": per_case(baseline),
                     "protokd:T1": per_case(shifted(baseline, lambda c: 0.05 + rng.normal(0, 0.01))),
                     "kdnet:T1": per_case(shifted(baseline, lambda c: rng.normal(0, 0.02))),
                     "teacher": per_case(scores(rng, 0.2))}
    dice = pooled_dice(raw, REGIONS)
    assert len(dice["protokd:T1"]) == 30 and ("1", "case_3") in dice["kdnet:T1"]
    comparisons = compare_with_baseline(dice, REGIONS)
    assert set(comparisons) == {"protokd:T1", "kdnet:T1"}  # teacher and baseline have no baseline
    better = comparisons["protokd:T1"]["mean"]
    assert better["n"] == 30 and better["replicates"] == 3 and better["hierarchical_ci95"][0] > 0.04
    # the seed is the unit: the per-seed mean differences and a t-test over them (df = 2)
    assert len(better["per_replicate"]) == 3 and all(0.04 < d < 0.06 for d in better["per_replicate"].values())
    assert better["seed_level"]["p"] == pytest.approx(stats.ttest_1samp(list(better["per_replicate"].values()),
                                                                         0).pvalue)
    assert better["seed_level"]["df"] == 2 and better["case_level"]["wilcoxon_p"] < 1e-4  # kept, descriptive
    equal = comparisons["kdnet:T1"]["mean"]
    assert equal["hierarchical_ci95"][0] < 0 < equal["hierarchical_ci95"][1]
    sentence = headline({"comparisons": comparisons})
    assert "ProtoKD (T1): better than the unimodal baseline, mean Dice +0.05" in sentence
    assert "KD-Net (T1): no significant difference at this budget (" in sentence
    assert "the hierarchical CI includes 0" in sentence and "smallest detectable difference" in sentence
    # one seed (the demo): no seed-level verdict, said plainly; the committed run's figures beside its own
    one_seed = compare_with_baseline({k: {p: v for p, v in d.items() if p[0] == "0"} for k, d in dice.items()},
                                     REGIONS)
    assert verdict(one_seed["protokd:T1"]["mean"]).direction is None
    demo = headline({"comparisons": one_seed}, {"settings": {"seeds": [0, 1, 2]}, "comparisons": comparisons})
    assert "- ProtoKD (T1): untested against the unimodal baseline (one trained model per method: a verdict needs " \
           "the seed-level test over two or more), mean Dice" in demo
    assert "no significant difference" not in demo.split("(the evidence run")[0]  # one model is not tested
    assert "(descriptive: the cases share one trained model) (the evidence run, seeds 0, 1, 2: better, +0.05" in demo


def test_an_earlier_report_without_the_seed_level_statistics_is_quoted_from_its_per_seed_means():
    """The committed evidence.json predates the seed-level statistics: the demo recomputes its seed-level test."""
    earlier = {"n": 60, "mean_difference": -0.074, "ci95": [-0.101, -0.051], "wilcoxon_p": 9.5e-10,
               "per_seed": {"0": -0.072, "1": -0.039, "2": -0.112}}
    rng = np.random.default_rng(1)
    student, baseline = paired({0: rng.normal(-0.07, 0.02, 5)}, rng)
    ours = compare_with_baseline({"kdnet:T1ce": {p: {"mean": v} for p, v in student.items()},
                                  "unimodal:T1ce": {p: {"mean": v} for p, v in baseline.items()}}, [])
    demo = headline({"comparisons": ours}, {"settings": {"seeds": [0, 1, 2]},
                                            "comparisons": {"kdnet:T1ce": {"mean": earlier}}})
    p = stats.ttest_1samp([-0.072, -0.039, -0.112], 0).pvalue
    assert f"seeds 0, 1, 2: -0.074, seed-level p = {p:.2g} over 3 trained models" in demo and p > 0.05


def test_the_demo_finds_the_committed_evidence_run_and_quotes_it():
    """The demo's result sentence quotes docs/evidence/evidence.json: the path must reach it from the package."""
    from nnunet_protokd.protocol.demo import COMMITTED_EVIDENCE
    from nnunet_protokd.protocol.evidence import reference_figures
    with open(COMMITTED_EVIDENCE) as f:
        reference = reference_figures(json.load(f))
    assert {"protokd:T1ce", "kdnet:T1ce"} <= set(reference["comparisons"]) and len(reference["settings"]["seeds"]) > 1
    # against modality dropout too: the demo's one seed beside the committed run's five
    committed = reference["comparisons_with_modality_dropout"]["protokd:T1ce"]["mean"]
    rng = np.random.default_rng(4)
    one_seed = replicate_comparison(*paired({0: rng.normal(0.04, 0.02, 20)}, rng))
    demo = headline({"comparisons": {"protokd:T1ce": {"mean": one_seed}},
                     "comparisons_with_modality_dropout": {"protokd:T1ce": {"mean": one_seed}}}, reference)
    rival = demo.split("untested against modality dropout")[1]
    assert f"(the evidence run: {verdict(committed).word}, {committed['mean_difference']:+.3f}" in rival


def test_a_mean_pulled_up_by_a_few_cases_against_the_median_is_not_called_better():
    """The direction example: 50 differences of -0.01 and 10 of +0.2 over 3 seeds. The old rule (Wilcoxon p < 0.05
    and the CI of the mean excluding 0, the direction from the mean) called it better."""
    rng = np.random.default_rng(2)
    student, baseline = paired({0: [0.2] * 4 + [-0.01] * 16, 1: [0.2] * 3 + [-0.01] * 17,
                                2: [0.2] * 3 + [-0.01] * 17}, rng)
    c = replicate_comparison(student, baseline)
    assert c["mean_difference"] == pytest.approx(0.025) and c["median_difference"] == pytest.approx(-0.01)
    assert c["case_level"]["wilcoxon_p"] < 0.05 and c["case_level"]["ci95"][0] > 0  # what the old rule saw
    decision = verdict(c)
    assert decision.direction is None
    assert decision.failed == ("the median difference (-0.010) and the mean (+0.025) point different ways",)
    sentence = headline({"comparisons": {"protokd:T1": {"mean": c}}})
    assert sentence.startswith("- ProtoKD (T1): no significant difference at this budget (the median difference")


@pytest.mark.parametrize("draw", [2, 3, 8])
def test_the_random_intercept_cross_check_fits_where_seeds_barely_differ(draw):
    """Five seeds of 20 differences with no seed effect, the boundary of the model: statsmodels' default optimiser
    reported "converged" there with an infinite likelihood, an intercept not the data's and p = nan (these draws;
    the committed run showed nan for three comparisons). With balanced seeds the intercept is the grand mean."""
    rng = np.random.default_rng(draw)
    groups = [rng.normal(-0.05, 0.15, 20) for _ in range(5)]
    check = random_intercept_check(groups)
    assert check is not None and check["converged"]
    assert check["mean"] == pytest.approx(np.mean(np.concatenate(groups)), abs=1e-6)
    assert 0 < check["p"] < 1


def test_the_random_intercept_cross_check_counts_seed_spread():
    """Seeds that differ: the model's p for the intercept is far above the t-test that counts the 100 cases."""
    rng = np.random.default_rng(5)
    groups = [rng.normal(offset, 0.02, 20) for offset in (0.06, -0.01, 0.05, 0.0, 0.07)]
    check = random_intercept_check(groups)
    pooled = stats.ttest_1samp(np.concatenate(groups), 0).pvalue
    assert check["mean"] == pytest.approx(np.mean(np.concatenate(groups)), abs=1e-6)
    assert check["p"] > 100 * pooled


def test_three_seeds_with_a_consistent_effect_are_better_and_holm_is_shown_per_modality():
    rng = np.random.default_rng(3)
    raw = {}
    for seed in ("0", "1", "2"):
        t1, t1ce = scores(rng, 0.0, 20), scores(rng, 0.1, 20)
        raw[seed] = {"unimodal:T1": per_case(t1), "unimodal:T1ce": per_case(t1ce),
                     "protokd:T1": per_case(shifted(t1, lambda c: 0.04 + rng.normal(0, 0.02))),
                     "kdnet:T1": per_case(shifted(t1, lambda c: rng.normal(0, 0.02))),
                     "protokd-seg_only:T1": per_case(shifted(t1, lambda c: rng.normal(0, 0.02))),
                     "protokd:T1ce": per_case(shifted(t1ce, lambda c: -0.04 + rng.normal(0, 0.02))),
                     "teacher": per_case(scores(rng, 0.2, 20))}
    evidence = evidence_from_raw(raw_values(raw), {}, {})
    protokd = evidence["comparisons"]["protokd:T1"]["mean"]
    assert verdict(protokd).direction == "better" and verdict(protokd).failed == ()
    assert verdict(evidence["comparisons"]["protokd:T1ce"]["mean"]).direction == "worse"
    assert verdict(evidence["comparisons"]["kdnet:T1"]["mean"]).direction is None
    # ProtoKD against its control too (methods.CONTROLS); not the control against itself
    assert set(evidence["comparisons_with_control"]) == {"protokd:T1"}
    # the T1 family of the mean: ProtoKD, KD-Net and the control against the baseline, ProtoKD against the control
    family = [evidence["comparisons"][k]["mean"] for k in ("protokd:T1", "kdnet:T1", "protokd-seg_only:T1")]
    family.append(evidence["comparisons_with_control"]["protokd:T1"]["mean"])
    expected = multipletests([c["seed_level"]["p"] for c in family], method="holm")[1]
    assert [c["holm_p"] for c in family] == pytest.approx(list(expected))
    assert protokd["seed_level"]["p"] < protokd["holm_p"] < 0.05
    # T1ce is a family of its own: one comparison, nothing to adjust
    t1ce = evidence["comparisons"]["protokd:T1ce"]["mean"]
    assert t1ce["holm_p"] == pytest.approx(t1ce["seed_level"]["p"])
    assert "seed-level p = " in evidence["headline"] and "(Holm " in evidence["headline"]


def test_a_case_level_effect_that_the_seeds_do_not_share_is_no_difference_and_says_why():
    """Pseudo-replication: 20 cases per seed make the case-level tests certain of an effect two seeds show and one
    does not."""
    rng = np.random.default_rng(4)
    student, baseline = paired({s: rng.normal(effect, 0.01, 20) for s, effect in enumerate((0.06, 0.05, -0.01))},
                               rng)
    c = replicate_comparison(student, baseline)
    assert c["case_level"]["wilcoxon_p"] < 1e-4 and c["case_level"]["ci95"][0] > 0
    decision = verdict(c)
    assert decision.direction is None
    assert decision.failed[0].startswith("seed-level p = 0.") and " over 3 trained models" in decision.failed[0]
    assert "the hierarchical CI includes 0" in decision.failed
    assert decision.text.startswith("no significant difference at this budget (seed-level p = ")
    # two of five seeds against the mean: the direction condition fails too
    student, baseline = paired({s: rng.normal(e, 0.01, 20) for s, e in enumerate((0.1, 0.1, 0.1, -0.01, -0.01))},
                               rng)
    assert "2 of 5 trained models point the other way" in verdict(replicate_comparison(student, baseline)).failed


def test_the_hierarchical_bootstrap_resamples_seeds_and_the_detectable_difference_shrinks_with_seeds():
    # no spread within a seed: the interval is that of resampling three seed means
    assert hierarchical_bootstrap_ci([[0.0] * 5, [0.1] * 5, [0.2] * 5]) == pytest.approx([0.0, 0.2])
    groups = [np.random.default_rng(i).normal(0.02, 0.05, 20) for i in range(3)]
    assert hierarchical_bootstrap_ci(groups, seed=5) == hierarchical_bootstrap_ci(groups, seed=5)  # seeded
    # 80 % power at alpha 0.05 (two-sided): close to (t_0.975 + t_0.8) sd / sqrt(k) with df = k - 1
    for k in (3, 5, 10):
        approximate = (stats.t.ppf(0.975, k - 1) + stats.t.ppf(0.8, k - 1)) * 0.01 / np.sqrt(k)
        assert detectable_difference(0.01, k) == pytest.approx(approximate, rel=0.1)
    assert detectable_difference(0.01, 3) > detectable_difference(0.01, 5) > detectable_difference(0.01, 10)
    assert detectable_difference(0.01, 1) is None


def raw_values(scores_by_seed: dict) -> dict:
    """An evidence.json's "raw" section around per-case scores: agreement and learning curves made up."""
    agreement, curves = {}, {}
    for seed, per_key in scores_by_seed.items():
        for key, cases in per_key.items():
            measures = {case: {"entropy": 0.1 + 0.01 * i, "volume_ratio": {r: 1.0 + 0.1 * i for r in REGIONS}}
                        for i, case in enumerate(cases)}
            if key != "teacher":
                for i, case in enumerate(cases):
                    measures[case].update(dice=0.7 + 0.01 * i + 0.02 * ("protokd" in key), kl=0.2 - 0.001 * i)
            agreement.setdefault(seed, {})[key] = measures
            curves.setdefault(seed, {})[key] = {"iterations": [25, 50, 75, 100, 125],
                                                "pseudo_dice": [0.1, 0.4, 0.6, 0.65, 0.66],
                                                "grad_norms": {"seg_loss": [3.0, 1.0], "kd_loss": [1.0, 1.0]}
                                                if "protokd" in key else {}}
    return {"regions": REGIONS, "scores": scores_by_seed, "teacher_agreement": agreement, "learning_curves": curves}


def test_the_report_is_regenerated_from_evidence_json_alone(tmp_path):
    """evidence.json keeps every per-case value; `evidence --report-only FILE -o FOLDER` recomputes the same report
    from it, and the headline's figures follow from the raw Dice by hand."""
    from nnunet_protokd.cli import main
    rng = np.random.default_rng(5)
    raw = {}
    for seed in ("0", "1", "2"):
        baseline = scores(rng, 0.0)
        raw[seed] = {"unimodal:T1": per_case(baseline), "teacher": per_case(scores(rng, 0.2)),
                     "protokd:T1": per_case(shifted(baseline, lambda c: -0.03 + rng.normal(0, 0.02))),
                     "protokd-seg_only:T1": per_case(shifted(baseline, lambda c: rng.normal(0, 0.02)))}
    settings = json.loads(json.dumps({**asdict(EvidenceSettings(str(tmp_path / "run"))), "wall_time_seconds": 60,
                                      "runs": [{"variants": [], "seeds": [0, 1, 2], "wall_time_seconds": 60}]}))
    audit = {"cases": 2, "seed": 0, "cnr": {"WT/brain": {"T1": 1.0, "T1ce": 2.0}}, "inter_rater_dice": {"WT": 0.8}}
    first = write_evidence_report(evidence_from_raw(raw_values(raw), settings, audit), str(tmp_path / "first"))
    stored = json.loads((tmp_path / "first" / "evidence.json").read_text())
    assert stored["raw"]["scores"]["2"]["protokd:T1"]["case_4"]["ET"]["hd95"] == 2.0
    assert set(stored["raw"]["teacher_agreement"]["1"]["protokd:T1"]["case_0"]) == {"entropy", "volume_ratio",
                                                                                     "dice", "kl"}
    assert main(["evidence", "--report-only", tmp_path / "first" / "evidence.json", "-o", tmp_path / "again"]) == 0
    assert (tmp_path / "again" / "evidence.md").read_text() == open(first).read()
    assert json.loads((tmp_path / "again" / "evidence.json").read_text()) == stored
    for figure in ("learning_curves.png", "paired_differences.png"):
        assert (tmp_path / "again" / figure).stat().st_size > 10_000
    # the headline by hand from the raw Dice: per seed, the mean over cases of (student - baseline) of the mean
    # over regions; a t-test over the three
    per_seed = []
    for seed, per_key in stored["raw"]["scores"].items():
        student, baseline = per_key["protokd:T1"], per_key["unimodal:T1"]
        per_seed.append(np.mean([np.mean([student[c][r]["dice"] - baseline[c][r]["dice"] for r in REGIONS])
                                 for c in baseline]))
    p = stats.ttest_1samp(per_seed, 0).pvalue
    assert f"seed-level p = {p:.2g}" in stored["headline"]
    assert f"mean Dice {np.mean(per_seed):+.3f} [" in stored["headline"]
    assert f"per seed {', '.join(f'{d:+.3f}' for d in per_seed)}" in stored["headline"]
    assert "## Paired difference to the control" in open(first).read()
    # a run stopped while rewriting its report leaves the previous evidence.json whole (one rename), nothing beside
    with mock.patch("os.replace", side_effect=KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        write_evidence_report({**stored, "headline": "a newer run"}, str(tmp_path / "first"))
    assert json.loads((tmp_path / "first" / "evidence.json").read_text()) == stored
    assert not list((tmp_path / "first").glob(".tmp_*"))


# what a report needs beside the raw values: an evidence run's settings and a phantom audit
SETTINGS = json.loads(json.dumps({**asdict(EvidenceSettings("/evidence")), "wall_time_seconds": 60,
                                  "runs": [{"variants": [], "seeds": [0, 1, 2], "wall_time_seconds": 60}]}))
AUDIT = {"cases": 2, "seed": 0, "cnr": {"WT/brain": {"T1": 1.0, "T1ce": 2.0}}, "inter_rater_dice": {"WT": 0.8}}


def by_region(baseline: dict, shifts: tuple, rng, noise: float = 0.02) -> dict:
    """The baseline's cases plus shifts[i] (and noise) on region i."""
    return {c: tuple(v + shift + rng.normal(0, noise) for v, shift in zip(values, shifts))
            for c, values in baseline.items()}


def test_a_region_where_the_teacher_is_not_better_gets_no_knowledge_to_transfer_instead_of_a_verdict(tmp_path):
    """On T1 the teacher beats the baseline on WT and ET but not on TC: the students get verdicts on WT, ET and the
    mean, and "no knowledge to transfer" on TC, however clear their own TC difference. On T1ce the teacher is no
    better anywhere: no verdict at all for its distilled students. Models that learn from no teacher (the control)
    keep their own verdicts."""
    rng = np.random.default_rng(6)
    raw = {}
    for seed in ("0", "1", "2"):
        t1 = scores(rng, 0.0, 20)
        # the teacher, on the same cases: better than the T1 baseline on WT and ET only; the T1ce baseline is as
        # good as the teacher everywhere
        teacher = by_region(t1, (0.3, 0.0, 0.2), rng)
        t1ce = by_region(teacher, (0.0, 0.0, 0.0), rng)
        raw[seed] = {"unimodal:T1": per_case(t1), "unimodal:T1ce": per_case(t1ce), "teacher": per_case(teacher),
                     "protokd:T1": per_case(by_region(t1, (0.05, 0.05, 0.05), rng)),
                     "protokd-seg_only:T1": per_case(by_region(t1, (0.05, 0.05, 0.05), rng)),
                     "protokd:T1ce": per_case(by_region(t1ce, (0.05, 0.05, 0.05), rng))}
    evidence = evidence_from_raw(raw_values(raw), {}, {})
    knowledge = evidence["knowledge"]
    assert list(knowledge) == ["T1", "T1ce"]
    assert verdict(knowledge["T1"]["WT"]).direction == "better" and verdict(knowledge["T1"]["TC"]).direction is None
    assert knowledge["T1"]["WT"]["mean_difference"] == pytest.approx(0.3, abs=0.01)
    student = evidence["comparisons"]["protokd:T1"]
    assert verdict(student["TC"]).direction == "better"  # its own figures: +0.05 on every seed
    assert student_verdict(knowledge, "protokd:T1", "WT", student["WT"]).direction == "better"
    assert student_verdict(knowledge, "protokd:T1", "mean", student["mean"]).direction == "better"
    no_knowledge = student_verdict(knowledge, "protokd:T1", "TC", student["TC"])
    assert no_knowledge.direction is None and not no_knowledge.knowledge
    tc = knowledge["T1"]["TC"]
    assert no_knowledge.text == (f"no knowledge to transfer at this budget (the teacher is not better than the "
                                 f"baseline there, {tc['mean_difference']:+.3f}, seed-level p = "
                                 f"{tc['seed_level']['p']:.2g})")
    # the control learns from no teacher: its own verdict stands on TC
    control = evidence["comparisons"]["protokd-seg_only:T1"]["TC"]
    assert student_verdict(knowledge, "protokd-seg_only:T1", "TC", control).direction == "better"
    # T1ce: the teacher is not better on any region or the mean
    assert all(verdict(c).direction != "better" for c in knowledge["T1ce"].values())
    sentence = evidence["headline"]
    assert sentence.startswith("Is there knowledge to transfer? T1: the teacher is better than the baseline on WT, "
                               "ET, mean Dice, not on TC (TC ")
    assert "no knowledge to transfer at this budget there, and no verdict for its distilled students; T1ce: " \
           "the teacher is not better than the baseline on any region or the mean (WT " in sentence
    assert "ProtoKD (T1): better than the unimodal baseline, mean Dice +0.05" in sentence
    assert "ProtoKD (T1ce): no knowledge to transfer at this budget (the teacher is " in sentence
    assert "so no verdict against the unimodal baseline, mean Dice +0.05" in sentence
    # the tables and the forest plot through the same function
    text = open(write_evidence_report(evidence_from_raw(raw_values(raw), SETTINGS, AUDIT), str(tmp_path))).read()
    assert "## Is there knowledge to transfer? The teacher against the unimodal baseline" in text
    row = next(line for line in text.splitlines() if line.startswith("| T1 | ProtoKD | 3 | 60 | "))
    wt, tc = row.split(" | ")[4:6]
    assert wt.endswith(": better") and tc.endswith(": no knowledge to transfer")
    headline_row = next(line for line in text.splitlines() if line.startswith("| T1ce | ProtoKD | 60 | "))
    assert " | no knowledge to transfer | " in headline_row
    rows = {label: verdicts for label, _, verdicts in forest_rows(evidence)}
    assert rows["ProtoKD (T1)"]["WT"].direction == "better" and not rows["ProtoKD (T1)"]["TC"].knowledge
    assert rows["ProtoKDTrainer, L_seg only (control) (T1)"]["TC"].direction == "better"


def test_with_one_seed_knowledge_is_untested_and_the_students_keep_the_one_seed_answer(tmp_path):
    rng = np.random.default_rng(7)
    baseline = scores(rng, 0.0, 20)
    raw = {"0": {"unimodal:T1ce": per_case(baseline), "teacher": per_case(by_region(baseline, (0.3, 0, 0.2), rng)),
                 "protokd:T1ce": per_case(by_region(baseline, (0.05, 0.05, 0.05), rng))}}
    evidence = evidence_from_raw(raw_values(raw), {}, {})
    lead = evidence["knowledge"]["T1ce"]["WT"]["mean_difference"]
    assert 0.25 < lead < 0.35
    assert evidence["headline"].startswith("Is there knowledge to transfer? T1ce: untested with one trained model "
                                           f"each (the teacher minus the baseline, descriptive: WT {lead:+.3f}")
    assert "- ProtoKD (T1ce): untested against the unimodal baseline (one trained model per method" in \
        evidence["headline"]
    # the tables say so too: the knowledge table's cells and the student's verdict column
    text = open(write_evidence_report(evidence_from_raw(raw_values(raw), SETTINGS, AUDIT), str(tmp_path))).read()
    text = text.splitlines()
    knowledge_row = next(row for row in text if row.startswith("| T1ce | ") and "): untested |" in row)
    assert knowledge_row.count(": untested") == 4  # WT, TC, ET, mean
    student_rows = [row for row in text if row.startswith("| T1ce | ProtoKD | 1 | 20 | ")]
    assert student_rows and all(row.endswith(" | untested |") for row in student_rows)


def test_modality_dropout_is_compared_with_the_baseline_and_each_distilled_student_with_it(tmp_path):
    """Modality dropout, trained once per seed and predicted from each student modality: against the baseline like
    any model, and each distilled student (not a variant) minus it, seed by seed, in one Holm family per modality."""
    rng = np.random.default_rng(8)
    raw = {}
    for seed in ("0", "1", "2"):
        t1 = scores(rng, 0.0, 20)
        moddrop = by_region(t1, (0.04, 0.04, 0.04), rng)
        raw[seed] = {"unimodal:T1": per_case(t1), "teacher": per_case(by_region(t1, (0.3, 0.2, 0.2), rng)),
                     "moddrop:T1": per_case(moddrop),
                     "protokd:T1": per_case(by_region(t1, (0.0, 0.0, 0.0), rng)),
                     "kdnet:T1": per_case(by_region(t1, (-0.05, -0.05, -0.05), rng)),
                     "protokd-no_kd:T1": per_case(by_region(t1, (0.0, 0.0, 0.0), rng))}
    evidence = evidence_from_raw(raw_values(raw), SETTINGS, AUDIT)
    assert "moddrop:T1" in evidence["comparisons"]  # against the unimodal baseline, like every model
    assert verdict(evidence["comparisons"]["moddrop:T1"]["mean"]).direction == "better"
    against = evidence["comparisons_with_modality_dropout"]
    assert set(against) == {"protokd:T1", "kdnet:T1"}
    # the distilled student minus modality dropout, per seed, by hand from the raw values
    for seed in ("0", "1", "2"):
        student, rival = raw[seed]["kdnet:T1"], raw[seed]["moddrop:T1"]
        by_hand = np.mean([np.mean([student[c][r]["dice"] - rival[c][r]["dice"] for r in REGIONS]) for c in student])
        assert against["kdnet:T1"]["mean"]["per_replicate"][seed] == pytest.approx(by_hand)
    assert against["kdnet:T1"]["mean"]["mean_difference"] == pytest.approx(-0.09, abs=0.01)
    assert student_verdict(evidence["knowledge"], "kdnet:T1", "mean", against["kdnet:T1"]["mean"]).direction == \
        "worse"
    assert student_verdict(evidence["knowledge"], "protokd:T1", "mean", against["protokd:T1"]["mean"]).direction \
        == "worse"
    # one Holm family per modality and region: the baseline comparisons and those against modality dropout together
    family = [evidence["comparisons"][k]["mean"] for k in ("moddrop:T1", "protokd:T1", "kdnet:T1", "protokd-no_kd:T1")]
    family += [against[k]["mean"] for k in ("protokd:T1", "kdnet:T1")]
    expected = multipletests([c["seed_level"]["p"] for c in family], method="holm")[1]
    assert [c["holm_p"] for c in family] == pytest.approx(list(expected))
    sentence = evidence["headline"]
    assert "Modality dropout (T1): better than the unimodal baseline, mean Dice +0.04" in sentence
    assert "KD-Net (T1): worse than the unimodal baseline, mean Dice -0.05" in sentence
    assert "; worse than modality dropout, mean Dice -0.09" in sentence
    rows = [label for label, _, _ in forest_rows(evidence)]
    assert rows.index("ProtoKD (T1) - modality dropout") == rows.index("ProtoKD (T1)") + 1
    assert "ProtoKD without L_kd (T1) - modality dropout" not in rows and "Modality dropout (T1)" in rows
    text = open(write_evidence_report(evidence, str(tmp_path))).read()
    assert "## Paired difference to modality dropout" in text
    kdnet = next(line for line in text.splitlines() if line.startswith("| T1 | KD-Net | 60 | "))
    rival_cell = kdnet.split(" | ")[9]  # the column against modality dropout
    assert rival_cell.startswith(f"{against['kdnet:T1']['mean']['mean_difference']:+.3f} [")
    assert rival_cell.endswith("): worse")
    assert "| T1 | Modality dropout | 60 | " in text


def test_evidence_on_a_converted_dataset_predicts_its_test_set_or_takes_the_folds_as_replicates(
        tmp_path, monkeypatch):
    """`evidence -d`: the user's nnU-Net folders and dataset, each seed's models its own; the held-out test set when
    the dataset has one, otherwise (or with folds given) each (seed, fold) model of the cross-validation is a
    replicate predicting its own validation cases."""
    from nnunet_protokd.protocol.evidence import Evidence
    for kind in ("raw", "preprocessed", "results"):
        (tmp_path / f"nnUNet_{kind}").mkdir()
        monkeypatch.setenv(f"nnUNet_{kind}", str(tmp_path / f"nnUNet_{kind}"))
    raw = tmp_path / "nnUNet_raw" / "Dataset990_Mine"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T1ce"}, "labels": {
        "background": 0, "tumour": 1}, "numTraining": 0, "file_ending": ".nii.gz"}))
    settings = EvidenceSettings(str(tmp_path / "evidence"), seeds=(0, 1), dataset="990")
    runner = Evidence(settings)
    assert os.environ["nnUNet_raw"] == str(tmp_path / "nnUNet_raw")  # the user's, not folders of the evidence run
    # no test set: nnU-Net's five folds, a (seed, fold) model each
    assert runner.cross_validation_folds() == (0, 1, 2, 3, 4)
    assert runner.replicates(1) == [(f"1/{fold}", fold) for fold in range(5)]
    experiment = runner.experiment(1)
    assert not experiment.evaluate_on_test_set and experiment.settings.folds == (0, 1, 2, 3, 4)
    assert experiment.settings.notes["evidence"] == {"seed": 1, "dataset": "990", "folds": [0, 1, 2, 3, 4]}
    (raw / "imagesTs").mkdir()
    (raw / "labelsTs").mkdir()
    experiments = [runner.experiment(seed) for seed in (0, 1)]
    assert runner.replicates(1) == [("1", 0)]
    assert all(e.evaluate_on_test_set and e.dataset_name == "Dataset990_Mine" for e in experiments)
    # each seed trains models of its own: the seed is part of their configuration, hence of their folders
    assert experiments[1].settings.seed == 1 and "1seed" in experiments[1].schedule_configuration
    assert experiments[0].schedule_configuration != experiments[1].schedule_configuration
    assert experiments[1].settings.notes["evidence"] == {"seed": 1, "dataset": "990"}
    # folds asked for: cross-validation although the dataset has a test set
    chosen = Evidence(EvidenceSettings(str(tmp_path / "evidence"), seeds=(0,), dataset="990", folds=(0, 1)))
    assert chosen.replicates(0) == [("0/0", 0), ("0/1", 1)]
    assert chosen.experiment(0).settings.cross_validation and not chosen.experiment(0).evaluate_on_test_set
    # the report of a dataset's run: its test cases, no phantom audit
    rng = np.random.default_rng(9)
    scores_by_seed = {}
    for seed in ("0", "1"):
        baseline = scores(rng, 0.0, 12)
        scores_by_seed[seed] = {"unimodal:T1": per_case(baseline), "teacher": per_case(scores(rng, 0.2, 12)),
                                "protokd:T1": per_case(by_region(baseline, (0.01, 0.0, 0.0), rng))}
    evidence = evidence_from_raw(raw_values(scores_by_seed), {**SETTINGS, "seeds": [0, 1], "dataset": "990"}, None)
    text = open(write_evidence_report(evidence, str(tmp_path / "report"))).read()
    assert "Seeds 0, 1 (trainers); 12 held-out test cases of dataset 990, never seen in training" in text
    assert "Phantom realism audit" not in text
    # and of a cross-validation: the (seed, fold) models are the replicates
    folds = {f"{seed}/{fold}": per_key for seed, per_key in scores_by_seed.items() for fold in (0,)}
    evidence = evidence_from_raw(raw_values(folds), {**SETTINGS, "seeds": [0, 1], "folds": [0], "dataset": "990"},
                                 None)
    text = open(write_evidence_report(evidence, str(tmp_path / "report"))).read()
    assert "Seeds 0, 1 x folds 0 (trainers; each (seed, fold) model is a replicate" in text
    assert "12 cross-validation cases of dataset 990, each predicted by its fold's model" in text
    assert evidence["comparisons"]["protokd:T1"]["mean"]["replicates"] == 2


def test_report_only_refuses_an_evidence_json_without_per_case_values(tmp_path, capsys):
    from nnunet_protokd.cli import main
    old = tmp_path / "evidence.json"
    old.write_text(json.dumps({"settings": {}, "comparisons": {}}))
    assert main(["evidence", "--report-only", old, "-o", tmp_path / "r"]) == 1
    assert "holds no per-case values" in capsys.readouterr().err and not (tmp_path / "r").exists()


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
    curves[2] = {"unimodal:T1": rising}  # a student trained on some seeds only: pooled over those it has
    plateau = plateaus(curves)
    assert plateau["protokd:T1"]["change_over_last_fifth"] == pytest.approx(0)
    assert plateau["unimodal:T1"]["change_over_last_fifth"] == pytest.approx(2 * 0.5 / 9)
    assert plateau["protokd:T1"]["status"] == "reached" and plateau["unimodal:T1"]["status"] == "still rising"
    assert plateau_status(-0.02) == "falling" and plateau_status(0.0099) == "reached"
    shares = gradient_shares(curves)
    assert set(shares) == {"protokd:T1"}
    assert shares["protokd:T1"]["first_epoch"] == {"seg_loss": 0.75, "kd_loss": 0.25}
    assert shares["protokd:T1"]["last_epoch"] == {"seg_loss": 0.5, "kd_loss": 0.5}


def test_ablations_and_diagnosis_add_their_variants_for_the_modalities_asked_for_only():
    from nnunet_protokd.protocol.evidence import ABLATION_VARIANTS, DIAGNOSIS_VARIANTS, requested_variants
    assert requested_variants(None, False, False, ("T1", "T1ce")) == ()  # the default: the papers' settings only
    assert requested_variants(None, True, False, ("T1", "T1ce")) == ABLATION_VARIANTS
    assert requested_variants(None, True, True, ("T1", "T1ce")) == ABLATION_VARIANTS + DIAGNOSIS_VARIANTS
    assert requested_variants(None, True, False, ("T1ce",)) == ()  # the ablations are on T1
    assert requested_variants((), False, True, ("T1",)) == tuple(v for v in DIAGNOSIS_VARIANTS if v[1] == "T1") != ()
    assert requested_variants((("kdnet-kl_mean", "T1ce"),), False, True, ("T1ce",)) == (
        ("kdnet-kl_mean", "T1ce"), ("kdnet-no_kd", "T1ce"))


def test_on_cpu_training_augments_in_process_while_planning_keeps_nnunet_s_workers(monkeypatch):
    """nnU-Net's planner sets torch's thread count from nnUNet_n_proc_DA and fails at 0: only trainings get 0."""
    from nnunet_protokd.protocol import evidence
    calls = []
    monkeypatch.setattr(evidence, "run_command", lambda command, env=None: calls.append((command[0], env)))
    evidence.train_with_augmentation_in_process(["/venv/bin/nnUNetv2_train", "620", "2d", "0"])
    evidence.train_with_augmentation_in_process(["/venv/bin/nnUNetv2_plan_and_preprocess", "-d", "620"])
    assert calls[0][1]["nnUNet_n_proc_DA"] == "0" and calls[1][1] is None


def test_the_protocol_end_to_end_on_one_small_seed_and_resumed_without_training_again(tmp_path, monkeypatch,
                                                                                      preprocessed_phantoms):
    """Phantoms -> conversion -> seeded teacher, baseline, ProtoKD, an ablation and modality dropout (2 epochs of 2
    iterations) -> held-out predictions with probabilities -> the pooled report, read from nnU-Net's own
    checkpoints and files."""
    import json

    from conftest import assert_same_training_data, commands_in_process, copy_phantoms

    from nnunet_protokd.protocol import experiment as experiment_module
    from nnunet_protokd.protocol.evidence import Evidence, EvidenceSettings
    # add-config, lckd-subset and the trainings in this process (about 18 starts of Python and nnU-Net saved)
    monkeypatch.setattr(experiment_module, "run_command", commands_in_process(experiment_module.run_command))
    for kind in ("raw", "preprocessed", "results"):  # Evidence sets them; restored after the test
        monkeypatch.setenv(f"nnUNet_{kind}", str(tmp_path / "evidence" / f"nnUNet_{kind}"))
    # seed 7's training phantoms are conftest's phantom_folder, case for case (checked below): nnU-Net's planning
    # reuses their fingerprint
    copy_phantoms(preprocessed_phantoms, tmp_path / "evidence", "fingerprint", "Dataset707_PhantomSeed7")
    settings = EvidenceSettings(
        output_folder=str(tmp_path / "evidence"), seeds=(7,), modalities=("T1ce",),
        methods=("unimodal", "protokd", "moddrop"),
        variants=(("protokd-no_proto", "T1ce"),), epochs=2, iterations_per_epoch=2, val_iterations_per_epoch=1,
        training_cases={"num_hgg": 3, "num_lgg": 2}, held_out_cases={"num_hgg": 2, "num_lgg": 1,
                                                                     "first_case_index": 500},
        phantom_shape_zyx=(24, 32, 32), first_dataset_id=700)
    lines = []
    report = Evidence(settings, log=lines.append).run()
    assert_same_training_data(tmp_path / "evidence" / "nnUNet_raw" / "Dataset707_PhantomSeed7", preprocessed_phantoms)
    evidence = json.loads((tmp_path / "evidence" / "report" / "evidence.json").read_text())
    assert set(evidence["comparisons"]) == {"protokd:T1ce", "protokd-no_proto:T1ce", "moddrop:T1ce"}
    assert evidence["comparisons"]["protokd:T1ce"]["mean"]["n"] == 3
    # modality dropout, trained once on every channel, predicted from T1ce through its sliced folder: the distilled
    # student against it; one seed, so the teacher's lead over the baseline is described, not tested
    assert set(evidence["comparisons_with_modality_dropout"]) == {"protokd:T1ce"}
    assert evidence["comparisons_with_modality_dropout"]["protokd:T1ce"]["mean"]["n"] == 3
    assert evidence["knowledge"]["T1ce"]["mean"]["replicates"] == 1
    assert evidence["learning_curves"]["moddrop"]["iterations"] == [2, 4] and "moddrop" in evidence["plateau"]
    # agreement with the teacher from the saved probabilities: every student, a Dice and a finite, positive KL;
    # calibration of every model, the teacher too
    agreement = evidence["teacher_agreement"]
    assert set(agreement) == {"teacher", "unimodal:T1ce", "protokd:T1ce", "protokd-no_proto:T1ce", "moddrop:T1ce"}
    students = [a for key, a in agreement.items() if key != "teacher"]
    assert all(0 <= a["dice"] <= 1 and 0 < a["kl"] < 10 for a in students) and "kl" not in agreement["teacher"]
    assert all(0 < a["entropy"] < np.log(2) and set(a["volume_ratio"]) == {"WT", "TC", "ET"}
               for a in agreement.values())
    assert "kl_vs_baseline" in agreement["protokd:T1ce"] and "kl_vs_baseline" not in agreement["unimodal:T1ce"]
    assert evidence["learning_curves"]["teacher"]["iterations"] == [2, 4]
    # the ablation's L_proto has weight 0: no gradient share; the paper's setting has one
    shares = evidence["gradient_shares"]
    assert shares["protokd-no_proto:T1ce"]["first_epoch"]["proto_loss"] == 0
    assert shares["protokd:T1ce"]["first_epoch"]["proto_loss"] > 0
    for figure in ("learning_curves.png", "paired_differences.png"):
        assert (tmp_path / "evidence" / "report" / figure).stat().st_size > 10_000
    text = open(report).read()
    assert "ProtoKD (T1ce): " in text and "| T1ce | ProtoKD without L_proto | 3 |" in text
    assert "| T1ce | Modality dropout | 3 | " in text and "## Paired difference to modality dropout" in text
    # agreement with the teacher: both differences to the baseline with their seed-level p, in the headline table
    # (before the first section) and in the agreement table
    headline_row = next(row for row in text.split("\n## ")[0].splitlines() if row.startswith("| T1ce | ProtoKD | 3 | "))
    kl_p = format_p(agreement["protokd:T1ce"]["kl_vs_baseline"]["seed_level"]["p"])
    assert headline_row.rstrip(" |").endswith(f"] ({kl_p})")
    agreement_rows = text.split("## Knowledge transfer")[1].split("## Calibration")[0].splitlines()
    cells = next(row for row in agreement_rows if row.startswith("| T1ce | ProtoKD | ")).split(" | ")
    for cell, name in ((cells[3], "dice_vs_baseline"), (cells[5], "kl_vs_baseline")):
        assert cell.rstrip(" |").endswith(f"] ({format_p(agreement['protokd:T1ce'][name]['seed_level']['p'])})")
    # the seed is recorded where the model is: the model folder's plans.json
    plans = json.loads(next((tmp_path / "evidence" / "nnUNet_results").glob(
        "*/ProtoKDTrainer__nnUNetPlans__*_T1ce/plans.json")).read_text())
    assert any(c.get("protokd", {}).get("seed") == 7 for c in plans["configurations"].values())
    # resumed: every step is found done, nothing is trained or predicted again
    lines.clear()
    Evidence(settings, log=lines.append).run()
    steps = [line for line in lines if line.startswith("[") and (" train " in line or " predict " in line)]
    assert len(steps) == 10 and all(": already done (" in line for line in steps), steps
    # the report keeps each invocation's wall time: the second one alone would misreport the run's cost
    runs = json.loads((tmp_path / "evidence" / "report" / "evidence.json").read_text())["settings"]["runs"]
    assert len(runs) == 2 and runs[1]["wall_time_seconds"] < runs[0]["wall_time_seconds"]
    assert runs[0]["methods"] == ["unimodal", "protokd", "moddrop"]
    assert "; wall time " in open(report).read() and ", then " in open(report).read()

    # the same protocol on that converted dataset passed by id (`evidence -d 707`), from clean evidence folders: its
    # held-out test set with the seed's models found trained, then its cross-validation folds, fold 0's models
    # reused and fold 1's trained, each (seed, fold) model a replicate predicting its own validation case
    on_dataset = dict(seeds=(7,), modalities=("T1ce",), methods=("unimodal",), epochs=2, iterations_per_epoch=2,
                      val_iterations_per_epoch=1, dataset="707")
    lines.clear()
    Evidence(EvidenceSettings(output_folder=str(tmp_path / "test_set"), **on_dataset), log=lines.append).run()
    trainings = [line for line in lines if line.startswith("[") and " train " in line]
    assert len(trainings) == 2 and all(": already done (" in line for line in trainings), trainings
    evidence = json.loads((tmp_path / "test_set" / "report" / "evidence.json").read_text())
    assert evidence["settings"]["folds"] is None and set(evidence["raw"]["scores"]) == {"7"}
    assert evidence["knowledge"]["T1ce"]["mean"]["n"] == 3  # the 3 held-out phantoms
    assert not (tmp_path / "test_set" / "nnUNet_raw").exists()  # the environment's nnU-Net folders, not its own
    folds = EvidenceSettings(output_folder=str(tmp_path / "folds"), folds=(0, 1), **on_dataset)
    lines.clear()
    report = Evidence(folds, log=lines.append).run()
    trainings = [line for line in lines if line.startswith("[") and " train " in line]
    assert sorted(": already done (" in line for line in trainings) == [False, False, True, True], trainings
    evidence = json.loads((tmp_path / "folds" / "report" / "evidence.json").read_text())
    assert set(evidence["raw"]["scores"]) == {"7/0", "7/1"} and evidence["settings"]["folds"] == [0, 1]
    splits = json.loads(next((tmp_path / "evidence" / "nnUNet_preprocessed").glob("*/splits_final.json")).read_text())
    for fold in (0, 1):
        assert set(evidence["raw"]["scores"][f"7/{fold}"]["teacher"]) == set(splits[fold]["val"])
        assert set(evidence["raw"]["teacher_agreement"][f"7/{fold}"]["unimodal:T1ce"]) == set(splits[fold]["val"])
    knowledge = evidence["knowledge"]["T1ce"]["mean"]
    assert knowledge["replicates"] == 2 and knowledge["n"] == sum(len(splits[f]["val"]) for f in (0, 1))
    assert "Seeds 7 x folds 0, 1 (trainers; each (seed, fold) model is a replicate" in open(report).read()
    lines.clear()
    Evidence(folds, log=lines.append).run()  # resumed: nothing trained or predicted again
    steps = [line for line in lines if line.startswith("[") and (" train " in line or " predict " in line)]
    assert steps and all(": already done (" in line for line in steps), steps


def test_the_evidence_command_line_reaches_the_settings():
    from nnunet_protokd.cli import build_parser  # noqa: PLC0415 (the CLI module is the thing tested)
    from nnunet_protokd.commands import evidence_settings  # noqa: PLC0415

    default = evidence_settings(build_parser().parse_args(["evidence", "-o", "out", "--device", "cpu"]))
    assert default == EvidenceSettings(output_folder="out", device="cpu")
    # the default command: five seeds, the papers' settings and modality dropout, the ablations behind a flag
    assert default.seeds == (0, 1, 2, 3, 4) and default.variants == () and default.folds is None
    assert default.methods == ("unimodal", "protokd", "kdnet", "moddrop")
    ablations = evidence_settings(build_parser().parse_args(["evidence", "--ablations", "--folds", "0", "2"]))
    assert {v for v, _ in ablations.variants} == {"protokd-no_kd", "protokd-no_proto", "protokd-intra"}
    assert ablations.folds == (0, 2)
    chosen = evidence_settings(build_parser().parse_args(
        ["evidence", "-o", "out", "--device", "cpu", "-d", "777", "--methods", "unimodal", "protokd", "moddrop",
         "--seeds", "3", "4"]))
    assert chosen.dataset == "777" and chosen.methods == ("unimodal", "protokd", "moddrop")
    assert chosen.seeds == (3, 4) and chosen.variants == default.variants
