"""Student and schedule settings, stored as extra nnU-Net plans configurations.

A student of modality M trains on configuration `<base>_<M>` (e.g. `3d_fullres_T1ce`), which inherits `<base>`
and therefore its preprocessed data, and carries our settings under the key `protokd`:

    "3d_fullres_T1ce": {"inherits_from": "3d_fullres", "protokd": {"modality": "T1ce"}}

Because nnU-Net names model folders `<trainer>__<plans>__<configuration>`, students of different modalities
never share a folder, and the model folder's plans.json records the modality and the method settings.
A schedule (`num_epochs`, `num_iterations_per_epoch`, `num_val_iterations_per_epoch`) may be set on any
configuration, for smoke runs and the CPU demo; the plugin's trainers read it, nnU-Net's ignore it. Every
setting has a documented range (METHOD_SETTINGS, SCHEDULE_SETTINGS), checked when a configuration is added and
again whenever a trainer reads it (`resolved_configuration`).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

from nnunet_protokd.errors import UserError

SETTINGS_KEY = "protokd"
# joins the modality names of a channel subset: "T1ce+FLAIR" (configuration names, report keys, input folders)
LABEL_SEPARATOR = "+"
# False skips nnU-Net's final validation on the fold's validation cases (the demo evaluates on held-out cases)
FINAL_VALIDATION_KEY = "final_validation"
TEACHER_KEYS = ("trainer", "configuration", "plans", "checkpoint")
# what add-config accepts as a configuration name: it becomes part of model folder names
# (<trainer>__<plans>__<configuration>), which nnU-Net splits at "__"
CONFIGURATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+\-]*")


@dataclass(frozen=True)
class Setting:
    """One setting: its type, default and documented valid range. Numbers must be finite; a range's ends are
    included unless marked open. A default of None means nnU-Net's own value applies."""
    kind: type  # float, int, bool or str (one of `choices`, the default first)
    default: object = None
    minimum: float | None = None
    maximum: float | None = None
    open_minimum: bool = False
    open_maximum: bool = False
    meaning: str = ""
    choices: tuple = ()

    def range_text(self) -> str:
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return "one of " + ", ".join(self.choices)
        kind = "an integer" if self.kind is int else "a number"
        low, high = (None if v is None else f"{v:g}" for v in (self.minimum, self.maximum))
        if low is not None and high is not None:
            return f"{kind} in {'(' if self.open_minimum else '['}{low}, {high}{')' if self.open_maximum else ']'}"
        if low is not None:
            return f"{kind} {'>' if self.open_minimum else '>='} {low}"
        if high is not None:
            return f"{kind} {'<' if self.open_maximum else '<='} {high}"
        return kind

    def check(self, name: str, value, where: str) -> None:
        """Raises ConfigurationError naming `where`, the setting and its range when `value` is not valid."""
        if self.kind is bool:
            valid = type(value) is bool
        elif self.kind is str:
            valid = value in self.choices
        elif self.kind is int:
            valid = type(value) is int and self._in_range(value)
        else:  # an integer is a valid number, a bool is not
            valid = type(value) in (int, float) and math.isfinite(value) and self._in_range(value)
        if not valid:
            raise ConfigurationError(f"{where}: {name} must be {self.range_text()}, got {json.dumps(value)}")

    def _in_range(self, value) -> bool:
        if self.minimum is not None and (value < self.minimum or (self.open_minimum and value == self.minimum)):
            return False
        return not (self.maximum is not None and
                    (value > self.maximum or (self.open_maximum and value == self.maximum)))


# Every setting a configuration can carry, with its valid range: add a row here for a new one. A distilling
# trainer's settings live under its name, e.g. {"protokd": {"modality": "T1ce", "ProtoKDTrainer": {"beta": 0.0}}};
# the defaults are the papers' values
METHOD_SETTINGS = {
    # ProtoKD (Wang et al., ICASSP 2023): L = L_seg + alpha L_kd + beta L_proto, temperature T
    "ProtoKDTrainer": {
        "alpha": Setting(float, 10.0, minimum=0, meaning="weight of L_kd; 0 leaves it out"),
        "beta": Setting(float, 0.1, minimum=0, meaning="weight of L_proto; 0 leaves it out"),
        "temperature": Setting(float, 10.0, minimum=0, open_minimum=True, meaning="temperature T of L_kd"),
        "intra_class_only": Setting(bool, False, meaning="L_proto over each class's own voxels only"),
        "classes": Setting(str, "disjoint", choices=("disjoint", "regions"),
                           meaning="prototype classes of a region dataset: the disjoint classes the regions "
                                   "make (background, WT-TC, TC-ET, ET; the authors') or background and each "
                                   "nested region (0.1.0)"),
        "class_presence": Setting(str, "item", choices=("item", "batch"),
                                  meaning="a class counts for an item that has it (ours) or only when every item "
                                          "of the batch has it (the authors' code)"),
    },
    # KD-Net (Hu, Maillard et al., MICCAI 2020): L = lambda L_KD + (1 - lambda) L_GT + alpha L_KL, temperature T
    "KDNetTrainer": {
        "lambda": Setting(float, 0.75, minimum=0, maximum=1, meaning="weight of L_KD; L_GT gets 1 - lambda"),
        "temperature": Setting(float, 5.0, minimum=0, open_minimum=True, meaning="temperature T of L_KD"),
        "alpha": Setting(float, 10.0, minimum=0, meaning="weight of L_KL; 0 leaves it out"),
        "soften_student": Setting(bool, False, meaning="Eq. 2 with the student's logits divided by T too (0.1.0); "
                                                       "the paper softens the teacher only"),
        "kl_reduction": Setting(str, "sum", choices=("sum", "mean"),
                                meaning="Eq. 3's KL summed over an item's bottleneck elements (the paper's "
                                        "reading) or averaged over them (a milder term)"),
    },
    # LCKD (Wang et al., MICCAI 2023): L = L_seg + kd_weight * L1(teacher modalities' bottlenecks, others'), as
    # the authors' code (github billhhh/LCKD): pairs summed, distillation from the first epoch, one feature slot
    # per modality, 1 to M-1 modalities per batch, 80,000 of 195,000 iterations with every modality, an election
    # every 5,000 iterations (20 of nnU-Net's epochs). election_fraction and election_batches are ours: we elect
    # on held-out training patches, not on validation volumes
    "LCKDTrainer": {
        "kd_weight": Setting(float, 0.1, minimum=0, meaning="weight of the cross-modal L1 term"),
        "kd_pair_reduction": Setting(str, "sum", choices=("sum", "mean"),
                                     meaning="the L1 terms of the (teacher, student) pairs summed (the authors') or "
                                             "averaged (0.1.0)"),
        "kd_from_start": Setting(bool, True, meaning="elect and distil from the first epoch (the authors'); false: "
                                                     "from the first missing-modality epoch (0.1.0)"),
        "fusion": Setting(str, "slots", choices=("slots", "mean"),
                          meaning="one feature slot per modality, missing ones filled with the mean (the authors') "
                                  "or the mean of the available modalities (0.1.0)"),
        "subset_sampling": Setting(str, "per_batch", choices=("per_batch", "per_item"),
                                   meaning="1 to M-1 modalities drawn for the whole batch (the authors') or one of "
                                           "the 2^M-1 subsets per item (0.1.0)"),
        "full_modality_fraction": Setting(float, 0.41, minimum=0, maximum=1,
                                          meaning="share of the epochs trained with every modality first"),
        "election_interval": Setting(int, 20, minimum=1, meaning="epochs between teacher elections"),
        "election_fraction": Setting(float, 0.1, minimum=0, maximum=1, open_minimum=True, open_maximum=True,
                                     meaning="share of the fold's training cases held out to elect teachers"),
        "election_batches": Setting(int, 10, minimum=1, meaning="fixed patches each election scores"),
    },
}
# a short schedule (smoke runs, the CPU demo); the plugin's trainers honour it, nnU-Net's ignore it
SCHEDULE_SETTINGS = {
    "num_epochs": Setting(int, minimum=1, meaning="epochs (nnU-Net: 1000)"),
    "num_iterations_per_epoch": Setting(int, minimum=1, meaning="training iterations per epoch (nnU-Net: 250)"),
    "num_val_iterations_per_epoch": Setting(int, minimum=1, meaning="validation iterations per epoch (nnU-Net: 50)"),
    # nnU-Net's training draws unseeded random numbers; a seed fixes the network's initial weights and the main
    # process's random numbers (augmentation workers keep their own: runs are repeatable, not bit-identical)
    "seed": Setting(int, minimum=0, meaning="seed of torch, numpy and random when the trainer starts (nnU-Net: none)"),
}
SCHEDULE_KEYS = tuple(SCHEDULE_SETTINGS)
METHOD_DEFAULTS = {method: {name: setting.default for name, setting in settings.items()}
                   for method, settings in METHOD_SETTINGS.items()}
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


def describe_method_settings() -> str:
    """One line per distilling trainer setting: name, valid range, default and meaning (for --help)."""
    return "\n".join(f"  {method}.{name}: {setting.range_text()}, default {json.dumps(setting.default)} "
                     f"({setting.meaning})"
                     for method, settings in METHOD_SETTINGS.items() for name, setting in settings.items())


class ConfigurationError(UserError, ValueError):
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
    """The configuration `name` with its `inherits_from` chain applied (nnU-Net's own resolution), its settings
    checked against their documented ranges (`check_settings`): every trainer reads its configuration through
    here before nnU-Net creates a model folder, so a bad value stops training before anything is written."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
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
    outside its documented range (METHOD_SETTINGS, SCHEDULE_SETTINGS). Keys this table does not know are left
    alone (another version of the plugin may have written them)."""
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
    student's teacher (see teacher.py), which must exist in `results_folder` already, and `methods` overrides
    distilling trainers' settings ({trainer: {key: value}}); every value is checked against its documented range.
    The plans before the change are kept in `<plans file>.bak`, and the plans file is replaced atomically: a
    failed write leaves the old plans intact.
    """
    with open(plans_file) as f:
        plans = json.load(f)
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
        from nnunet_protokd.teacher import check_named_teacher  # teacher.py builds on this module
        check_named_teacher(plans, name, results_folder)
    replace_plans_file(plans, plans_file)
    return name


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


def write_json_atomically(content: dict, path: str) -> None:
    """Replaces `path` by a rename, so that a failed or interrupted write leaves the old file intact. NaN and
    infinity are refused: JSON has no such numbers (Python would write `Infinity`)."""
    text = json.dumps(content, indent=4, allow_nan=False)
    handle, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_", suffix=".json")
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def schedule_of(configuration: dict) -> dict:
    """The schedule settings present in a resolved configuration."""
    settings = configuration_settings(configuration)
    return {k: settings[k] for k in SCHEDULE_KEYS if k in settings}


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
    for key, option in zip(SCHEDULE_KEYS, ("--epochs", "--iterations-per-epoch", "--val-iterations-per-epoch",
                                           "--seed")):
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
