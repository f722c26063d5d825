"""Resolved settings recorded with the plugin version, and `--c` refused when the settings a checkpoint was
trained with differ from what its configuration resolves to now (e.g. after defaults moved)."""
import json
import shlex

import pytest

from nnunet_protokd import __version__
from nnunet_protokd.cli import main as cli
from nnunet_protokd.errors import ConfigurationError
from nnunet_protokd.methods import METHOD_DEFAULTS, SETTINGS_OF_0_1_0
from nnunet_protokd.plans import add_configuration, resolved_configuration
from nnunet_protokd.training.records import RecordedSettings, recorded_settings
from tests.test_student_settings import DATASET_JSON, make_plans


class PlansManager:
    def __init__(self, plans):
        self.plans = plans


def trainer(name: str, plans: dict, configuration: str):
    """A RecordedSettings trainer of class `name`, resolved as the plugin's trainers resolve theirs."""
    instance = type(name, (RecordedSettings,), {})()
    instance.resolve_settings(plans, configuration)
    instance.configuration_name, instance.plans_manager, instance.logged = configuration, PlansManager(plans), []
    instance.print_to_log_file = instance.logged.append
    return instance


@pytest.fixture
def preprocessed(tmp_path, monkeypatch):
    """The preprocessed plans of Dataset501 (nnUNet_preprocessed pointed at tmp_path)."""
    folder = tmp_path / "Dataset501_BraTS2018"
    folder.mkdir()
    (folder / "nnUNetPlans.json").write_text(json.dumps(make_plans()))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    monkeypatch.setattr("nnunetv2.paths.nnUNet_preprocessed", str(tmp_path))
    return folder / "nnUNetPlans.json"


def plans_of(plans_file):
    return json.loads(plans_file.read_text())


def test_the_record_holds_every_resolved_setting_and_the_version(preprocessed):
    add_configuration(str(preprocessed), DATASET_JSON, "3d_fullres", "T1ce", methods={"ProtoKDTrainer": {"beta": 0}})
    record = trainer("ProtoKDTrainer", plans_of(preprocessed), "3d_fullres_T1ce").record()
    assert record == {"method": "ProtoKDTrainer", "plugin_version": __version__,
                      "settings": {**METHOD_DEFAULTS["ProtoKDTrainer"], "beta": 0}}


def test_a_checkpoint_with_the_same_settings_continues():
    protokd = trainer("ProtoKDTrainer", make_plans(), "3d_fullres")
    protokd.check_checkpoint({"protokd": protokd.record()}, "checkpoint_latest.pth")
    # one of 0.1.0 whose missing settings are now pinned to 0.1.0's values: it continues, and the log says so
    pinned = make_plans()
    pinned["configurations"]["3d_fullres"]["protokd"] = {"ProtoKDTrainer": {"classes": "regions"}}
    old = {"method": "ProtoKDTrainer", "settings": {"alpha": 10.0, "beta": 0.1, "temperature": 10.0,
                                                    "intra_class_only": False}, "teacher": {}}
    trainer_of_pinned = trainer("ProtoKDTrainer", pinned, "3d_fullres")
    trainer_of_pinned.check_checkpoint({"protokd": old}, "checkpoint_latest.pth")
    assert "continuing a checkpoint of nnunet-protokd 0.1.0" in trainer_of_pinned.logged[0]


def test_a_0_1_0_student_is_refused_with_the_command_that_pins_its_settings(preprocessed):
    add_configuration(str(preprocessed), DATASET_JSON, "3d_fullres", name="3d_smoke", schedule={"num_epochs": 2})
    add_configuration(str(preprocessed), DATASET_JSON, "3d_smoke", "T1ce", methods={"ProtoKDTrainer": {"beta": 0}})
    old = {"method": "ProtoKDTrainer", "settings": {"alpha": 10.0, "beta": 0, "temperature": 10.0,
                                                    "intra_class_only": False}}
    with pytest.raises(ConfigurationError) as error:
        trainer("ProtoKDTrainer", plans_of(preprocessed), "3d_smoke_T1ce").check_checkpoint(
            {"protokd": old}, "fold_0/checkpoint_latest.pth")
    message = str(error.value)
    assert message.startswith("fold_0/checkpoint_latest.pth was trained by ProtoKDTrainer of nnunet-protokd 0.1.0 "
                              "with other settings than configuration '3d_smoke_T1ce' resolves to now")
    assert "classes 'regions' -> 'disjoint'" in message and "beta" not in message.split("):")[1].split(".")[0]
    command = message.split("`")[1]
    assert command == ("nnunet-protokd add-config -d Dataset501_BraTS2018 -p nnUNetPlans -c 3d_smoke -m T1ce "
                       "--name 3d_smoke_T1ce --set ProtoKDTrainer.beta=0 --set ProtoKDTrainer.classes=regions "
                       "--overwrite")
    # the command does what it says: afterwards the checkpoint continues, and the configuration kept its settings
    assert cli(shlex.split(command)[1:]) == 0
    plans = plans_of(preprocessed)
    trainer("ProtoKDTrainer", plans, "3d_smoke_T1ce").check_checkpoint({"protokd": old}, "checkpoint_latest.pth")
    assert resolved_configuration(plans, "3d_smoke_T1ce")["protokd"]["num_epochs"] == 2


def test_a_0_1_0_lckd_model_without_any_record_is_refused_with_the_json_to_pin(preprocessed):
    lckd = trainer("LCKDTrainer", plans_of(preprocessed), "3d_fullres")  # nnU-Net's own configuration
    with pytest.raises(ConfigurationError) as error:
        lckd.check_checkpoint({"network_weights": {}}, "checkpoint_final.pth")
    message = str(error.value)
    for change in ("fusion 'mean' -> 'slots'", "kd_from_start False -> True", "kd_pair_reduction 'mean' -> 'sum'",
                   "subset_sampling 'per_item' -> 'per_batch'", "full_modality_fraction 0.2 -> 0.41",
                   "election_interval 10 -> 20"):
        assert change in message
    pinned = json.loads(message.split("pin the old values in the plans: add ")[1].split(" to configuration")[0])
    assert pinned == {"protokd": {"LCKDTrainer": {key: value for key, value in SETTINGS_OF_0_1_0["LCKDTrainer"].items()
                                                  if value != METHOD_DEFAULTS["LCKDTrainer"][key]}}}
    plans = plans_of(preprocessed)
    plans["configurations"]["3d_fullres"].update(pinned)
    trainer("LCKDTrainer", plans, "3d_fullres").check_checkpoint({"network_weights": {}}, "checkpoint_final.pth")


def test_a_record_of_this_version_with_other_settings_is_refused():
    kdnet = trainer("KDNetTrainer", make_plans(), "3d_fullres")
    record = {**kdnet.record(), "settings": {**kdnet.settings, "kl_reduction": "mean"}}
    with pytest.raises(ConfigurationError, match=rf"nnunet-protokd {__version__} .*kl_reduction 'mean' -> 'sum'"):
        kdnet.check_checkpoint({"protokd": record}, "checkpoint_best.pth")
    assert recorded_settings(record, "KDNetTrainer", {}) == (record["settings"], __version__)


def test_a_variant_of_a_trainer_reads_and_records_its_methods_settings():
    base = type("KDNetTrainer", (RecordedSettings,), {})
    variant = type("KDNetTrainer_5epochs", (base,), {})()
    plans = make_plans()
    plans["configurations"]["3d_fullres"]["protokd"] = {"KDNetTrainer": {"alpha": 1.0}}
    variant.resolve_settings(plans, "3d_fullres")
    assert variant.settings == {**METHOD_DEFAULTS["KDNetTrainer"], "alpha": 1.0}
    assert variant.record()["method"] == "KDNetTrainer"
