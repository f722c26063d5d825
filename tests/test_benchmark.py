"""`nnunet-protokd benchmark`'s arguments, checked before any measuring process starts (the measurements
themselves: test_integration)."""
import json
import re

import pytest
from test_student_settings import DATASET_JSON, make_plans

from nnunet_protokd.errors import ConfigurationError
from nnunet_protokd.protocol import benchmark


@pytest.fixture
def preprocessed(tmp_path, monkeypatch):
    """A preprocessed Dataset501 (plans with a network of total stride 2 x 4 x 4) and a teacher checkpoint file; any
    measuring process would fail the test."""
    import nnunetv2.paths
    plans = make_plans()
    plans["configurations"]["3d_fullres"]["architecture"] = {
        **plans["configurations"]["3d_fullres"]["architecture"],
        "arch_kwargs": {"strides": [[1, 1, 1], [2, 2, 2], [1, 2, 2]]}}
    plans["configurations"]["3d_fullres_T1ce"] = {"inherits_from": "3d_fullres", "patch_size": [16, 16, 16]}
    folder = tmp_path / "nnUNet_preprocessed" / "Dataset501_BraTS2018"
    folder.mkdir(parents=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    monkeypatch.setattr(nnunetv2.paths, "nnUNet_preprocessed", str(tmp_path / "nnUNet_preprocessed"))
    monkeypatch.setattr(benchmark, "_in_subprocess", lambda *a: pytest.fail(f"a measuring process started: {a}"))
    teacher = tmp_path / "teacher.pth"
    teacher.write_bytes(b"weights")
    return str(teacher)


@pytest.mark.parametrize("counts, text", [({"steps": 0}, "--steps must be at least 1 (got 0)"),
                                          ({"warmup": -1}, "--warmup at least 0 (got -1)"),
                                          ({"inference_cases": 0}, "--inference-cases at least 1 (got 0)")])
def test_counts_that_measure_nothing_are_refused(preprocessed, counts, text):
    with pytest.raises(ConfigurationError, match=re.escape(text)):
        benchmark.run_benchmark("Dataset501_BraTS2018", "3d_fullres_T1ce", preprocessed, **counts)


def test_a_patch_size_the_network_cannot_take_is_refused_and_the_plans_stay(preprocessed, tmp_path):
    plans_file = tmp_path / "nnUNet_preprocessed" / "Dataset501_BraTS2018" / "nnUNetPlans.json"
    before = plans_file.read_text()
    with pytest.raises(ConfigurationError, match=r"--patch-size 4 6 8: configuration '3d_fullres_T1ce' needs a "
                                                 r"multiple of its network's total stride \[2, 4, 4\] on each axis"):
        benchmark.run_benchmark("Dataset501_BraTS2018", "3d_fullres_T1ce", preprocessed, patch_size=(4, 6, 8))
    with pytest.raises(ConfigurationError, match="unknown trainer"):
        benchmark.run_benchmark("Dataset501_BraTS2018", "3d_fullres_T1ce", preprocessed, trainers=["Nope"])
    # a patch it can take replaces the patch of the configuration and of every one it inherits from, in memory
    plans, _ = benchmark._measured_plans({"dataset": "Dataset501_BraTS2018", "plans": "nnUNetPlans",
                                          "configuration": "3d_fullres_T1ce", "patch_size": [4, 8, 8]})
    assert plans["configurations"]["3d_fullres_T1ce"]["patch_size"] == [4, 8, 8]
    assert plans["configurations"]["3d_fullres"]["patch_size"] == [4, 8, 8]
    assert plans_file.read_text() == before
