"""The plugin's settings: the schema of a setting (type, default, documented range), the keys a plans
configuration can carry under `protokd` besides a method's own settings (which its registry entry holds:
methods.py), and their two spellings on the command line (the schedule's flags and
`--set TRAINER.SETTING=VALUE`)."""
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
