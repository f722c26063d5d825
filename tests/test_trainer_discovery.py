"""nnU-Net finds the plugin's trainers without shell set-up, and they refuse configurations they cannot train."""
import os

import pytest
from conftest import BIN, REPO, run
from test_student_settings import DATASET_JSON, make_plans

from nnunet_protokd.errors import ConfigurationError
from nnunet_protokd.trainer_path import ENV_VARIABLE, register

FIND = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find;"
        "print(*[f'{c.__module__}.{c.__name__}<{c.__mro__[1].__module__}' "
        "        for c in map(find, ('ProtoKDTeacherTrainer', 'UnimodalTrainer', 'ProtoKDTrainer', 'KDNetTrainer'))])")


def test_nnunet_finds_the_trainers_with_no_environment_variable_set():
    env = {k: v for k, v in os.environ.items() if k != ENV_VARIABLE}
    result = run([BIN / "python", "-c", FIND], env, expect_success=False)
    assert result.returncode == 0, ("nnU-Net did not find the trainers; was `nnunet-protokd register-trainers` "
                                    "run in this environment (bootstrap.sh does it)?\n" + result.stderr[-2000:])
    # modules named after the files in trainers/, which nnU-Net imports from that folder
    assert result.stdout.splitlines()[-1].split() == [
        "ProtoKDTeacherTrainer.ProtoKDTeacherTrainer<nnunet_protokd.training.base",
        "UnimodalTrainer.UnimodalTrainer<nnunet_protokd.training.base",
        "ProtoKDTrainer.ProtoKDTrainer<nnunet_protokd.training.distillation",
        "KDNetTrainer.KDNetTrainer<nnunet_protokd.training.distillation"]
    assert f"Searching in: {REPO / 'trainers'}" in result.stdout + result.stderr


def test_registration_keeps_the_users_own_trainer_folders(tmp_path):
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    register(str(site_dir))
    env = dict(os.environ, **{ENV_VARIABLE: "/my/trainers"})
    code = f"import site, os; site.addsitedir({str(site_dir)!r}); print(os.environ[{ENV_VARIABLE!r}])"
    folders = run([BIN / "python", "-c", code], env).stdout.strip().split(os.pathsep)
    assert folders == ["/my/trainers", str(REPO / "trainers")]


def student_plans():
    plans = make_plans()
    plans["configurations"]["3d_fullres_T1ce"] = {"inherits_from": "3d_fullres", "protokd": {"modality": "T1ce"}}
    plans["continue_training"] = False
    return plans


@pytest.mark.parametrize("trainer_name, configuration, message", [
    ("ProtoKDTeacherTrainer", "3d_fullres_T1ce", "trains on all channels, but configuration '3d_fullres_T1ce' is a "
                                                 "T1ce student configuration; use its base '3d_fullres'"),
    ("UnimodalTrainer", "3d_fullres", "configuration '3d_fullres' names no student modality"),
])
def test_trainers_refuse_the_wrong_kind_of_configuration_before_writing(tmp_path, monkeypatch, trainer_name,
                                                                        configuration, message):
    import torch
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    with pytest.raises(ConfigurationError, match=message):
        trainer_class(student_plans(), configuration, 0, DATASET_JSON, torch.device("cpu"))
    assert not (tmp_path / "results").exists()
