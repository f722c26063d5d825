"""The plugin's settings: every key a plans configuration can carry under `protokd`, with its type, default and
documented range (the papers' values are the defaults), and their two spellings on the command line (the
schedule's flags and `--set TRAINER.SETTING=VALUE`)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from nnunet_protokd.errors import ConfigurationError

SETTINGS_KEY = "protokd"
# False skips nnU-Net's final validation on the fold's validation cases (the demo evaluates on held-out cases)
FINAL_VALIDATION_KEY = "final_validation"
TEACHER_KEYS = ("trainer", "configuration", "plans", "checkpoint")


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


# a schedule setting and the flag that sets it (add-config, experiment, evidence)
SCHEDULE_FLAGS = {"num_epochs": "--epochs", "num_iterations_per_epoch": "--iterations-per-epoch",
                  "num_val_iterations_per_epoch": "--val-iterations-per-epoch", "seed": "--seed"}


def schedule_arguments(schedule: dict) -> list:
    """{"num_epochs": 2, "seed": None, ...} -> ["--epochs", "2"]: the flags that set a schedule (None: not set)."""
    return [word for key, value in schedule.items() if value is not None
            for word in (SCHEDULE_FLAGS[key], str(value))]


def setting_assignment(trainer: str, name: str, value) -> str:
    """The `--set` word of one method setting: TRAINER.SETTING=VALUE, numbers and booleans as JSON."""
    return f"{trainer}.{name}={value if isinstance(value, str) else json.dumps(value)}"


def parse_setting_assignments(assignments) -> dict:
    """["ProtoKDTrainer.beta=0", "LCKDTrainer.fusion=mean", ...] -> {"ProtoKDTrainer": {"beta": 0}, ...}; values are
    JSON (numbers, true/false), anything else is text (`check_settings` checks each setting's type and choices)."""
    methods = {}
    for assignment in assignments or []:
        key, sep, text = assignment.partition("=")
        method, dot, setting = key.partition(".")
        if not (sep and dot and method and setting):
            raise ConfigurationError(f"--set expects TRAINER.SETTING=VALUE, got {assignment!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        methods.setdefault(method, {})[setting] = value
    return methods
