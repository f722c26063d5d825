"""nnU-Net's ResEnc plans with every trainer, on the session's preprocessed phantoms (about three minutes on 2 CPU
cores; a module of its own so that it runs beside the others under pytest-xdist)."""
import json
from pathlib import Path

import pytest
from conftest import BIN, DATASET, copy_phantoms, nnunet_environment, protokd_in_process, run, train_in_process


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, preprocessed_phantoms) -> Path:
    root = tmp_path_factory.mktemp("resenc")
    copy_phantoms(preprocessed_phantoms, root)
    return root


def test_resenc_plans_as_teacher_and_student_and_a_resenc_teacher_for_default_plans(workspace):
    """nnU-Net's ResEnc planner (its current recommendation), planned with a small GPU memory target under a plans
    name of its own (what a user whose GPU is too small does): a ResEnc teacher and ResEnc students train; a
    default-plans (PlainConvUNet) ProtoKD student distils from the ResEnc teacher (a different network; the
    cosine maps would also allow different widths)."""
    env = nnunet_environment(workspace)
    resenc = "nnUNetResEncUNetPlans_4G"
    run([BIN / "nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "3d_fullres", "-pl", "nnUNetPlannerResEncM",
         "-gpu_memory_target", "4", "-overwrite_plans_name", resenc, "-np", "1"], env)
    schedule = ["--epochs", "1", "--iterations-per-epoch", "2", "--val-iterations-per-epoch", "1",
                "--no-final-validation"]
    protokd_in_process(workspace, "add-config", "-d", "501", "-p", resenc, "-c", "3d_fullres", "--name", "3d_smoke",
                       *schedule)
    protokd_in_process(workspace, "add-config", "-d", "501", "-p", resenc, "-c", "3d_smoke", "-m", "T1ce")
    for trainer, configuration in (("ProtoKDTeacherTrainer", "3d_smoke"), ("ProtoKDTrainer", "3d_smoke_T1ce"),
                                   ("KDNetTrainer", "3d_smoke_T1ce"), ("LCKDTrainer", "3d_smoke")):
        train_in_process(workspace, "501", configuration, "0", "-tr", trainer, "-p", resenc, "-device", "cpu")
        folder = workspace / "nnUNet_results" / DATASET / f"{trainer}__{resenc}__{configuration}"
        plans = json.loads((folder / "plans.json").read_text())
        assert "ResidualEncoderUNet" in plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"]
        assert (folder / "fold_0" / "checkpoint_final.pth").is_file(), trainer
    # the default-plans student, taught by the ResEnc teacher
    protokd_in_process(workspace, "add-config", "-d", "501", "-c", "3d_fullres", "--name", "3d_smoke", *schedule)
    protokd_in_process(workspace, "add-config", "-d", "501", "-c", "3d_smoke", "-m", "T1ce", "--name",
                       "3d_smoke_T1ce_resenc_teacher", "--teacher-plans", resenc)
    train_in_process(workspace, "501", "3d_smoke_T1ce_resenc_teacher", "0", "-tr", "ProtoKDTrainer", "-device", "cpu")
    record = json.loads((workspace / "nnUNet_results" / DATASET
                         / "ProtoKDTrainer__nnUNetPlans__3d_smoke_T1ce_resenc_teacher" / "fold_0"
                         / "distillation.json").read_text())
    assert record["teacher"]["plans"] == resenc
