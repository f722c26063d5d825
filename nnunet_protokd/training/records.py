"""What a trained model records about how it was trained, and the refusal to continue it under other settings.

A trainer's settings are resolved once (the configuration's over METHOD_DEFAULTS) and recorded with the plugin's
version in every checkpoint (under "protokd") and in fold_X/distillation.json. `nnUNetv2_train ... --c` (and
`--val`) compare the checkpoint's record with the settings the configuration resolves to now: the defaults may
have moved between versions, and a model must not continue half-way under another method.
"""
from __future__ import annotations

import json
import os
from copy import deepcopy

import torch

from nnunet_protokd import __version__
from nnunet_protokd.errors import ConfigurationError
from nnunet_protokd.io import atomic_file, load_checkpoint_weights_only, write_json_atomically
from nnunet_protokd.methods import METHOD_DEFAULTS, SETTINGS_ADDED_LATER, SETTINGS_OF_0_1_0
from nnunet_protokd.plans import (
    ConfigurationResolvedOnce,
    add_config_command,
    configuration_settings,
    load_preprocessed,
    method_settings,
)
from nnunet_protokd.settings import SETTINGS_KEY

RECORD_FILE = "distillation.json"


def recorded_settings(record: dict | None, method: str, given: dict) -> tuple[dict, str]:
    """(settings, plugin version) a checkpoint was trained with. Plugin 0.1.0 recorded no version and fewer
    settings (LCKD: none): its missing settings are 0.1.0's values (SETTINGS_OF_0_1_0) and, without any record,
    the configuration's `given` settings are taken to be those it was trained with. A later version's record lacks
    only the settings added since (SETTINGS_ADDED_LATER), which it had at their earlier behaviour."""
    if record is not None and "plugin_version" in record:
        added_later = {key: value for key, value in SETTINGS_ADDED_LATER.items() if key in METHOD_DEFAULTS[method]}
        return {**added_later, **record["settings"]}, record["plugin_version"]
    trained = (record or {}).get("settings", given)
    return {**SETTINGS_OF_0_1_0[method], **trained}, "0.1.0"


def settings_changes(recorded: dict, current: dict) -> dict:
    """{setting: (recorded value, current value)} for every setting that differs (None where one side lacks it)."""
    return {key: (recorded.get(key), current.get(key)) for key in sorted(set(recorded) | set(current))
            if recorded.get(key) != current.get(key)}


class RecordedSettings(ConfigurationResolvedOnce):
    """Mixin for the plugin's nnU-Net trainers with method settings: resolves and records them, and refuses to load
    a checkpoint trained with other settings. Call `resolve_settings` before nnU-Net's __init__."""

    @classmethod
    def method_name(cls) -> str:
        """The method whose settings this trainer has: the first class of its MRO in METHOD_DEFAULTS (so that a
        variant such as `class ProtoKDTrainer_5epochs(ProtoKDTrainer)` reads ProtoKDTrainer's settings)."""
        return next(c.__name__ for c in cls.__mro__ if c.__name__ in METHOD_DEFAULTS)

    def resolve_settings(self, plans: dict, configuration: str) -> None:
        resolved = self.resolved_configuration(plans, configuration)
        self.given_settings = configuration_settings(resolved).get(self.method_name(), {})
        self.settings = method_settings(resolved, self.method_name())

    def plans_with_resolved_settings(self, plans: dict, configuration: str) -> dict:
        """A copy of `plans` whose configuration holds every resolved setting of this trainer, so that the model
        folder's plans.json (written by nnU-Net) says how its network was built, whatever later defaults say."""
        plans = deepcopy(plans)
        plans["configurations"][configuration][SETTINGS_KEY] = {
            **configuration_settings(self.resolved_configuration(plans, configuration)),
            self.method_name(): dict(self.settings)}
        return plans

    def record(self) -> dict:
        return {"method": self.method_name(), "plugin_version": __version__, "settings": dict(self.settings)}

    def on_train_start(self):
        super().on_train_start()
        if self.local_rank == 0:
            write_json_atomically(self.record(), os.path.join(self.output_folder, RECORD_FILE))

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        if self.local_rank == 0 and not self.disable_checkpointing:
            # nnU-Net builds its checkpoint inside save_checkpoint; the record is added afterwards
            checkpoint = load_checkpoint_weights_only(filename)
            checkpoint[SETTINGS_KEY] = self.record()
            with atomic_file(filename) as temporary:
                torch.save(checkpoint, temporary)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        checkpoint, name = (filename_or_checkpoint, "the checkpoint") if isinstance(filename_or_checkpoint, dict) \
            else (load_checkpoint_weights_only(filename_or_checkpoint, self.device), filename_or_checkpoint)
        self.check_checkpoint(checkpoint, name)
        # nnU-Net 2.8.1's load_checkpoint only works from a file name (given a dict, it fails with
        # UnboundLocalError): pass on what we were given
        super().load_checkpoint(filename_or_checkpoint)

    def check_checkpoint(self, checkpoint: dict, name: str) -> None:
        """Raises unless the checkpoint was trained with the settings this trainer resolved (subclasses add checks)."""
        method = self.method_name()
        recorded, version = recorded_settings(checkpoint.get(SETTINGS_KEY), method, self.given_settings)
        changes = settings_changes(recorded, self.settings)
        if not changes:
            if version != __version__:
                self.print_to_log_file(f"continuing a checkpoint of nnunet-protokd {version} with {__version__}; "
                                       f"its {method} settings are unchanged")
            return
        listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
        old_values = {key: old for key, (old, _) in changes.items() if old is not None}
        raise ConfigurationError(f"{name} was trained by {method} of nnunet-protokd {version} with other settings "
                                 f"than configuration {self.configuration_name!r} resolves to now (nnunet-protokd "
                                 f"{__version__}): {listed}. Continuing would change the method half-way. "
                                 f"{self._how_to_continue(method, old_values)}")

    def _how_to_continue(self, method: str, old_values: dict) -> str:
        plans = self.plans_manager.plans
        try:  # the preprocessed plans, which add-config edits (this trainer's copy may be a one-channel view)
            plans = load_preprocessed(plans["dataset_name"], plans["plans_name"])[0]
        except (ConfigurationError, OSError, KeyError):
            pass
        command = add_config_command(plans, self.configuration_name, method, old_values)
        fresh = "To train with the new settings instead, start again without --c."
        if command is not None:
            return f"To continue it as it was trained, pin the old values: `{command}`, then --c again. {fresh}"
        return (f"To continue it as it was trained, pin the old values in the plans: add "
                f"{json.dumps({SETTINGS_KEY: {method: old_values}})} to configuration {self.configuration_name!r} "
                f"of {plans.get('plans_name', 'the plans')}.json in nnUNet_preprocessed (merge into an existing "
                f"\"{SETTINGS_KEY}\"), then --c again. {fresh}")
