"""Student configurations in the plans, and the one place that slices a multi-channel plan to one channel."""
import json

import numpy as np
import pytest
import torch

from nnunet_protokd.channels import StudentModality, with_input_channel_check
from nnunet_protokd.errors import ConfigurationError
from nnunet_protokd.plans import add_configuration, resolved_configuration

DATASET_JSON = {"channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
                "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
                "regions_class_order": [1, 2, 3], "file_ending": ".nii.gz", "numTraining": 4}


ARCHITECTURE = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {}, "_kw_requires_import": []}


def tiny_architecture(network_class: str = "PlainConvUNet", strides=((1, 1, 1), (1, 2, 2), (2, 2, 2))) -> dict:
    """A plans entry "architecture" that nnU-Net builds in milliseconds: 3 stages of 4, 8 and 16 features, one
    convolution (PlainConvUNet) or 1, 2, 2 residual blocks (ResidualEncoderUNet) per encoder stage."""
    blocks = {"PlainConvUNet": {"n_conv_per_stage": [1, 1, 1]},
              "ResidualEncoderUNet": {"n_blocks_per_stage": [1, 2, 2]}}[network_class]
    return {"network_class_name": f"dynamic_network_architectures.architectures.unet.{network_class}",
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
                            "kernel_sizes": [[3, 3, 3]] * 3, "strides": [list(stride) for stride in strides],
                            **blocks, "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


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
                      schedule={"num_epochs": 2, "num_iterations_per_epoch": 5, "num_val_iterations_per_epoch": None,
                                "seed": 4})
    name = add_configuration(str(plans_file), DATASET_JSON, "3d_smoke", modality="FLAIR")
    resolved = resolved_configuration(json.loads(plans_file.read_text()), name)
    # a nested dict is replaced, not merged, by nnU-Net's inheritance: the schedule must be carried over
    assert resolved["protokd"] == {"num_epochs": 2, "num_iterations_per_epoch": 5, "seed": 4, "modality": "FLAIR"}


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
    (dict(base="3d_fullres", name="x", schedule={"num_epochs": 0}), "num_epochs must be an integer >= 1, got 0"),
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


# ----- add-config never corrupts the plans (issue 15, item 1)

def test_a_configuration_never_inherits_from_itself(plans_file):
    add_configuration(str(plans_file), DATASET_JSON, "3d_fullres", name="3d_smoke", schedule={"num_epochs": 2})
    add_configuration(str(plans_file), DATASET_JSON, "3d_smoke", name="3d_smoke_short", schedule={"num_epochs": 1})
    before = plans_file.read_text()
    with pytest.raises(ConfigurationError, match="'3d_smoke' cannot inherit from '3d_smoke': 3d_smoke -> 3d_fullres "
                                                 "would become a cycle"):
        add_configuration(str(plans_file), DATASET_JSON, "3d_smoke", name="3d_smoke", overwrite=True,
                          schedule={"num_epochs": 5})
    with pytest.raises(ConfigurationError, match="3d_smoke_short -> 3d_smoke -> 3d_fullres would become a cycle"):
        add_configuration(str(plans_file), DATASET_JSON, "3d_smoke_short", name="3d_smoke", overwrite=True)
    assert plans_file.read_text() == before


@pytest.mark.parametrize("name", ["3d_fullres", "2d"])
def test_configurations_planned_by_nnunet_are_never_replaced(plans_file, name):
    add_configuration(str(plans_file), DATASET_JSON, "3d_fullres", name="3d_smoke", schedule={"num_epochs": 2})
    before = plans_file.read_text()
    with pytest.raises(ConfigurationError, match=f"configuration '{name}' was planned by nnU-Net; add-config never "
                                                 f"replaces it"):
        add_configuration(str(plans_file), DATASET_JSON, "3d_smoke", modality="T1", name=name, overwrite=True)
    assert plans_file.read_text() == before


@pytest.mark.parametrize("name", ["bad name/x", "a/b", "x__y", "_x", "T1ce ", ""])
def test_configuration_names_must_fit_nnunet_model_folder_names(plans_file, name):
    before = plans_file.read_text()
    with pytest.raises(ConfigurationError, match="is not usable in nnU-Net's model folder names|needs a name"):
        add_configuration(str(plans_file), DATASET_JSON, "3d_fullres", modality="T1" if name else None,
                          name=name or None)
    assert plans_file.read_text() == before


def test_the_previous_plans_are_kept_and_a_failed_write_changes_nothing(plans_file, monkeypatch):
    original = plans_file.read_text()
    add_configuration(str(plans_file), DATASET_JSON, "3d_fullres", modality="T1")
    backup = plans_file.with_name(plans_file.name + ".bak")
    assert backup.read_text() == original
    changed = plans_file.read_text()

    def failing_replace(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        add_configuration(str(plans_file), DATASET_JSON, "3d_fullres", modality="T2")
    assert plans_file.read_text() == changed
    assert not [p for p in plans_file.parent.iterdir() if p.name.startswith(".tmp_")]


# ----- every setting has a documented range, checked at add-config and when a trainer starts (item 2)

@pytest.mark.parametrize("methods, message", [
    ({"ProtoKDTrainer": {"temperature": 0}}, "ProtoKDTrainer.temperature must be a number > 0, got 0"),
    ({"ProtoKDTrainer": {"temperature": -2.0}}, "ProtoKDTrainer.temperature must be a number > 0, got -2.0"),
    ({"ProtoKDTrainer": {"alpha": -1}}, "ProtoKDTrainer.alpha must be a number >= 0, got -1"),
    ({"ProtoKDTrainer": {"beta": float("inf")}}, "ProtoKDTrainer.beta must be a number >= 0, got Infinity"),
    ({"ProtoKDTrainer": {"beta": True}}, "ProtoKDTrainer.beta must be a number >= 0, got true"),
    ({"ProtoKDTrainer": {"intra_class_only": 1}}, "ProtoKDTrainer.intra_class_only must be true or false, got 1"),
    ({"KDNetTrainer": {"lambda": 1.5}}, r"KDNetTrainer.lambda must be a number in \[0, 1\], got 1.5"),
    ({"KDNetTrainer": {"temperature": float("nan")}}, "KDNetTrainer.temperature must be a number > 0, got NaN"),
    ({"LCKDTrainer": {"election_fraction": 2}}, r"LCKDTrainer.election_fraction must be a number in \(0, 1\), got 2"),
    ({"LCKDTrainer": {"election_fraction": 0}}, r"election_fraction must be a number in \(0, 1\), got 0"),
    ({"LCKDTrainer": {"election_interval": 2.5}}, "LCKDTrainer.election_interval must be an integer >= 1, got 2.5"),
    ({"LCKDTrainer": {"election_batches": 0}}, "LCKDTrainer.election_batches must be an integer >= 1, got 0"),
    ({"LCKDTrainer": {"full_modality_fraction": -0.1}}, r"full_modality_fraction must be a number in \[0, 1\]"),
    ({"LCKDTrainer": {"kd_weight": -1}}, "LCKDTrainer.kd_weight must be a number >= 0, got -1"),
    ({"ProtoKDTrainer": {"gamma": 1}}, "unknown ProtoKDTrainer setting 'gamma'"),
    ({"ProtoKD": {"beta": 1}}, "no trainer 'ProtoKD' has settings"),
])
def test_settings_outside_their_range_are_refused(plans_file, methods, message):
    before = plans_file.read_text()
    with pytest.raises(ConfigurationError, match=message):
        add_configuration(str(plans_file), DATASET_JSON, "3d_fullres", modality="T1ce", name="x", methods=methods)
    assert plans_file.read_text() == before


def test_the_ends_of_each_range_are_accepted(plans_file):
    methods = {"ProtoKDTrainer": {"alpha": 0, "beta": 0.0, "temperature": 1e-3, "intra_class_only": True},
               "KDNetTrainer": {"lambda": 1, "alpha": 0},
               "LCKDTrainer": {"full_modality_fraction": 1.0, "election_fraction": 0.999, "election_interval": 1}}
    name = add_configuration(str(plans_file), DATASET_JSON, "3d_fullres", modality="T1ce", methods=methods,
                             schedule={"num_epochs": 1, "num_iterations_per_epoch": 1,
                                       "num_val_iterations_per_epoch": 1})
    assert resolved_configuration(json.loads(plans_file.read_text()), name)["protokd"]["KDNetTrainer"]["lambda"] == 1


@pytest.mark.parametrize("settings, message", [
    ({"modality": "T1ce", "ProtoKDTrainer": {"temperature": 0}}, "ProtoKDTrainer.temperature must be a number > 0"),
    ({"num_epochs": 0}, "num_epochs must be an integer >= 1, got 0"),
    ({"num_iterations_per_epoch": 2.5}, "num_iterations_per_epoch must be an integer >= 1, got 2.5"),
    ({"final_validation": "no"}, "final_validation must be true or false"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
])
def test_hand_edited_plans_are_checked_where_trainers_read_them(settings, message):
    """Trainers read their configuration through resolved_configuration before nnU-Net makes a model folder."""
    plans = make_plans()
    plans["configurations"]["edited"] = {"inherits_from": "3d_fullres", "protokd": settings}
    with pytest.raises(ConfigurationError, match=f"configuration 'edited': {message}"):
        resolved_configuration(plans, "edited")
    from nnunet_protokd.plans import method_settings
    with pytest.raises(ConfigurationError, match="KDNetTrainer.lambda must be a number in"):
        method_settings({"protokd": {"KDNetTrainer": {"lambda": -1}}}, "KDNetTrainer")


def test_plans_that_nnunet_cannot_resolve_are_named():
    plans = make_plans()
    plans["configurations"]["a"] = {"inherits_from": "b"}
    plans["configurations"]["b"] = {"inherits_from": "a"}
    with pytest.raises(ConfigurationError, match=r"configuration 'a' inherits from itself \(a -> b -> a\)"):
        resolved_configuration(plans, "a")


# ----- the command line

@pytest.fixture
def preprocessed(tmp_path):
    """nnU-Net folders holding a preprocessed Dataset501 (plans and dataset.json only)."""
    from conftest import nnunet_environment
    folder = tmp_path / "nnUNet_preprocessed" / "Dataset501_BraTS2018"
    folder.mkdir(parents=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps(make_plans()))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    (tmp_path / "nnUNet_results").mkdir()
    return nnunet_environment(tmp_path), folder / "nnUNetPlans.json"


def test_add_config_command_lists_the_settings_and_refuses_bad_values_in_one_line(preprocessed):
    from conftest import BIN, run
    env, plans_file = preprocessed
    help_text = run([BIN / "nnunet-protokd", "add-config", "-h"], env).stdout
    assert "ProtoKDTrainer.temperature: a number > 0, default 10.0" in help_text
    assert "KDNetTrainer.lambda: a number in [0, 1], default 0.75" in help_text
    assert "LCKDTrainer.election_fraction: a number in (0, 1), default 0.1" in help_text
    before = plans_file.read_text()
    for assignment, message in (
            ("ProtoKDTrainer.beta=1e400", "ProtoKDTrainer.beta must be a number >= 0, got Infinity"),
            ("ProtoKDTrainer.beta=Infinity", "ProtoKDTrainer.beta must be a number >= 0, got Infinity"),
            ("KDNetTrainer.temperature=0", "KDNetTrainer.temperature must be a number > 0, got 0")):
        result = run([BIN / "nnunet-protokd", "add-config", "-d", "501", "-m", "T1ce", "--set", assignment], env,
                     expect_success=False)
        assert result.returncode == 1
        assert result.stderr == f"error: configuration '3d_fullres_T1ce': {message}\n"
    assert plans_file.read_text() == before and "Infinity" not in before


def test_a_named_teacher_must_exist_when_the_configuration_is_added(preprocessed, tmp_path):
    from conftest import BIN, run
    env, plans_file = preprocessed
    before = plans_file.read_text()
    result = run([BIN / "nnunet-protokd", "add-config", "-d", "501", "-m", "T1ce", "--teacher-trainer",
                  "nnUNetTrainr"], env, expect_success=False)
    results = tmp_path / "nnUNet_results" / "Dataset501_BraTS2018"
    assert result.returncode == 1 and result.stderr == (
        f"error: teacher of Dataset501_BraTS2018 3d_fullres_T1ce: no checkpoint {results}/nnUNetTrainr__nnUNetPlans"
        f"__3d_fullres/fold_*/checkpoint_final.pth exists; check --teacher-trainer, --teacher-configuration, "
        f"--teacher-plans and --teacher-checkpoint\n")
    result = run([BIN / "nnunet-protokd", "add-config", "-d", "501", "-m", "T1ce", "--teacher-checkpoint",
                  "teachers/missing.pth"], env, expect_success=False)
    assert result.returncode == 1 and "no checkpoint " in result.stderr and "/teachers/missing.pth exists" in \
        result.stderr
    assert plans_file.read_text() == before
    fold = results / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_2"
    fold.mkdir(parents=True)
    (fold / "checkpoint_best.pth").write_bytes(b"a checkpoint")
    run([BIN / "nnunet-protokd", "add-config", "-d", "501", "-m", "T1ce", "--teacher-trainer", "nnUNetTrainer",
         "--teacher-checkpoint", "checkpoint_best.pth"], env)
    teacher = json.loads(plans_file.read_text())["configurations"]["3d_fullres_T1ce"]["protokd"]["teacher"]
    assert teacher == {"trainer": "nnUNetTrainer", "checkpoint": "checkpoint_best.pth"}


def test_add_configurations_at_once_all_survive(plans_file, monkeypatch):
    """Four add-config runs at once (a workflow's parallel configure steps) each re-read, change and replace the
    plans under the plans file's lock: each configuration survives, not only the last one written."""
    import threading

    import nnunet_protokd.plans as plans_module
    everyone_has_read = threading.Barrier(4)
    replace = plans_module.replace_plans_file

    def replace_once_everyone_has_read(plans, path):  # without the lock, each would write what it read plus its own
        try:
            everyone_has_read.wait(timeout=0.5)
        except threading.BrokenBarrierError:  # the others wait for the lock: they read after this write
            pass
        replace(plans, path)

    monkeypatch.setattr(plans_module, "replace_plans_file", replace_once_everyone_has_read)
    threads = [threading.Thread(target=add_configuration, args=(str(plans_file), DATASET_JSON, "3d_fullres", m))
               for m in ("T1", "T1ce", "T2", "FLAIR")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    configurations = json.loads(plans_file.read_text())["configurations"]
    assert sorted(configurations) == ["2d", "3d_fullres", "3d_fullres_FLAIR", "3d_fullres_T1", "3d_fullres_T1ce",
                                      "3d_fullres_T2"]
