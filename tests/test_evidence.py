"""The evidence protocol's statistics on synthetic per-case scores whose answers are known."""
import numpy as np
import pytest

from nnunet_protokd.protocol.evidence import (
    bernoulli_kl,
    compare_with_baseline,
    gradient_shares,
    headline,
    plateaus,
    pooled_dice,
)

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
    curves[2] = {"unimodal:T1": rising}  # a student trained on some seeds only: pooled over those it has
    plateau = plateaus(curves)
    assert plateau["protokd:T1"]["change_over_last_fifth"] == pytest.approx(0)
    assert plateau["unimodal:T1"]["change_over_last_fifth"] == pytest.approx(2 * 0.5 / 9)
    shares = gradient_shares(curves)
    assert set(shares) == {"protokd:T1"}
    assert shares["protokd:T1"]["first_epoch"] == {"seg_loss": 0.75, "kd_loss": 0.25}
    assert shares["protokd:T1"]["last_epoch"] == {"seg_loss": 0.5, "kd_loss": 0.5}


def test_a_difference_is_significant_only_when_the_rank_test_and_the_interval_agree():
    from nnunet_protokd.evaluation.statistics import significant
    assert significant({"wilcoxon_p": 0.01, "ci95": [0.01, 0.03]})
    assert significant({"wilcoxon_p": 0.01, "ci95": [-0.03, -0.01]})
    assert not significant({"wilcoxon_p": 0.01, "ci95": [-0.01, 0.03]})  # the CI includes 0
    assert not significant({"wilcoxon_p": 0.2, "ci95": [0.01, 0.03]})
    assert not significant({"wilcoxon_p": None, "ci95": [0.01, 0.03]})  # no test (too few pairs)


def test_diagnosis_adds_its_variants_for_the_modalities_asked_for_only():
    from nnunet_protokd.protocol.evidence import DEFAULT_VARIANTS, DIAGNOSIS_VARIANTS, requested_variants
    assert requested_variants(None, False, ("T1", "T1ce")) == DEFAULT_VARIANTS
    assert requested_variants(None, True, ("T1", "T1ce")) == DEFAULT_VARIANTS + DIAGNOSIS_VARIANTS
    assert requested_variants((), True, ("T1",)) == tuple(v for v in DIAGNOSIS_VARIANTS if v[1] == "T1") != ()
    assert requested_variants((("kdnet-kl_mean", "T1ce"),), True, ("T1ce",)) == (
        ("kdnet-kl_mean", "T1ce"), ("kdnet-no_kd", "T1ce"))


def test_on_cpu_training_augments_in_process_while_planning_keeps_nnunet_s_workers(monkeypatch):
    """nnU-Net's planner sets torch's thread count from nnUNet_n_proc_DA and fails at 0: only trainings get 0."""
    import subprocess

    from nnunet_protokd.protocol.evidence import train_with_augmentation_in_process
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda command, env=None: calls.append((command[0], env)))
    train_with_augmentation_in_process(["/venv/bin/nnUNetv2_train", "620", "2d", "0"])
    train_with_augmentation_in_process(["/venv/bin/nnUNetv2_plan_and_preprocess", "-d", "620"])
    assert calls[0][1]["nnUNet_n_proc_DA"] == "0" and calls[1][1] is None


def test_the_protocol_end_to_end_on_one_small_seed_and_resumed_without_training_again(tmp_path, monkeypatch,
                                                                                      preprocessed_phantoms):
    """Phantoms -> conversion -> seeded teacher, baseline, ProtoKD and an ablation (2 epochs of 2 iterations) ->
    held-out predictions with probabilities -> the pooled report, read from nnU-Net's own checkpoints and files."""
    import json

    from conftest import assert_same_training_data, copy_phantoms

    from nnunet_protokd.protocol.evidence import Evidence, EvidenceSettings
    for kind in ("raw", "preprocessed", "results"):  # Evidence sets them; restored after the test
        monkeypatch.setenv(f"nnUNet_{kind}", str(tmp_path / "evidence" / f"nnUNet_{kind}"))
    # seed 7's training phantoms are conftest's phantom_folder, case for case (checked below): nnU-Net's planning
    # reuses their fingerprint
    copy_phantoms(preprocessed_phantoms, tmp_path / "evidence", "fingerprint", "Dataset707_PhantomSeed7")
    settings = EvidenceSettings(
        output_folder=str(tmp_path / "evidence"), seeds=(7,), modalities=("T1ce",), methods=("unimodal", "protokd"),
        variants=(("protokd-no_proto", "T1ce"),), epochs=2, iterations_per_epoch=2, val_iterations_per_epoch=1,
        training_cases={"num_hgg": 3, "num_lgg": 2}, held_out_cases={"num_hgg": 2, "num_lgg": 1,
                                                                     "first_case_index": 500},
        phantom_shape_zyx=(24, 32, 32), first_dataset_id=700)
    lines = []
    report = Evidence(settings, log=lines.append).run()
    assert_same_training_data(tmp_path / "evidence" / "nnUNet_raw" / "Dataset707_PhantomSeed7", preprocessed_phantoms)
    evidence = json.loads((tmp_path / "evidence" / "report" / "evidence.json").read_text())
    assert set(evidence["comparisons"]) == {"protokd:T1ce", "protokd-no_proto:T1ce"}
    assert evidence["comparisons"]["protokd:T1ce"]["mean"]["n"] == 3
    # agreement with the teacher from the saved probabilities: every student, a Dice and a finite, positive KL;
    # calibration of every model, the teacher too
    agreement = evidence["teacher_agreement"]
    assert set(agreement) == {"teacher", "unimodal:T1ce", "protokd:T1ce", "protokd-no_proto:T1ce"}
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
    # the seed is recorded where the model is: the model folder's plans.json
    plans = json.loads(next((tmp_path / "evidence" / "nnUNet_results").glob(
        "*/ProtoKDTrainer__nnUNetPlans__*_T1ce/plans.json")).read_text())
    assert any(c.get("protokd", {}).get("seed") == 7 for c in plans["configurations"].values())
    # resumed: every step is found done, nothing is trained or predicted again
    lines.clear()
    Evidence(settings, log=lines.append).run()
    steps = [line for line in lines if line.startswith("[") and (" train " in line or " predict " in line)]
    assert len(steps) == 8 and all(": already done (" in line for line in steps), steps
    # the report keeps each invocation's wall time: the second one alone would misreport the run's cost
    runs = json.loads((tmp_path / "evidence" / "report" / "evidence.json").read_text())["settings"]["runs"]
    assert len(runs) == 2 and runs[1]["wall_time_seconds"] < runs[0]["wall_time_seconds"]
    assert "; wall time " in open(report).read() and ", then " in open(report).read()
