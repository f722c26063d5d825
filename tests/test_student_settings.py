"""Student configurations in the plans, and the one place that slices a multi-channel plan to one channel."""
import json

import numpy as np
import pytest
import torch

from nnunet_protokd.configurations import ConfigurationError, add_configuration, resolved_configuration
from nnunet_protokd.modality import StudentModality, with_input_channel_check

DATASET_JSON = {"channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
                "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
                "regions_class_order": [1, 2, 3], "file_ending": ".nii.gz", "numTraining": 4}


ARCHITECTURE = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {}, "_kw_requires_import": []}


def make_plans() -> dict:
    per_channel = {str(c): {"mean": 10.0 * c, "std": 1.0 + c} for c in range(4)}
    return {"dataset_name": "Dataset501_BraTS2018", "plans_name": "nnUNetPlans",
            "foreground_intensity_properties_per_channel": per_channel,
            "configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2,
                                              "architecture": ARCHITECTURE,
                                              "normalization_schemes": ["ZScoreNormalization", "ZScoreNormalization",
                                                                        "ZScoreNormalization", "CTNormalization"],
                                              "use_mask_for_norm": [True, False, True, False]},
                               "2d": {"data_identifier": "nnUNetPlans_2d", "architecture": ARCHITECTURE,
                                      "normalization_schemes": ["A", "B", "C", "D"],
                                      "use_mask_for_norm": [True, True, False, False]}}}


@pytest.fixture
def plans_file(tmp_path):
    path = tmp_path / "nnUNetPlans.json"
    path.write_text(json.dumps(make_plans()))
    return path


def test_student_configuration_inherits_base_and_its_data(plans_file):
    name = add_configuration(str(plans_file), DATASET_JSON, "3d_fullres", modality="t1ce")
    assert name == "3d_fullres_T1ce"  # spelled as the dataset spells it
    plans = json.loads(plans_file.read_text())
    resolved = resolved_configuration(plans, name)
    assert resolved["data_identifier"] == "nnUNetPlans_3d_fullres" and resolved["batch_size"] == 2
    assert resolved["protokd"] == {"modality": "T1ce"}


def test_schedule_configuration_and_student_of_it(plans_file):
    add_configuration(str(plans_file), DATASET_JSON, "3d_fullres", name="3d_smoke",
                      schedule={"num_epochs": 2, "num_iterations_per_epoch": 5, "num_val_iterations_per_epoch": None})
    name = add_configuration(str(plans_file), DATASET_JSON, "3d_smoke", modality="FLAIR")
    resolved = resolved_configuration(json.loads(plans_file.read_text()), name)
    # a nested dict is replaced, not merged, by nnU-Net's inheritance: the schedule must be carried over
    assert resolved["protokd"] == {"num_epochs": 2, "num_iterations_per_epoch": 5, "modality": "FLAIR"}


def test_adding_is_idempotent_and_never_overwrites_silently(plans_file):
    add_configuration(str(plans_file), DATASET_JSON, "3d_fullres", modality="T2")
    before = plans_file.read_text()
    add_configuration(str(plans_file), DATASET_JSON, "3d_fullres", modality="T2")
    assert plans_file.read_text() == before
    with pytest.raises(ConfigurationError, match="already exists .* pass --overwrite"):
        add_configuration(str(plans_file), DATASET_JSON, "3d_fullres", modality="T1", name="3d_fullres_T2")
    assert plans_file.read_text() == before
    add_configuration(str(plans_file), DATASET_JSON, "3d_fullres", modality="T1", name="3d_fullres_T2", overwrite=True)
    assert json.loads(plans_file.read_text())["configurations"]["3d_fullres_T2"]["protokd"]["modality"] == "T1"


@pytest.mark.parametrize("kwargs, message", [
    (dict(base="3d_fullres", modality="PD"), r"modality 'PD' is not one of this dataset's channels \['T1', 'T1ce'"),
    (dict(base="3d_lowres", modality="T1"), "configuration '3d_lowres' is not in the plans"),
    (dict(base="3d_fullres"), "needs a name"),
    (dict(base="3d_fullres", name="x", schedule={"num_epochs": 0}), "num_epochs must be a positive integer"),
])
def test_bad_requests_are_refused_and_leave_plans_untouched(plans_file, kwargs, message):
    before = plans_file.read_text()
    with pytest.raises(ConfigurationError, match=message):
        add_configuration(str(plans_file), DATASET_JSON, **kwargs)
    assert plans_file.read_text() == before


def test_student_of_a_student_is_refused(plans_file):
    add_configuration(str(plans_file), DATASET_JSON, "3d_fullres", modality="T1")
    with pytest.raises(ConfigurationError, match="already a student configuration"):
        add_configuration(str(plans_file), DATASET_JSON, "3d_fullres_T1", modality="T2")


def student(modality="T1ce", configuration="3d_fullres_x") -> StudentModality:
    plans = make_plans()
    plans["configurations"][configuration] = {"inherits_from": "3d_fullres", "protokd": {"modality": modality}}
    return StudentModality.of_configuration(plans, configuration, DATASET_JSON)


def test_modality_from_configuration_and_clear_error_without_one():
    assert student("flair") == StudentModality("FLAIR", 3)
    with pytest.raises(ConfigurationError, match="names no student modality.*nnunet-protokd add-config"):
        StudentModality.of_configuration(make_plans(), "3d_fullres", DATASET_JSON)


def test_select_cuts_batches_and_cases_to_the_student_channel():
    modality = student("T2")
    batch = torch.arange(2 * 4 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 4, 3, 5, 6)
    torch.testing.assert_close(modality.select(batch), batch[:, 2:3])
    case = np.random.default_rng(0).normal(size=(4, 3, 5, 6))
    np.testing.assert_array_equal(modality.select(case, channel_axis=0), case[2:3])
    with pytest.raises(ValueError, match="T2 is channel 2, but the data has only 1 channel"):
        modality.select(batch[:, :1])


def test_single_channel_plans_put_the_student_channel_first_everywhere():
    plans = make_plans()
    sliced = student("T2").single_channel_plans(plans)
    assert plans == make_plans()  # the input is not modified
    assert sliced["foreground_intensity_properties_per_channel"]["0"] == {"mean": 20.0, "std": 3.0}
    assert sliced["configurations"]["3d_fullres"]["use_mask_for_norm"][0] is True
    assert sliced["configurations"]["2d"]["normalization_schemes"][0] == "C"
    flair = student("FLAIR").single_channel_plans(plans)["configurations"]["3d_fullres"]
    assert flair["normalization_schemes"][0] == "CTNormalization" and flair["use_mask_for_norm"][0] is False
    # slicing twice (e.g. plans that came from a student's model folder) changes nothing more
    again = StudentModality.of_configuration(
        {**sliced, "configurations": {**sliced["configurations"],
                                      "s": {"inherits_from": "3d_fullres", "protokd": {"modality": "T2"}}}},
        "s", student("T2").single_channel_dataset_json(DATASET_JSON))
    assert again.channel_index == 0
    assert again.single_channel_plans(sliced)["configurations"]["2d"] == sliced["configurations"]["2d"]


def test_single_channel_dataset_json_has_one_channel_and_records_the_source():
    dataset_json = student("T1ce").single_channel_dataset_json(DATASET_JSON)
    assert dataset_json["channel_names"] == {"0": "T1ce"}
    assert dataset_json["protokd"]["source_channel_indices"] == [1]
    assert dataset_json["labels"] == DATASET_JSON["labels"] and DATASET_JSON["channel_names"]["0"] == "T1"


def test_dataset_class_gives_final_validation_the_student_channel():
    class FourChannelDataset:
        def load_case(self, identifier):
            return np.stack([np.full((2, 2, 2), c) for c in range(4)]), "seg", None, {"id": identifier}

    data, seg, _, properties = student("T2").dataset_class(FourChannelDataset)().load_case("case")
    assert data.shape == (1, 2, 2, 2) and np.all(data == 2) and properties == {"id": "case"}


def test_network_refuses_a_wrong_number_of_channels_with_the_expected_files():
    network = with_input_channel_check(torch.nn.Conv3d(1, 2, 1), 1, student("T1ce").single_channel_plans(make_plans()))
    assert network(torch.zeros(1, 1, 2, 2, 2)).shape == (1, 2, 2, 2, 2)
    with pytest.raises(ValueError, match=r"takes 1 input channel\(s\) per case \(<case>_0000 = T1ce only\) "
                                         r"but received 4"):
        network(torch.zeros(1, 4, 2, 2, 2))
