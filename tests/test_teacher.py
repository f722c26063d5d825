"""The teacher loader: discovery by dataset/plans/fold, every compatibility check, safe loading, freezing."""
import copy
import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_protokd.errors import TeacherError
from nnunet_protokd.training.teacher import locate_teacher
from tests.test_student_settings import tiny_architecture

DATASET = "Dataset501_BraTS2018"
CHANNELS = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
ARCHITECTURE = tiny_architecture(strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)))


def dataset_json(channels=CHANNELS, labels=LABELS):
    return {"channel_names": dict(channels), "labels": copy.deepcopy(labels), "regions_class_order": [1, 2, 3],
            "file_ending": ".nii.gz", "numTraining": 10}


def plans(channels=4, spacing=(2.0, 1.2, 1.2), patch_size=(16, 16, 16), schemes=None):
    return {"dataset_name": DATASET, "plans_name": "nnUNetPlans", "label_manager": "LabelManager",
            "image_reader_writer": "SimpleITKIO",
            "foreground_intensity_properties_per_channel": {str(c): {"mean": 1.0} for c in range(channels)},
            "configurations": {
                "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
                               "batch_size": 2, "patch_size": list(patch_size), "spacing": list(spacing),
                               "normalization_schemes": schemes or ["ZScoreNormalization"] * channels,
                               "use_mask_for_norm": [True] * channels, "architecture": ARCHITECTURE},
                "3d_fullres_T1ce": {"inherits_from": "3d_fullres", "protokd": {"modality": "T1ce"}}}}


def write_teacher(results: Path, trainer="ProtoKDTeacherTrainer", fold=0, teacher_plans=None,
                  teacher_dataset_json=None, recorded_fold=None) -> Path:
    """A teacher model folder as nnU-Net writes it: plans.json, dataset.json, fold_X/checkpoint_final.pth."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    teacher_plans = teacher_plans or plans()
    teacher_dataset_json = teacher_dataset_json or dataset_json()
    manager = PlansManager(teacher_plans)
    network = nnUNetTrainer.build_network_architecture(
        manager, manager.get_configuration("3d_fullres"), len(teacher_dataset_json["channel_names"]), 3, True)
    folder = results / DATASET / f"{trainer}__nnUNetPlans__3d_fullres"
    (folder / f"fold_{fold}").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(teacher_plans))
    (folder / "dataset.json").write_text(json.dumps(teacher_dataset_json))
    checkpoint = {"network_weights": network.state_dict(), "trainer_name": trainer, "_best_ema": np.float32(0.5),
                  "init_args": {"plans": teacher_plans, "configuration": "3d_fullres",
                                "fold": fold if recorded_fold is None else recorded_fold,
                                "dataset_json": teacher_dataset_json, "device": torch.device("cpu")}}
    torch.save(checkpoint, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder / f"fold_{fold}" / "checkpoint_final.pth"


def locate(results, student_plans=None, fold=0):
    return locate_teacher(student_plans or plans(), "3d_fullres_T1ce", fold, dataset_json(), str(results))


def test_finds_the_same_fold_teacher_and_records_its_hash(tmp_path):
    path = write_teacher(tmp_path)
    found = locate(tmp_path)
    identity = found.identity()
    assert identity["checkpoint"] == str(path) and identity["fold"] == "0"
    assert identity["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert identity["channels"] == ["T1", "T1ce", "T2", "FLAIR"] and found.channel_indices == (0, 1, 2, 3)


def test_teacher_is_frozen_and_runs_without_deep_supervision(tmp_path):
    write_teacher(tmp_path)
    teacher = locate(tmp_path).build(torch.device("cpu"))
    assert not teacher.network.training
    assert not any(p.requires_grad for p in teacher.network.parameters())
    data = torch.randn(2, 4, 16, 16, 16, requires_grad=True)
    logits, features = teacher(data)
    assert logits.shape == (2, 3, 16, 16, 16) and not logits.requires_grad  # one full-resolution output
    assert features["decoder"].shape == (2, 4, 16, 16, 16) and features["bottleneck"].shape == (2, 16, 4, 4, 4)


def test_a_teacher_on_some_channels_gets_exactly_those(tmp_path):
    channels = {"0": "FLAIR", "1": "T1ce"}
    write_teacher(tmp_path, teacher_plans=plans(channels=2), teacher_dataset_json=dataset_json(channels))
    found = locate(tmp_path)
    assert found.channel_indices == (3, 1)
    teacher = found.build(torch.device("cpu"))
    data = torch.randn(1, 4, 16, 16, 16)
    torch.testing.assert_close(teacher(data)[0], teacher.network(data[:, [3, 1]]))


def test_an_explicitly_named_plain_nnunet_teacher(tmp_path):
    write_teacher(tmp_path, trainer="nnUNetTrainer")
    student_plans = plans()
    student_plans["configurations"]["3d_fullres_T1ce"]["protokd"]["teacher"] = {"trainer": "nnUNetTrainer"}
    assert locate(tmp_path, student_plans).identity()["trainer"] == "nnUNetTrainer"
    path = write_teacher(tmp_path / "elsewhere", trainer="MyTrainer")
    student_plans["configurations"]["3d_fullres_T1ce"]["protokd"]["teacher"] = {"checkpoint": str(path)}
    assert locate(tmp_path, student_plans).identity()["checkpoint"] == str(path)


@pytest.mark.parametrize("make_teacher, student_plans, message", [
    (None, None, "fold_0/checkpoint_final.pth does not exist. Train it first \\(nnUNetv2_train "
                 f"{DATASET} 3d_fullres 0 -tr ProtoKDTeacherTrainer\\)"),
    (dict(recorded_fold=1), None, "was trained on fold 1, the student on fold 0: the model would have seen"),
    (dict(recorded_fold="all"), None, "was trained on fold all"),
    (dict(teacher_plans=plans(channels=3), teacher_dataset_json=dataset_json({"0": "T1", "1": "T2", "2": "FLAIR"})),
     None, r"input channels \['T1', 'T2', 'FLAIR'\] do not include the student's modality T1ce"),
    (dict(teacher_plans=plans(channels=2), teacher_dataset_json=dataset_json({"0": "T1ce", "1": "PD"})),
     None, r"include \['PD'\], which the dataset"),
    (dict(teacher_dataset_json=dataset_json(labels={"background": 0, "tumor": 1})), None, "its labels .* differ"),
    (dict(teacher_plans=plans(spacing=(1.0, 1.0, 1.0))), None, r"trained at spacing \[1.0, 1.0, 1.0\]"),
    (dict(teacher_plans=plans(schemes=["ZScoreNormalization"] * 3 + ["CTNormalization"])), None,
     "normalises FLAIR with CTNormalization"),
    (dict(), plans(patch_size=(16, 18, 16)), r"patch size \[16, 18, 16\] is not a multiple .* \[4, 4, 4\]"),
])
def test_unusable_teachers_are_refused_with_the_reason(tmp_path, make_teacher, student_plans, message):
    if make_teacher is not None:
        write_teacher(tmp_path, **make_teacher)
    with pytest.raises(TeacherError, match=f"teacher of {DATASET} 3d_fullres_T1ce fold 0: .*{message}"):
        locate(tmp_path, student_plans)


def test_teacher_of_another_dataset_is_refused(tmp_path):
    other = plans()
    other["dataset_name"] = "Dataset777_Other"
    path = write_teacher(tmp_path, teacher_plans=other)
    student_plans = plans()
    student_plans["configurations"]["3d_fullres_T1ce"]["protokd"]["teacher"] = {"checkpoint": str(path)}
    with pytest.raises(TeacherError, match="belongs to dataset Dataset777_Other"):
        locate(tmp_path, student_plans)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch teacher_code_ran",))


def test_no_code_from_a_teacher_folder_is_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_teacher(tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["payload"] = RunsCode()
    with open(path, "wb") as f:
        pickle.dump(checkpoint, f)  # a pickle that would run a shell command if unpickled unsafely
    with pytest.raises(TeacherError) as raised:
        locate(tmp_path)
    assert not (tmp_path / "teacher_code_ran").exists()
    # the file and PyTorch's reason are named; PyTorch's advice to load it with weights_only=False is not given
    message = str(raised.value)
    assert f"cannot read the checkpoint {path}: it holds Python objects that a weights-only load refuses " \
           f"(Unsupported " in message  # PyTorch's reason, e.g. "Unsupported operand 149" for this pickle
    assert "weights_only" not in message and "will likely succeed" not in message


@pytest.mark.parametrize("content, message", [
    ("state_dict", r"lacks network_weights, init_args \(it is a plain state_dict\)\."),
    ("without_init_args", r"lacks init_args\."),
    ("without_fold", r"lacks init_args\['fold'\]\."),
])
def test_checkpoints_nnunet_did_not_write_are_refused_with_the_reason(tmp_path, content, message):
    path = write_teacher(tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    if content == "state_dict":
        checkpoint = checkpoint["network_weights"]
    elif content == "without_init_args":
        del checkpoint["init_args"]
    else:
        del checkpoint["init_args"]["fold"]
    torch.save(checkpoint, path)
    with pytest.raises(TeacherError, match=f"{path} is not a checkpoint written by nnUNetv2_train: it {message} The "
                                           f"fold and configuration it was trained on must be known"):
        locate(tmp_path)


def wider_plans():
    wider = plans()
    wider["configurations"]["3d_fullres"]["architecture"] = copy.deepcopy(ARCHITECTURE)
    wider["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32]
    return wider


def construct_student(trainer_name, results):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    student_plans = plans()
    student_plans["continue_training"] = False
    return recursive_find_trainer_class_by_name(trainer_name)(student_plans, "3d_fullres_T1ce", 0, dataset_json(),
                                                              torch.device("cpu"))


def test_kdnet_needs_the_students_architecture_but_protokd_does_not(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    write_teacher(tmp_path, teacher_plans=wider_plans())
    with pytest.raises(TeacherError, match=r"features_per_stage \[8, 16, 32\] differ from the student's \[4, 8, 16\]"):
        construct_student("KDNetTrainer", tmp_path)
    assert not (tmp_path / DATASET / "KDNetTrainer__nnUNetPlans__3d_fullres_T1ce").exists()
    # prototype maps are cosine similarities: a wider teacher is fine for ProtoKD
    trainer = construct_student("ProtoKDTrainer", tmp_path)
    assert trainer.teacher_checkpoint.identity()["trainer"] == "ProtoKDTeacherTrainer"
    assert trainer.settings == {"alpha": 10.0, "beta": 0.1, "temperature": 10.0, "intra_class_only": False,
                                "classes": "disjoint", "class_presence": "item", "start_from": "random"}
    # its prototypes on BraTS regions: background, WT-TC, TC-ET, ET, recorded in distillation.json
    assert trainer.prototype_classes == trainer.record()["prototype_classes"] == [[0], [1], [2], [3]]


def test_out_of_range_settings_stop_a_student_before_its_model_folder_exists(tmp_path, monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_protokd.errors import ConfigurationError
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    write_teacher(tmp_path)
    for trainer, configuration, settings in (
            ("ProtoKDTrainer", "3d_fullres_T1ce", {"ProtoKDTrainer": {"temperature": 0}}),
            ("LCKDTrainer", "3d_fullres", {"LCKDTrainer": {"election_fraction": 2}})):
        student_plans = plans()
        student_plans["continue_training"] = False
        student_plans["configurations"][configuration].setdefault("protokd", {}).update(settings)
        with pytest.raises(ConfigurationError, match=f"configuration '{configuration}': {trainer}\\."):
            recursive_find_trainer_class_by_name(trainer)(student_plans, configuration, 0, dataset_json(),
                                                          torch.device("cpu"))
        assert not (tmp_path / DATASET / f"{trainer}__nnUNetPlans__{configuration}").exists()


def test_nnunet_train_prints_our_errors_as_one_line(tmp_path):
    """TeacherError and ConfigurationError inside nnUNetv2_train: the message, not a stack trace."""
    from conftest import BIN, nnunet_environment, run
    folder = tmp_path / "nnUNet_preprocessed" / DATASET
    folder.mkdir(parents=True)
    student_plans = plans()
    student_plans["configurations"]["3d_fullres_T1ce_hot"] = {
        "inherits_from": "3d_fullres", "protokd": {"modality": "T1ce", "ProtoKDTrainer": {"temperature": -1}}}
    (folder / "nnUNetPlans.json").write_text(json.dumps(student_plans))
    (folder / "dataset.json").write_text(json.dumps(dataset_json()))
    env = nnunet_environment(tmp_path)
    for configuration, message in (
            ("3d_fullres_T1ce", f"error: teacher of {DATASET} 3d_fullres_T1ce fold 0: {tmp_path}/nnUNet_results/"
                                f"{DATASET}/ProtoKDTeacherTrainer__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth "
                                f"does not exist. Train it first"),
            ("3d_fullres_T1ce_hot", "error: configuration '3d_fullres_T1ce_hot': ProtoKDTrainer.temperature must be "
                                    "a number > 0, got -1\n")):
        result = run([BIN / "nnUNetv2_train", "501", configuration, "0", "-tr", "ProtoKDTrainer", "-device", "cpu"],
                     env, expect_success=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1, result.stderr
