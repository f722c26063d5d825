"""nnU-Net's folders and plans as the plugin uses them: a dataset's preprocessed plans, a configuration resolved
once through its `inherits_from` chain with its settings checked, and the plugin's own configurations (students
and schedules), added by a pure edit and an atomic replace of the plans file.

A student of modality M trains on configuration `<base>_<M>` (e.g. `3d_fullres_T1ce`), which inherits `<base>`
and therefore its preprocessed data, and carries our settings under the key `protokd`:

    "3d_fullres_T1ce": {"inherits_from": "3d_fullres", "protokd": {"modality": "T1ce"}}

Because nnU-Net names model folders `<trainer>__<plans>__<configuration>`, students of different modalities
never share a folder, and the model folder's plans.json records the modality and the method settings.
A schedule (`num_epochs`, `num_iterations_per_epoch`, `num_val_iterations_per_epoch`) may be set on any
configuration, for smoke runs and the CPU demo; the plugin's trainers read it, nnU-Net's ignore it. Every
setting has a documented range (settings.py), checked when a configuration is added and again whenever a
trainer reads it (`resolved_configuration`).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from contextlib import contextmanager
from copy import deepcopy

import nnunetv2.paths as nnunet_paths  # read at call time: tests and commands set them late
from filelock import FileLock, Timeout
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_protokd.errors import ConfigurationError, TeacherError
from nnunet_protokd.io import write_json_atomically
from nnunet_protokd.methods import METHOD_DEFAULTS, METHOD_SETTINGS, TEACHER
from nnunet_protokd.settings import (
    FINAL_VALIDATION_KEY,
    SCHEDULE_FLAGS,
    SCHEDULE_KEYS,
    SCHEDULE_SETTINGS,
    SETTINGS_KEY,
    TEACHER_KEYS,
    Setting,
    setting_assignment,
)

# what add-config accepts as a configuration name: it becomes part of model folder names
# (<trainer>__<plans>__<configuration>), which nnU-Net splits at "__"
CONFIGURATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+\-]*")
# where a student's teacher is, unless its configuration names another (add-config --teacher-...)
# how long an edit of a plans file waits for another process's edit (each takes well under a second)
PLANS_LOCK_TIMEOUT_S = 120
TEACHER_DEFAULTS = {"trainer": TEACHER.trainer, "configuration": None, "plans": None,
                    "checkpoint": "checkpoint_final.pth"}


def dataset_name(dataset: str) -> str:
    """nnU-Net's dataset name (DatasetXXX_Name) for an id or a name; a ConfigurationError if there is none."""
    try:
        return maybe_convert_to_dataset_name(dataset)
    except RuntimeError as exc:  # nnU-Net's own "could not find a dataset with the ID ..."
        raise ConfigurationError(f"dataset {dataset}: {exc}") from None


def nnunet_folder_holding(path: str) -> str | None:
    """The name of the nnU-Net folder variable (nnUNet_raw, nnUNet_preprocessed, nnUNet_results) whose folder
    holds `path` (symbolic links followed), or None: a file the plugin writes there could replace data or a
    trained model that nnU-Net reads."""
    where = os.path.realpath(path)
    for variable in (nnunet_paths.nnUNet_raw, nnunet_paths.nnUNet_preprocessed, nnunet_paths.nnUNet_results):
        if variable and os.path.commonpath([where, os.path.realpath(variable.get())]) == \
                os.path.realpath(variable.get()):
            return variable.env_var_name
    return None


def preprocessed_files(dataset: str, plans_name: str) -> tuple[str, str]:
    """(plans file, dataset.json) of a preprocessed dataset given by id or name."""
    if not nnunet_paths.nnUNet_preprocessed:
        raise ConfigurationError("set the environment variable nnUNet_preprocessed (see README)")
    folder = os.path.join(str(nnunet_paths.nnUNet_preprocessed), dataset_name(dataset))
    plans_file = os.path.join(folder, f"{plans_name}.json")
    if not os.path.isfile(plans_file):
        raise ConfigurationError(f"{plans_file} not found; run nnUNetv2_plan_and_preprocess -d {dataset} first")
    return plans_file, os.path.join(folder, "dataset.json")


def load_preprocessed(dataset: str, plans_name: str) -> tuple[dict, dict]:
    """(plans, dataset.json) of a preprocessed dataset given by id or name."""
    plans_file, dataset_json_file = preprocessed_files(dataset, plans_name)
    with open(plans_file) as f:
        plans = json.load(f)
    with open(dataset_json_file) as f:
        return plans, json.load(f)


def preprocessed_data_folder(preprocessed_folder: str, plans_name: str, configuration: str) -> str:
    """The folder of `configuration`'s preprocessed data in a dataset's `preprocessed_folder`: its data_identifier
    through its `inherits_from` chain (a configuration that inherits a planned one, nnU-Net's documented way to
    vary it, reads the parent's data); nnU-Net's default `<plans>_<configuration>` while the plans do not exist
    or lack the configuration (before planning)."""
    plans_file = os.path.join(preprocessed_folder, f"{plans_name}.json")
    if os.path.isfile(plans_file):
        with open(plans_file) as f:
            plans = json.load(f)
        if configuration in plans.get("configurations", {}):
            identifier = resolved_configuration(plans, configuration).get("data_identifier")
            if identifier:
                return os.path.join(preprocessed_folder, identifier)
    return os.path.join(preprocessed_folder, f"{plans_name}_{configuration}")


def resolved_configuration(plans: dict, name: str) -> dict:
    """The configuration `name` with its `inherits_from` chain applied (nnU-Net's own resolution), its settings
    checked against their documented ranges (`check_settings`): every trainer reads its configuration through
    here before nnU-Net creates a model folder, so a bad value stops training before anything is written."""
    if name not in plans["configurations"]:
        raise ConfigurationError(f"configuration {name!r} is not in the plans {plans.get('plans_name')!r}; "
                                 f"available: {sorted(plans['configurations'])}")
    chain = inheritance_chain(plans, name)
    if chain[-1] in chain[:-1]:
        raise ConfigurationError(f"configuration {name!r} inherits from itself ({' -> '.join(chain)}); "
                                 f"nnU-Net cannot use these plans: fix inherits_from in the plans file")
    if chain[-1] not in plans["configurations"]:
        raise ConfigurationError(f"configuration {chain[-2]!r} inherits from {chain[-1]!r}, which is not in the "
                                 f"plans {plans.get('plans_name')!r}")
    configuration = PlansManager(plans).get_configuration(name).configuration
    check_settings(configuration_settings(configuration), f"configuration {name!r}")
    return configuration


class ConfigurationResolvedOnce:
    """Mixin of the plugin's trainers: their configuration resolved once (`resolved_configuration`: its inheritance
    applied and its settings checked), before nnU-Net's __init__; every check and setting of the trainer reads it."""
    _resolved_configuration = None

    def resolved_configuration(self, plans: dict, configuration: str) -> dict:
        if self._resolved_configuration is None:
            self._resolved_configuration = resolved_configuration(plans, configuration)
        return self._resolved_configuration


def inheritance_chain(plans: dict, name: str) -> list:
    """[name, its parent, ...] up to a configuration that inherits from nothing; ends early at the first name
    seen twice (a cycle) or at a parent missing from the plans."""
    chain = [name]
    while chain[-1] in plans["configurations"] and "inherits_from" in plans["configurations"][chain[-1]]:
        chain.append(plans["configurations"][chain[-1]]["inherits_from"])
        if chain[-1] in chain[:-1]:
            break
    return chain


def configuration_settings(configuration: dict) -> dict:
    """Our settings of a resolved configuration ({} for plain nnU-Net configurations)."""
    return dict(configuration.get(SETTINGS_KEY, {}))


def check_settings(settings: dict, where: str) -> None:
    """Raises ConfigurationError naming `where` and the setting when one of our settings is not of its kind or
    outside its documented range (METHOD_SETTINGS of methods.py, SCHEDULE_SETTINGS of settings.py). Keys these
    tables do not know are left alone (another version of the plugin may have written them)."""
    for key, value in settings.items():
        if key in SCHEDULE_SETTINGS:
            SCHEDULE_SETTINGS[key].check(key, value, where)
        elif key in METHOD_SETTINGS:
            if not isinstance(value, dict):
                raise ConfigurationError(f"{where}: {key} must hold settings {{name: value}}, got {json.dumps(value)}")
            for name, setting_value in value.items():
                if name not in METHOD_SETTINGS[key]:
                    raise ConfigurationError(f"{where}: unknown {key} setting {name!r}; known: "
                                             f"{sorted(METHOD_SETTINGS[key])}")
                METHOD_SETTINGS[key][name].check(f"{key}.{name}", setting_value, where)
        elif key == FINAL_VALIDATION_KEY:
            Setting(bool).check(key, value, where)
        elif key == "modality" and not isinstance(value, str):
            raise ConfigurationError(f"{where}: modality must be a channel name, got {json.dumps(value)}")
        elif key == "teacher":
            if not isinstance(value, dict) or set(value) - set(TEACHER_KEYS) or \
                    not all(isinstance(v, str) for v in value.values()):
                raise ConfigurationError(f"{where}: teacher must map some of {list(TEACHER_KEYS)} to names, got "
                                         f"{json.dumps(value)}")


def channel_index(dataset_json: dict, modality: str) -> int:
    """Index of `modality` among the dataset's channel_names (case-insensitive; an index as text also works)."""
    channel_names = {int(k): v for k, v in dataset_json["channel_names"].items()}
    matches = [i for i, name in channel_names.items() if name.lower() == modality.lower()]
    if not matches and modality.isdigit() and int(modality) in channel_names:
        matches = [int(modality)]
    if len(matches) != 1:
        raise ConfigurationError(f"modality {modality!r} is not one of this dataset's channels "
                                 f"{[channel_names[i] for i in sorted(channel_names)]}")
    return matches[0]


def method_settings(configuration: dict, method: str) -> dict:
    """The settings of distilling trainer `method` in a resolved configuration, over the paper's defaults."""
    if method not in METHOD_SETTINGS:
        raise ConfigurationError(f"unknown method {method!r}; known: {sorted(METHOD_SETTINGS)}")
    given = configuration_settings(configuration).get(method, {})
    check_settings({method: given}, f"{method} settings")
    return {**METHOD_DEFAULTS[method], **given}


def add_configuration(plans_file: str, dataset_json: dict, base: str, modality: str | None = None,
                      name: str | None = None, schedule: dict | None = None, overwrite: bool = False,
                      teacher: dict | None = None, methods: dict | None = None,
                      final_validation: bool | None = None, results_folder: str | None = None) -> str:
    """Adds a configuration inheriting `base` to `plans_file` and returns its name.

    With `modality` it is a student configuration (default name `<base>_<modality>`); without, a variant of
    `base` (e.g. a short schedule for a teacher), which needs `name`. Re-adding an identical configuration is a
    no-op; a different one with the same name is refused unless `overwrite`, and a configuration that nnU-Net
    planned (one without our settings) or one that `base` inherits from is never replaced. `teacher` names a
    student's teacher (see training/teacher.py), which must exist in `results_folder` already, and `methods` overrides
    distilling trainers' settings ({trainer: {key: value}}); every value is checked against its documented range.
    The plans before the change are kept in `<plans file>.bak`, and the plans file is replaced atomically: a
    failed write leaves the old plans intact.
    """
    with edited_plans_file(plans_file) as plans:
        return _add_configuration(plans, plans_file, dataset_json, base, modality, name, schedule, overwrite, teacher,
                                  methods, final_validation, results_folder)


def _add_configuration(plans: dict, plans_file: str, dataset_json: dict, base: str, modality: str | None,
                       name: str | None, schedule: dict | None, overwrite: bool, teacher: dict | None,
                       methods: dict | None, final_validation: bool | None, results_folder: str | None) -> str:
    """add_configuration's edit of `plans`, read under the plans file's lock; returns the configuration's name."""
    parent_settings = configuration_settings(resolved_configuration(plans, base))
    hint = "" if name else "; pass --name"
    if modality is not None:
        if "modality" in parent_settings:
            raise ConfigurationError(f"{base!r} is already a student configuration (modality "
                                     f"{parent_settings['modality']!r}); inherit from a multi-channel configuration")
        modality = dataset_json["channel_names"][str(channel_index(dataset_json, modality))]
        name = name or f"{base}_{modality}"
    elif not name:
        raise ConfigurationError("a configuration without a modality needs a name")
    if not CONFIGURATION_NAME.fullmatch(name) or "__" in name:
        raise ConfigurationError(f"configuration name {name!r} is not usable in nnU-Net's model folder names "
                                 f"(<trainer>__<plans>__<configuration>): use letters, digits and '_', '-', '.', "
                                 f"'+', starting with a letter or digit, and no '__'{hint}")
    settings = {**parent_settings, **({"modality": modality} if modality else {})}
    for key, value in (schedule or {}).items():
        if key not in SCHEDULE_KEYS:
            raise ConfigurationError(f"unknown schedule setting {key!r}; known: {SCHEDULE_KEYS}")
        if value is not None:
            settings[key] = value
    if final_validation is not None:
        settings[FINAL_VALIDATION_KEY] = bool(final_validation)
    for key, value in (teacher or {}).items():
        if key not in TEACHER_KEYS:
            raise ConfigurationError(f"unknown teacher setting {key!r}; known: {TEACHER_KEYS}")
        if value is not None:
            settings.setdefault("teacher", {})[key] = value
    for method, values in (methods or {}).items():
        if method not in METHOD_SETTINGS:
            raise ConfigurationError(f"no trainer {method!r} has settings; known: {sorted(METHOD_SETTINGS)}")
        settings[method] = {**settings.get(method, {}), **values}
    check_settings(settings, f"configuration {name!r}")
    # the parent's settings are copied in: nnU-Net's inheritance replaces a nested dict instead of merging it
    entry = {"inherits_from": base, SETTINGS_KEY: settings}
    existing = plans["configurations"].get(name)
    if existing == entry:
        return name
    if existing is not None and SETTINGS_KEY not in existing:
        raise ConfigurationError(f"configuration {name!r} was planned by nnU-Net; add-config never replaces it "
                                 f"(choose another --name)")
    if name in inheritance_chain(plans, base):
        raise ConfigurationError(f"configuration {name!r} cannot inherit from {base!r}: "
                                 f"{' -> '.join(inheritance_chain(plans, base))} would become a cycle")
    if existing is not None and not overwrite:
        raise ConfigurationError(f"configuration {name!r} already exists in {plans_file} with different settings "
                                 f"{existing}; pass --overwrite to replace it")
    plans["configurations"][name] = entry
    if any(value is not None for value in (teacher or {}).values()):
        check_named_teacher(plans, name, results_folder)
    return name


@contextmanager
def edited_plans_file(plans_file: str):
    """Yields the plans of `plans_file`, read under an exclusive lock on `<plans_file>.lock`, to edit in place; when
    the block ends without an exception and the plans changed, replaces the file (`replace_plans_file`) before
    the lock is released. Edits of one plans file by processes running at once (a workflow's parallel add-config
    steps, two experiments of one dataset) thus apply one after the other instead of the last undoing the others.
    The operating system releases the lock of a process that dies."""
    try:
        with FileLock(plans_file + ".lock", timeout=PLANS_LOCK_TIMEOUT_S):
            with open(plans_file) as f:
                plans = json.load(f)
            before = deepcopy(plans)
            yield plans
            if plans != before:
                replace_plans_file(plans, plans_file)
    except Timeout:
        raise ConfigurationError(f"another process has been editing {plans_file} for {PLANS_LOCK_TIMEOUT_S} s "
                                 f"(it holds {plans_file}.lock); try again when it has finished") from None


def replace_plans_file(plans: dict, plans_file: str) -> None:
    """Writes `plans` over `plans_file` after checking that nnU-Net can resolve every configuration in it; the
    previous plans are kept in `<plans_file>.bak` (what a user restores after a change they regret)."""
    for configuration in plans["configurations"]:
        resolved_configuration(plans, configuration)
    try:
        json.dumps(plans, allow_nan=False)
    except ValueError:  # our settings are checked to be finite: nnU-Net's part of the plans is not
        raise ConfigurationError(f"{plans_file} holds a NaN or infinite number, which JSON cannot store; "
                                 f"re-run nnUNetv2_plan_and_preprocess") from None
    shutil.copyfile(plans_file, plans_file + ".bak")
    write_json_atomically(plans, plans_file)


def schedule_of(configuration: dict) -> dict:
    """The schedule settings present in a resolved configuration."""
    settings = configuration_settings(configuration)
    return {k: settings[k] for k in SCHEDULE_KEYS if k in settings}


def add_config_command(plans: dict, configuration: str, method: str, values: dict) -> str | None:
    """The `nnunet-protokd add-config` command that makes `configuration` again as it is in `plans`, with `values`
    for `method`'s settings: how to pin settings on a configuration that add-config made. None for a configuration
    it did not make (nnU-Net's own, e.g. 3d_fullres)."""
    entry = plans["configurations"].get(configuration, {})
    base, own = entry.get("inherits_from"), entry.get(SETTINGS_KEY)
    if base is None or own is None:
        return None
    parent = configuration_settings(resolved_configuration(plans, base))
    words = ["nnunet-protokd", "add-config", "-d", plans["dataset_name"], "-p", plans["plans_name"], "-c", base]
    if "modality" in own and "modality" not in parent:
        words += ["-m", own["modality"]]
    words += ["--name", configuration]
    for key, flag in SCHEDULE_FLAGS.items():
        if key in own and own[key] != parent.get(key):
            words += [flag, str(own[key])]
    if own.get(FINAL_VALIDATION_KEY) is False and parent.get(FINAL_VALIDATION_KEY) is not False:
        words.append("--no-final-validation")
    for key, value in own.get("teacher", {}).items():
        if value != parent.get("teacher", {}).get(key):
            words += [f"--teacher-{key}", str(value)]
    for name in METHOD_DEFAULTS:
        settings = {**own.get(name, {}), **(values if name == method else {})}
        for key, value in settings.items():
            if value != parent.get(name, {}).get(key):
                words += ["--set", setting_assignment(name, key, value)]
    return " ".join(shlex.quote(word) for word in words + ["--overwrite"])


def teacher_model_folder(plans: dict, configuration: str, results_folder: str | None,
                         resolved: dict | None = None) -> tuple:
    """(model folder or None, checkpoint) of the student configuration's teacher, from its `protokd.teacher`
    settings over TEACHER_DEFAULTS: the checkpoint is a file name inside the folder's fold_X, or (folder None)
    the path of a checkpoint anywhere. `resolved`: the configuration already resolved by the caller."""
    settings = configuration_settings(resolved or resolved_configuration(plans, configuration))
    spec = {**TEACHER_DEFAULTS, **settings.get("teacher", {})}
    if os.path.isabs(spec["checkpoint"]):
        return None, spec["checkpoint"]
    where = f"teacher of {plans['dataset_name']} {configuration}"
    teacher_configuration = spec["configuration"] or plans["configurations"][configuration].get("inherits_from")
    if not teacher_configuration:
        raise TeacherError(f"{where}: the configuration inherits from no base configuration; name the teacher's "
                           f"configuration")
    if not results_folder:
        raise TeacherError(f"{where}: set nnUNet_results, where the teacher's model folder is looked for")
    folder = convert_trainer_plans_config_to_identifier(spec["trainer"], spec["plans"] or plans["plans_name"],
                                                        teacher_configuration)
    return os.path.join(results_folder, plans["dataset_name"], folder), spec["checkpoint"]


def check_named_teacher(plans: dict, configuration: str, results_folder: str | None) -> list:
    """For a configuration that names its teacher (add-config --teacher-...): the teacher checkpoints that exist
    now, one per fold; a TeacherError when there is none, so that a misspelt name fails at once and not when a
    student starts training. (The default teacher may be trained after the student configuration is added.)"""
    model_folder, checkpoint = teacher_model_folder(plans, configuration, results_folder)
    if model_folder is None:
        found, looked_for = [checkpoint] if os.path.isfile(checkpoint) else [], checkpoint
    else:
        folds = sorted(f for f in os.listdir(model_folder) if f.startswith("fold_")) \
            if os.path.isdir(model_folder) else []
        found = [os.path.join(model_folder, f, checkpoint) for f in folds
                 if os.path.isfile(os.path.join(model_folder, f, checkpoint))]
        looked_for = os.path.join(model_folder, "fold_*", checkpoint)
    if not found:
        raise TeacherError(f"teacher of {plans['dataset_name']} {configuration}: no checkpoint {looked_for} exists; "
                           f"check --teacher-trainer, --teacher-configuration, --teacher-plans and "
                           f"--teacher-checkpoint")
    return found
