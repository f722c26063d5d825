"""`report` on small synthetic prediction folders whose scores can be computed by hand."""
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import BIN, run
from scipy import stats

from nnunet_protokd.data.brats import NNUNET_REGIONS
from nnunet_protokd.data.regions import evaluation_regions
from nnunet_protokd.evaluation.metrics import ScoringInputError, hd95
from nnunet_protokd.evaluation.report import PredictionSet, build_report
from nnunet_protokd.evaluation.statistics import paired_comparison

DATASET_JSON = {"channel_names": {"0": "T1", "1": "T1ce"}, "labels": NNUNET_REGIONS,
                "regions_class_order": [1, 2, 3], "file_ending": ".nii.gz"}
SPACING = (1.0, 1.0, 2.0)  # x, y, z


def write(path, array):
    image = sitk.GetImageFromArray(array.astype(np.uint8 if array.dtype != np.float32 else np.float32))
    image.SetSpacing(SPACING)
    sitk.WriteImage(image, str(path))


def reference_case():
    """nnU-Net BraTS labels in a (z, y, x) = (6, 8, 8) volume: 1 = oedema, 2 = necrosis, 3 = enhancing."""
    labels = np.zeros((6, 8, 8), np.uint8)
    labels[1:5, 1:7, 1:7] = 1
    labels[2:4, 2:6, 2:6] = 2
    labels[2:4, 3:5, 3:5] = 3
    return labels


@pytest.fixture
def folders(tmp_path):
    reference = reference_case()
    no_enhancing = np.where(reference == 3, 2, reference)
    cases = {"case_a": reference, "case_b": no_enhancing}
    (tmp_path / "gt").mkdir()
    (tmp_path / "images").mkdir()
    for case, labels in cases.items():
        write(tmp_path / "gt" / f"{case}.nii.gz", labels)
        for channel in range(2):
            write(tmp_path / "images" / f"{case}_{channel:04d}.nii.gz", (labels * 10.0 + channel).astype(np.float32))
    predictions = {
        "identical": cases,
        "disjoint": {c: np.roll(np.where(v > 0, 0, 1), 0).astype(np.uint8) for c, v in cases.items()},
        # case_b: enhancing predicted where the reference has none
        "spurious_et": {"case_a": reference, "case_b": reference},
    }
    for name, per_case in predictions.items():
        (tmp_path / name).mkdir()
        for case, labels in per_case.items():
            write(tmp_path / name / f"{case}.nii.gz", labels)
    return tmp_path


def test_regions_of_region_and_label_datasets():
    assert evaluation_regions(DATASET_JSON) == [("WT", (1, 2, 3)), ("TC", (2, 3)), ("ET", (3,))]
    label_based = {"labels": {"background": 0, "edema": 1, "necrosis": 2, "enhancing tumor": 3},
                   "brats_naming": "brats2018"}
    assert evaluation_regions(label_based) == evaluation_regions(DATASET_JSON)  # scored as BraTS regions
    assert evaluation_regions({"labels": {"background": 0, "liver": 1}}) == [("liver", (1,))]


def test_hand_computable_scores(folders, tmp_path):
    sets = [PredictionSet("teacher", None, str(folders / "identical")),
            PredictionSet("unimodal", "T1ce", str(folders / "disjoint")),
            PredictionSet("protokd", "T1ce", str(folders / "spurious_et"))]
    summary = build_report(str(folders / "gt"), DATASET_JSON, sets, str(tmp_path / "report"), str(folders / "images"))
    teacher = summary["results"]["teacher"]
    assert all(teacher["per_case"][c][r] == {"dice": 1.0, "hd95": 0.0, "hd95_one_empty": False}
               for c in ("case_a", "case_b") for r in ("WT", "TC", "ET"))  # case_b's ET is empty in both: HD95 0
    disjoint = summary["results"]["unimodal:T1ce"]["per_case"]["case_a"]
    assert disjoint["WT"]["dice"] == 0.0 and disjoint["ET"]["dice"] == 0.0
    spurious = summary["results"]["protokd:T1ce"]["per_case"]["case_b"]
    # enhancing tumour predicted where the reference has none: BraTS's HD95 penalty, not a case left out
    assert spurious["WT"]["dice"] == 1.0 and spurious["ET"] == {"dice": 0.0, "hd95": 373.13, "hd95_one_empty": True}
    et = summary["results"]["protokd:T1ce"]["summary"]["ET"]
    assert et["dice_mean"] == 0.5 and et["dice_std"] == 0.5
    assert et["hd95_n"] == 2 and et["hd95_one_empty"] == 1 and et["hd95_mean"] == pytest.approx(373.13 / 2)
    assert summary["results"]["protokd:T1ce"]["summary"]["mean"]["dice_mean"] == pytest.approx((1 + 2 / 3) / 2)
    comparison = summary["comparisons_with_unimodal"]["protokd:T1ce"]["WT"]
    assert comparison["n"] == 2 and comparison["mean_difference"] == 1.0
    report = (tmp_path / "report" / "report.md").read_text()
    assert ("| all | Teacher (all modalities) | 1.000 ± 0.000 | 1.000 ± 0.000 | 1.000 ± 0.000 | 1.000 ± 0.000 |"
            in report)
    assert "| T1ce | ProtoKD | 1.000 ± 0.000 | 1.000 ± 0.000 | 0.500 ± 0.500 |" in report
    assert "186.56 ± 186.56 (n=2, k=1 at 373.13) |" in report and "scored HD95 = 373.13 mm (BraTS)" in report
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["n_cases"] == 2
    for figure in ("dice.png", "overlays.png"):
        assert (tmp_path / "report" / figure).stat().st_size > 5000


def test_hd95_of_one_empty_mask_can_be_excluded_instead_and_is_counted(folders, tmp_path):
    result = run([BIN / "nnunet-protokd", "report", "--ground-truth", folders / "gt", "--dataset-json",
                  write_json(tmp_path), "--prediction", f"protokd:T1ce={folders / 'spurious_et'}", "-o",
                  tmp_path / "r", "--hd95-exclude-one-empty"])
    assert "report:" in result.stdout
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    et = summary["results"]["protokd:T1ce"]
    assert et["per_case"]["case_b"]["ET"] == {"dice": 0.0, "hd95": None, "hd95_one_empty": True}
    assert et["summary"]["ET"]["hd95_n"] == 1 and et["summary"]["ET"]["hd95_one_empty"] == 1
    assert summary["hd95_penalty_mm"] is None
    assert "0.00 ± 0.00 (n=1, k=1 excluded) |" in (tmp_path / "r" / "report.md").read_text()


def test_hd95_of_two_planes_is_their_distance_in_mm():
    reference = np.zeros((8, 5, 5), bool)
    prediction = np.zeros((8, 5, 5), bool)
    reference[2] = True
    prediction[4] = True
    assert hd95(reference, prediction, (2.0, 1.0, 1.0)) == pytest.approx(4.0)  # two slices of 2 mm
    assert hd95(reference, reference, (2.0, 1.0, 1.0)) == 0.0


def test_paired_statistics_are_scipys():
    rng = np.random.default_rng(0)
    baseline = rng.uniform(0.5, 0.8, 25)
    student = baseline + rng.normal(0.03, 0.05, 25)
    result = paired_comparison(student, baseline, seed=1)
    assert result["wilcoxon_p"] == pytest.approx(stats.wilcoxon(student, baseline).pvalue)
    assert result["ttest_p"] == pytest.approx(stats.ttest_rel(student, baseline).pvalue)
    assert result["ci95"][0] < result["mean_difference"] < result["ci95"][1]
    assert result["mean_difference"] == pytest.approx(np.mean(student - baseline))
    assert paired_comparison([0.5, 0.6], [0.5, 0.6])["wilcoxon_p"] is None  # no difference at all


def test_table_1_over_several_folds_takes_the_trained_model_as_the_unit(tmp_path):
    """Cross-validation with three folds: each fold's models predict their own cases, so the comparison is over the
    folds' mean differences and carries the one verdict rule; with one model per method it stays case-level."""
    from nnunet_protokd.evaluation.statistics import verdict
    reference = reference_case()
    for folder in ("gt", "unimodal", "protokd"):
        (tmp_path / folder).mkdir()
    model_of_case = {}
    for i in range(6):
        case = f"case_{i}"
        model_of_case[case] = f"fold {i // 2}"
        write(tmp_path / "gt" / f"{case}.nii.gz", reference)
        write(tmp_path / "protokd" / f"{case}.nii.gz", reference)
        baseline = reference.copy()
        baseline[1:2 + i % 3] = 0  # the baseline misses one to three slices of the tumour
        write(tmp_path / "unimodal" / f"{case}.nii.gz", baseline)
    sets = [PredictionSet("unimodal", "T1ce", str(tmp_path / "unimodal")),
            PredictionSet("protokd", "T1ce", str(tmp_path / "protokd"))]
    summary = build_report(str(tmp_path / "gt"), DATASET_JSON, sets, str(tmp_path / "folds"),
                           model_of_case=model_of_case)
    assert summary["comparison_unit"] == "trained model"
    wt = summary["comparisons_with_unimodal"]["protokd:T1ce"]["WT"]
    assert wt["replicates"] == 3 and wt["n"] == 6 and set(wt["per_replicate"]) == {"fold 0", "fold 1", "fold 2"}
    assert wt["seed_level"]["df"] == 2 and wt["holm_p"] is not None
    text = (tmp_path / "folds" / "report.md").read_text()
    assert "the trained model (fold) as the unit" in text and f"| {verdict(wt).text} |" in text
    one_model = build_report(str(tmp_path / "gt"), DATASET_JSON, sets, str(tmp_path / "one"))
    assert one_model["comparison_unit"] == "case"
    assert "descriptive: the cases share one trained model" in (tmp_path / "one" / "report.md").read_text()


def test_missing_predictions_are_named(folders, tmp_path):
    (folders / "identical" / "case_b.nii.gz").unlink()
    result = run([BIN / "nnunet-protokd", "report", "--ground-truth", folders / "gt", "--dataset-json",
                  write_json(tmp_path), "--prediction", f"teacher={folders / 'identical'}", "-o", tmp_path / "r"],
                 expect_success=False)
    assert result.returncode == 1 and "lacks predictions of 1 reference case(s): ['case_b']" in result.stderr


def write_json(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(DATASET_JSON))
    return path


@pytest.mark.parametrize("bad, message", [
    # the back-converter's output: scored as nnU-Net labels, oedema (BraTS 2) would be read as necrosis
    (lambda labels: np.array([0, 2, 1, 4], np.uint8)[labels], "holds the values 0, 1, 2, 4; a label map of this "
                                                              "dataset holds only its labels [0, 1, 2, 3]"),
    (lambda labels: np.where(labels == 3, 7, labels), "holds the values 0, 1, 2, 7;"),
    (lambda labels: (labels * 0.5).astype(np.float32), "holds the values 0, 0.5, 1, 1.5;"),
])
def test_a_prediction_holding_other_labels_is_refused_by_name_and_nothing_is_written(folders, tmp_path, bad, message):
    bad_file = folders / "identical" / "case_a.nii.gz"
    write(bad_file, bad(sitk.GetArrayFromImage(sitk.ReadImage(str(bad_file)))))
    sets = [PredictionSet("teacher", None, str(folders / "identical"))]
    with pytest.raises(ScoringInputError, match=rf"^{bad_file} {re.escape(message)}"):
        build_report(str(folders / "gt"), DATASET_JSON, sets, str(tmp_path / "report"))
    assert not (tmp_path / "report").exists()


def test_a_reference_holding_other_labels_is_refused_by_name(folders, tmp_path):
    reference = folders / "gt" / "case_a.nii.gz"
    write(reference, np.where(reference_case() == 3, 4, reference_case()))
    with pytest.raises(ScoringInputError, match=rf"^{reference} holds the values 0, 1, 2, 4;"):
        build_report(str(folders / "gt"), DATASET_JSON, [PredictionSet("teacher", None, str(folders / "identical"))],
                     str(tmp_path / "report"))


@pytest.mark.parametrize("change, problem", [
    (lambda image: image.SetSpacing((1.0, 1.0, 1.0)), "spacing (1, 1, 1) differs from (1, 1, 2)"),
    (lambda image: image.SetOrigin((0.0, 0.0, 10.0)), "origin (0, 0, 10) differs from (0, 0, 0)"),
    (lambda image: image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1)), "direction (0, 1, 0, 1, 0, 0, 0, 0, 1) differs"),
])
def test_a_prediction_off_its_references_grid_is_refused(folders, tmp_path, change, problem):
    path = folders / "identical" / "case_a.nii.gz"
    image = sitk.ReadImage(str(path))
    change(image)
    sitk.WriteImage(image, str(path))
    with pytest.raises(ScoringInputError, match=re.escape(f"{path}: {problem}")):
        build_report(str(folders / "gt"), DATASET_JSON, [PredictionSet("teacher", None, str(folders / "identical"))],
                     str(tmp_path / "report"))
    assert not (tmp_path / "report").exists()


def test_a_method_and_modality_given_twice_is_refused_naming_both_folders(folders, tmp_path):
    """The second set used to replace the first without a word."""
    sets = [PredictionSet("protokd", "T1ce", str(folders / "identical")),
            PredictionSet("protokd", "T1ce", str(folders / "disjoint"))]
    with pytest.raises(ScoringInputError, match=re.escape(
            f"two prediction sets are protokd:T1ce: {folders / 'identical'} and {folders / 'disjoint'}; give each "
            f"METHOD:MODALITY once")):
        build_report(str(folders / "gt"), DATASET_JSON, sets, str(tmp_path / "report"))
    assert not (tmp_path / "report").exists()


def report_error(capsys, *arguments) -> str:
    """The `report` command run in-process: its exit status must be 1 and its output one `error:` line."""
    from nnunet_protokd.cli import main
    assert main(["report", *map(str, arguments)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and len(error.strip().splitlines()) == 1, error
    return error.strip()[len("error: "):]


def test_report_input_errors_are_one_line_naming_the_file(folders, tmp_path, capsys):
    dataset_json = write_json(tmp_path)
    good = ["--dataset-json", dataset_json, "--prediction", f"teacher={folders / 'identical'}"]
    (tmp_path / "a_file").write_text("")
    assert report_error(capsys, "--ground-truth", folders / "gt", *good, "-o", tmp_path / "a_file") == \
        f"the report folder {tmp_path / 'a_file'} is a file; give a folder to write the report in"
    assert report_error(capsys, "--ground-truth", tmp_path / "nowhere", *good, "-o", tmp_path / "r") == \
        f"ground-truth folder {tmp_path / 'nowhere'} does not exist or is not a folder"
    (tmp_path / "broken.json").write_text("{labels: 1")
    assert report_error(capsys, "--ground-truth", folders / "gt", "--dataset-json", tmp_path / "broken.json",
                        "--prediction", f"teacher={folders / 'identical'}", "-o", tmp_path / "r").startswith(
        f"{tmp_path / 'broken.json'} is not JSON: Expecting property name")
    assert report_error(capsys, "--ground-truth", folders / "gt", "--dataset-json", dataset_json, "--prediction",
                        f"unimodal={folders / 'identical'}", "-o", tmp_path / "r") == \
        f"prediction set unimodal={folders / 'identical'} names no modality: give unimodal:MODALITY=FOLDER (only " \
        f"the teacher reads every modality)"
    (tmp_path / "empty").mkdir()
    assert report_error(capsys, "--ground-truth", tmp_path / "empty", *good, "-o", tmp_path / "r") == \
        f"no reference label maps <case>.nii.gz in {tmp_path / 'empty'}"
    assert not (tmp_path / "r").exists()
