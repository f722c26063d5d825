"""Student and schedule settings, stored as extra nnU-Net plans configurations.

A student of modality M trains on configuration `<base>_<M>` (e.g. `3d_fullres_T1ce`), which inherits `<base>`
and therefore its preprocessed data, and carries our settings under the key `protokd`:

    "3d_fullres_T1ce": {"inherits_from": "3d_fullres", "protokd": {"modality": "T1ce"}}

Because nnU-Net names model folders `<trainer>__<plans>__<configuration>`, students of different modalities
never share a folder, and the model folder's plans.json records the modality (and, later, method settings).
A schedule (`num_epochs`, `num_iterations_per_epoch`, `num_val_iterations_per_epoch`) may be set on any
configuration, for smoke runs and the CPU demo; the plugin's trainers read it, nnU-Net's ignore it.
"""
from __future__ import annotations

import json
import os
import tempfile

SETTINGS_KEY = "protokd"
# joins the modality names of a channel subset: "T1ce+FLAIR" (configuration names, report keys, input folders)
LABEL_SEPARATOR = "+"
SCHEDULE_KEYS = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch")
# False skips nnU-Net's final validation on the fold's validation cases (the demo evaluates on held-out cases)
FINAL_VALIDATION_KEY = "final_validation"
TEACHER_KEYS = ("trainer", "configuration", "plans", "checkpoint")
# each distilling trainer's settings and the published method's values; a configuration overrides them under the
# trainer's name, e.g. {"protokd": {"modality": "T1ce", "ProtoKDTrainer": {"beta": 0.0}}}. README, "Departures from
# the paper", gives each setting's source and the value that switches to our variant.
METHOD_DEFAULTS = {
    # ProtoKD (Wang et al., ICASSP 2023): L = L_seg + alpha L_kd + beta L_proto, temperature T. classes: the
    # prototypes' classes on a region dataset ("disjoint": background, WT-TC, TC-ET, ET as in the authors' code;
    # "regions": background and each nested region). class_presence: a class is used for an item when that item
    # has it ("item", ours) or only when every item of the batch has it ("batch", the authors' code)
    "ProtoKDTrainer": {"alpha": 10.0, "beta": 0.1, "temperature": 10.0, "intra_class_only": False,
                       "classes": "disjoint", "class_presence": "item"},
    # KD-Net (Hu et al., MICCAI 2020): L = lambda L_KD + (1 - lambda) L_GT + alpha L_KL, temperature T.
    # soften_student: Eq. 2 compares sigma(f_t / T) with the student's unsoftened sigma(f_s) (False); True divides
    # the student's logits by T too. kl_reduction: Eq. 3's KL summed over an item's elements ("sum") or averaged
    # over them ("mean", a milder term)
    "KDNetTrainer": {"lambda": 0.75, "temperature": 5.0, "alpha": 10.0, "soften_student": False,
                     "kl_reduction": "sum"},
    # LCKD (Wang et al., MICCAI 2023): L = L_seg + kd_weight * L1(teacher modalities' bottlenecks, others'), as the
    # authors' code (github billhhh/LCKD): the L1 terms of all (teacher, student) pairs summed
    # (kd_pair_reduction "sum"), distillation from the first epoch (kd_from_start), one feature slot per modality
    # (fusion "slots"), 1 to M-1 modalities drawn per batch (subset_sampling "per_batch"), 80,000 of 195,000
    # iterations with every modality (full_modality_fraction), an election every 5,000 iterations (= 20 epochs of
    # nnU-Net's 250). election_fraction and election_batches are ours: we elect on held-out training patches
    "LCKDTrainer": {"kd_weight": 0.1, "kd_pair_reduction": "sum", "kd_from_start": True, "fusion": "slots",
                    "subset_sampling": "per_batch", "full_modality_fraction": 0.41, "election_interval": 20,
                    "election_fraction": 0.1, "election_batches": 10},
}
# the values a setting that names a variant may take (its default first)
SETTING_CHOICES = {
    ("ProtoKDTrainer", "classes"): ("disjoint", "regions"),
    ("ProtoKDTrainer", "class_presence"): ("item", "batch"),
    ("KDNetTrainer", "kl_reduction"): ("sum", "mean"),
    ("LCKDTrainer", "kd_pair_reduction"): ("sum", "mean"),
    ("LCKDTrainer", "fusion"): ("slots", "mean"),
    ("LCKDTrainer", "subset_sampling"): ("per_batch", "per_item"),
}
# what plugin 0.1.0 did, as settings: a model trained by 0.1.0 recorded fewer settings (LCKD none), and these
# values (over what it did record) say how it was trained, so that `--c` can tell whether it would now continue
# under other settings. They are also what switches each trainer back to 0.1.0's behaviour.
SETTINGS_OF_0_1_0 = {
    "ProtoKDTrainer": {**METHOD_DEFAULTS["ProtoKDTrainer"], "classes": "regions"},
    "KDNetTrainer": {**METHOD_DEFAULTS["KDNetTrainer"], "soften_student": True},
    "LCKDTrainer": {**METHOD_DEFAULTS["LCKDTrainer"], "kd_pair_reduction": "mean", "kd_from_start": False,
                    "fusion": "mean", "subset_sampling": "per_item", "full_modality_fraction": 0.2,
                    "election_interval": 10},
}


class ConfigurationError(ValueError):
    """A plans configuration that cannot serve the requested student or teacher."""


def dataset_name(dataset: str) -> str:
    """nnU-Net's dataset name (DatasetXXX_Name) for an id or a name; a ConfigurationError if there is none."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return maybe_convert_to_dataset_name(dataset)
    except RuntimeError as exc:  # nnU-Net's own "could not find a dataset with the ID ..."
        raise ConfigurationError(f"dataset {dataset}: {exc}") from None


def preprocessed_files(dataset: str, plans_name: str) -> tuple[str, str]:
    """(plans file, dataset.json) of a preprocessed dataset given by id or name."""
    from nnunetv2.paths import nnUNet_preprocessed
    if not nnUNet_preprocessed:
        raise ConfigurationError("set the environment variable nnUNet_preprocessed (see README)")
    folder = os.path.join(str(nnUNet_preprocessed), dataset_name(dataset))
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


def resolved_configuration(plans: dict, name: str) -> dict:
    """The configuration `name` with its `inherits_from` chain applied (nnU-Net's own resolution)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    if name not in plans["configurations"]:
        raise ConfigurationError(f"configuration {name!r} is not in the plans {plans.get('plans_name')!r}; "
                                 f"available: {sorted(plans['configurations'])}")
    return PlansManager(plans).get_configuration(name).configuration


def configuration_settings(configuration: dict) -> dict:
    """Our settings of a resolved configuration ({} for plain nnU-Net configurations)."""
    return dict(configuration.get(SETTINGS_KEY, {}))


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
    given = configuration_settings(configuration).get(method, {})
    _check_method_settings(method, given)
    return {**METHOD_DEFAULTS[method], **given}


def _check_method_settings(method: str, given: dict) -> None:
    if method not in METHOD_DEFAULTS:
        raise ConfigurationError(f"unknown method {method!r}; known: {sorted(METHOD_DEFAULTS)}")
    for key, value in given.items():
        if key not in METHOD_DEFAULTS[method]:
            raise ConfigurationError(f"unknown {method} setting {key!r}; known: {sorted(METHOD_DEFAULTS[method])}")
        if type(value) is not type(METHOD_DEFAULTS[method][key]) and not (
                isinstance(value, int) and isinstance(METHOD_DEFAULTS[method][key], float)):
            raise ConfigurationError(f"{method} setting {key} must be a {type(METHOD_DEFAULTS[method][key]).__name__}"
                                     f", got {value!r}")
        choices = SETTING_CHOICES.get((method, key))
        if choices is not None and value not in choices:
            raise ConfigurationError(f"{method} setting {key} must be one of {list(choices)}, got {value!r}")


def add_configuration(plans_file: str, dataset_json: dict, base: str, modality: str | None = None,
                      name: str | None = None, schedule: dict | None = None, overwrite: bool = False,
                      teacher: dict | None = None, methods: dict | None = None,
                      final_validation: bool | None = None) -> str:
    """Adds a configuration inheriting `base` to `plans_file` and returns its name.

    With `modality` it is a student configuration (default name `<base>_<modality>`); without, a variant of
    `base` (e.g. a short schedule for a teacher), which needs `name`. Re-adding an identical configuration is a
    no-op; a different one with the same name is refused unless `overwrite`. `teacher` names a student's
    teacher (see teacher.py) and `methods` overrides distilling trainers' settings ({trainer: {key: value}}). The plans file is replaced
    atomically, so an interrupted call leaves the old plans intact.
    """
    with open(plans_file) as f:
        plans = json.load(f)
    parent_settings = configuration_settings(resolved_configuration(plans, base))
    if modality is not None:
        if "modality" in parent_settings:
            raise ConfigurationError(f"{base!r} is already a student configuration (modality "
                                     f"{parent_settings['modality']!r}); inherit from a multi-channel configuration")
        modality = dataset_json["channel_names"][str(channel_index(dataset_json, modality))]
        name = name or f"{base}_{modality}"
    elif not name:
        raise ConfigurationError("a configuration without a modality needs a name")
    settings = {**parent_settings, **({"modality": modality} if modality else {})}
    for key, value in (schedule or {}).items():
        if key not in SCHEDULE_KEYS:
            raise ConfigurationError(f"unknown schedule setting {key!r}; known: {SCHEDULE_KEYS}")
        if value is not None:
            if int(value) < 1:
                raise ConfigurationError(f"{key} must be a positive integer, got {value}")
            settings[key] = int(value)
    if final_validation is not None:
        settings[FINAL_VALIDATION_KEY] = bool(final_validation)
    for key, value in (teacher or {}).items():
        if key not in TEACHER_KEYS:
            raise ConfigurationError(f"unknown teacher setting {key!r}; known: {TEACHER_KEYS}")
        if value is not None:
            settings.setdefault("teacher", {})[key] = value
    for method, values in (methods or {}).items():
        _check_method_settings(method, values)
        settings[method] = {**settings.get(method, {}), **values}
    # the parent's settings are copied in: nnU-Net's inheritance replaces a nested dict instead of merging it
    entry = {"inherits_from": base, SETTINGS_KEY: settings}
    existing = plans["configurations"].get(name)
    if existing == entry:
        return name
    if existing is not None and not overwrite:
        raise ConfigurationError(f"configuration {name!r} already exists in {plans_file} with different settings "
                                 f"{existing}; pass --overwrite to replace it")
    plans["configurations"][name] = entry
    write_json_atomically(plans, plans_file)
    return name


def write_json_atomically(content: dict, path: str) -> None:
    handle, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_", suffix=".json")
    try:
        with os.fdopen(handle, "w") as f:
            json.dump(content, f, indent=4)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def schedule_of(configuration: dict) -> dict:
    """The schedule settings present in a resolved configuration."""
    settings = configuration_settings(configuration)
    return {k: int(settings[k]) for k in SCHEDULE_KEYS if k in settings}


def add_config_command(plans: dict, configuration: str, method: str, values: dict) -> str | None:
    """The `nnunet-protokd add-config` command that makes `configuration` again as it is in `plans`, with `values`
    for `method`'s settings: how to pin settings on a configuration that add-config made. None for a configuration
    it did not make (nnU-Net's own, e.g. 3d_fullres)."""
    import shlex
    entry = plans["configurations"].get(configuration, {})
    base, own = entry.get("inherits_from"), entry.get(SETTINGS_KEY)
    if base is None or own is None:
        return None
    parent = configuration_settings(resolved_configuration(plans, base))
    words = ["nnunet-protokd", "add-config", "-d", plans["dataset_name"], "-p", plans["plans_name"], "-c", base]
    if "modality" in own and "modality" not in parent:
        words += ["-m", own["modality"]]
    words += ["--name", configuration]
    for key, option in zip(SCHEDULE_KEYS, ("--epochs", "--iterations-per-epoch", "--val-iterations-per-epoch")):
        if key in own and own[key] != parent.get(key):
            words += [option, str(own[key])]
    if own.get(FINAL_VALIDATION_KEY) is False and parent.get(FINAL_VALIDATION_KEY) is not False:
        words.append("--no-final-validation")
    for key, value in own.get("teacher", {}).items():
        if value != parent.get("teacher", {}).get(key):
            words += [f"--teacher-{key}", str(value)]
    for name in METHOD_DEFAULTS:
        settings = {**own.get(name, {}), **(values if name == method else {})}
        for key, value in settings.items():
            if value != parent.get(name, {}).get(key):
                words += ["--set", f"{name}.{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return " ".join(shlex.quote(word) for word in words + ["--overwrite"])
