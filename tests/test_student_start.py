"""A distilled student started from the modality-dropout model of its fold (setting start_from), first convolution
sliced to its channel; the papers' random start stays the default."""
import json

import pytest
import torch
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

from nnunet_protokd.errors import TeacherError
from nnunet_protokd.training.records import recorded_settings
from tests.test_teacher import DATASET, dataset_json, plans, write_teacher

MODALITY_DROPOUT = "ModalityDropoutTrainer"


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch):
    """nnUNet_results with a teacher, and a preprocessed folder from which nnU-Net's initialize infers its dataset
    format (blosc2 files)."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setenv("nnUNet_compile", "false")
    data = tmp_path / "preprocessed" / DATASET / "nnUNetPlans_3d_fullres"
    data.mkdir(parents=True)
    (data / "case_0.b2nd").touch()
    write_teacher(tmp_path)
    return tmp_path


def student(trainer: str, start_from: str | None = None, fold: int = 0):
    student_plans = plans()
    student_plans["continue_training"] = False
    student_plans["configurations"]["3d_fullres"]["batch_dice"] = True  # what nnU-Net's loss reads in initialize
    if start_from is not None:
        student_plans["configurations"]["3d_fullres_T1ce"]["protokd"][trainer] = {"start_from": start_from}
    return recursive_find_trainer_class_by_name(trainer)(student_plans, "3d_fullres_T1ce", fold, dataset_json(),
                                                         torch.device("cpu"))


@pytest.mark.parametrize("trainer", ["ProtoKDTrainer", "KDNetTrainer"])
def test_a_student_starts_as_the_modality_dropout_model_fed_its_channel_alone(nnunet_folders, trainer):
    start = write_teacher(nnunet_folders, trainer=MODALITY_DROPOUT)
    # random weights everywhere (nnU-Net starts biases at 0), so that a wrong slice or a missed tensor shows
    checkpoint = torch.load(start, weights_only=False)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # in place: a module reached by several names (all_modules, decoder.encoder) stays one
        for value in {value.data_ptr(): value for value in checkpoint["network_weights"].values()}.values():
            value.copy_(torch.randn(value.shape, generator=generator))
    torch.save(checkpoint, start)

    started = student(trainer, "modality_dropout")
    started.initialize()
    weights, source = started.network.state_dict(), checkpoint["network_weights"]
    first = "encoder.stages.0.0.convs.0.conv.weight"
    assert source[first].shape[1] == 4 and weights[first].shape[1] == 1
    torch.testing.assert_close(weights[first], source[first][:, 1:2])  # T1ce is channel 1
    different = [name for name, value in weights.items() if not torch.equal(value, source[name])]
    assert different == [n for n in weights if n.endswith("stages.0.0.convs.0.conv.weight")
                         or n.endswith("stages.0.0.convs.0.all_modules.0.weight")], different
    assert started.record()["started_from"]["checkpoint"] == str(start)
    assert started.record()["settings"]["start_from"] == "modality_dropout"

    # the default is the papers' random start: nothing is read from the modality-dropout folder
    default = student(trainer)
    default.initialize()
    assert default.settings["start_from"] == "random" and "started_from" not in default.record()
    assert not torch.equal(default.network.state_dict()[first], weights[first])


def test_a_missing_or_other_fold_modality_dropout_model_stops_the_student_before_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    write_teacher(tmp_path)
    with pytest.raises(TeacherError, match=f"modality-dropout start of {DATASET} 3d_fullres_T1ce fold 0: .*"
                                           f"{MODALITY_DROPOUT}__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth "
                                           f"does not exist. Train it to the end first \\(nnUNetv2_train {DATASET} "
                                           f"3d_fullres 0 -tr {MODALITY_DROPOUT}\\)"):
        student("ProtoKDTrainer", "modality_dropout")
    write_teacher(tmp_path, trainer=MODALITY_DROPOUT, fold=0, recorded_fold=1)
    with pytest.raises(TeacherError, match="was trained on fold 1, the student on fold 0: the model would have seen"):
        student("ProtoKDTrainer", "modality_dropout")
    assert not (tmp_path / DATASET / "ProtoKDTrainer__nnUNetPlans__3d_fullres_T1ce").exists()


def test_a_model_recorded_before_the_setting_existed_continues_as_a_random_start():
    record = json.loads(json.dumps({"method": "ProtoKDTrainer", "plugin_version": "0.2.0",
                                    "settings": {"alpha": 10.0, "beta": 0.1}}))
    settings, version = recorded_settings(record, "ProtoKDTrainer", {})
    assert settings == {"alpha": 10.0, "beta": 0.1, "start_from": "random"} and version == "0.2.0"
    settings, _ = recorded_settings(record, "LCKDTrainer", {})  # LCKD has no such setting
    assert "start_from" not in settings
