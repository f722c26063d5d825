"""The one registry of the plugin's methods: which trainer trains each, in what order reports list them, under what
title, and the variants (a method with other settings) that the protocol can train beside them.

Adding a method is one entry in METHODS and one trainer file in trainers/ (README, "Adding a method"). A trained
model of the protocol is named by its ModelKey: the method (or variant) and the modality it reads.
"""
from __future__ import annotations

import json
from types import MappingProxyType
from typing import NamedTuple

from nnunet_protokd.settings import Setting

# joins the modality names of a channel subset: "T1ce+FLAIR" (configuration names, model keys, input folders)
MODALITY_SEPARATOR = "+"


class Method(NamedTuple):
    name: str  # what the protocol and the reports call it: "protokd"
    trainer: str  # its nnU-Net trainer class in trainers/
    title: str  # its name in tables and figures
    distils: bool = False  # learns from its fold's frozen teacher (which must be trained first)
    every_channel: bool = False  # one model on every channel (predicted from subsets), not a student per modality
    # its subset model folders (`lckd-subset`) hold nnU-Net's own network with the first convolution sliced to the
    # subset's channels (plain nnU-Net predicts them); otherwise they link to the trained checkpoints
    sliced_subsets: bool = False
    # {name: Setting}: what a configuration may set for its trainer (`--set TRAINER.NAME=VALUE`), with the
    # paper's value as the default; stored under the trainer's name, e.g. {"protokd": {"modality": "T1ce",
    # "ProtoKDTrainer": {"beta": 0.0}}}
    settings: MappingProxyType = MappingProxyType({})


class Variant(NamedTuple):
    """A method with other settings, trained beside it on a configuration of its own
    (<student configuration>-<variant suffix>)."""
    name: str  # "<method>-<suffix>"
    method: str
    settings: dict  # {trainer: {setting: value}}
    title: str

    @property
    def starts_from_modality_dropout(self) -> bool:
        """Its students start from the modality-dropout model of their fold (start_from), which must be trained
        first."""
        return any(values.get("start_from") == "modality_dropout" for values in self.settings.values())


# where a distilled student's weights start (ours; both papers start from random weights): the modality-dropout
# model of the same fold, its first convolution sliced to the student's channel, combines the two approaches
STUDENT_START_SETTINGS = {
    "start_from": Setting(str, "random", choices=("random", "modality_dropout"),
                          meaning="the student's initial weights: nnU-Net's random initialisation (the papers') or "
                                  "the ModalityDropoutTrainer model of the same fold, first convolution sliced to "
                                  "the student's channel"),
}
# settings that came after models were recorded without them, with what the plugin did before: a model whose
# record lacks one was trained that way (so that `--c` continues it)
SETTINGS_ADDED_LATER = {"start_from": "random"}
# ProtoKD (Wang et al., ICASSP 2023): L = L_seg + alpha L_kd + beta L_proto, temperature T
PROTOKD_SETTINGS = {
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
    **STUDENT_START_SETTINGS,
}
# KD-Net (Hu, Maillard et al., MICCAI 2020): L = lambda L_KD + (1 - lambda) L_GT + alpha L_KL, temperature T
KDNET_SETTINGS = {
    "lambda": Setting(float, 0.75, minimum=0, maximum=1, meaning="weight of L_KD; L_GT gets 1 - lambda"),
    "temperature": Setting(float, 5.0, minimum=0, open_minimum=True, meaning="temperature T of L_KD"),
    "alpha": Setting(float, 10.0, minimum=0, meaning="weight of L_KL; 0 leaves it out"),
    "soften_student": Setting(bool, False, meaning="Eq. 2 with the student's logits divided by T too (0.1.0); "
                                                   "the paper softens the teacher only"),
    "kl_reduction": Setting(str, "sum", choices=("sum", "mean"),
                            meaning="Eq. 3's KL summed over an item's bottleneck elements (the paper's "
                                    "reading) or averaged over them (a milder term)"),
    **STUDENT_START_SETTINGS,
}
# LCKD (Wang et al., MICCAI 2023): L = L_seg + kd_weight * L1(teacher modalities' bottlenecks, others'), as
# the authors' code (github billhhh/LCKD): pairs summed, distillation from the first epoch, one feature slot
# per modality, 1 to M-1 modalities per batch, 80,000 of 195,000 iterations with every modality, an election
# every 5,000 iterations (20 of nnU-Net's epochs). election_fraction and election_batches are ours: we elect
# on held-out training patches, not on validation volumes
LCKD_SETTINGS = {
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
}

# modality dropout (ivadomed's; Grovik et al., npj Digital Medicine 2021): nnU-Net's own network and loss on every
# channel, each training item keeping a random non-empty subset of its channels (the others 0 after normalisation)
MODALITY_DROPOUT_SETTINGS = {
    "subset_sampling": Setting(str, "per_size", choices=("per_size", "per_subset"),
                               meaning="the number of kept channels uniform in 1..M, then a uniform subset of that "
                                       "size (ivadomed's), or one of the 2^M-1 non-empty subsets uniformly"),
    "keep_all_probability": Setting(float, 0.0, minimum=0, maximum=1,
                                    meaning="probability that an item keeps every channel; otherwise its subset "
                                            "is drawn (which is all M channels 1/M of the time per_size)"),
}

TEACHER = Method("teacher", "ProtoKDTeacherTrainer", "Teacher (all modalities)", every_channel=True)
BASELINE = Method("unimodal", "UnimodalTrainer", "Unimodal")
# in report order
METHODS = {method.name: method for method in (
    BASELINE,
    Method("protokd", "ProtoKDTrainer", "ProtoKD", distils=True, settings=MappingProxyType(PROTOKD_SETTINGS)),
    Method("kdnet", "KDNetTrainer", "KD-Net", distils=True, settings=MappingProxyType(KDNET_SETTINGS)),
    Method("lckd", "LCKDTrainer", "LCKD", every_channel=True, settings=MappingProxyType(LCKD_SETTINGS)),
    Method("moddrop", "ModalityDropoutTrainer", "Modality dropout", every_channel=True, sliced_subsets=True,
           settings=MappingProxyType(MODALITY_DROPOUT_SETTINGS)),
)}
# {trainer: {name: Setting}} of every method with settings, and their defaults
METHOD_SETTINGS = {method.trainer: dict(method.settings) for method in METHODS.values() if method.settings}
METHOD_DEFAULTS = {trainer: {name: setting.default for name, setting in settings.items()}
                   for trainer, settings in METHOD_SETTINGS.items()}
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

VARIANTS = {variant.name: variant for variant in (
    # the ablations of the ProtoKD paper's Tables 2 and 3
    Variant("protokd-no_kd", "protokd", {"ProtoKDTrainer": {"alpha": 0.0}}, "ProtoKD without L_kd"),
    Variant("protokd-no_proto", "protokd", {"ProtoKDTrainer": {"beta": 0.0}}, "ProtoKD without L_proto"),
    Variant("protokd-intra", "protokd", {"ProtoKDTrainer": {"intra_class_only": True}},
            "ProtoKD, intra-class L_proto"),
    # temperature 1: for a voxel the student cannot resolve, the KD optimum is calibrated instead of T times
    # sharper than the evidence the student has (see docs/evidence/2026-11-29_ablations/README.md)
    Variant("protokd-temp1", "protokd", {"ProtoKDTrainer": {"temperature": 1.0}}, "ProtoKD, KD at T = 1"),
    # the control for the ablations: ProtoKDTrainer with both distillation terms at weight 0 trains on L_seg like
    # the unimodal baseline, as another training run (other initial weights, other augmentation draws); its
    # distance from the baseline is the scale of run-to-run variation, not distillation
    Variant("protokd-seg_only", "protokd", {"ProtoKDTrainer": {"alpha": 0.0, "beta": 0.0}},
            "ProtoKDTrainer, L_seg only (control)"),
    # the KD-Net variants that the evidence protocol measures against the paper's setting
    Variant("kdnet-kl_mean", "kdnet", {"KDNetTrainer": {"kl_reduction": "mean"}}, "KD-Net, L_KL averaged"),
    Variant("kdnet-no_kl", "kdnet", {"KDNetTrainer": {"alpha": 0.0}}, "KD-Net without L_KL"),
    Variant("kdnet-no_kd", "kdnet", {"KDNetTrainer": {"lambda": 0.0}}, "KD-Net without L_KD"),
    # the two approaches combined (ours): ProtoKD at the paper's settings, started from the modality-dropout model
    # sliced to the student's channel; compared with the baseline and with that modality-dropout model
    Variant("protokd-from_moddrop", "protokd", {"ProtoKDTrainer": {"start_from": "modality_dropout"}},
            "ProtoKD started from modality dropout"),
)}

# a method's control: its own trainer with every distillation term at weight 0. It trains on L_seg like the baseline,
# as another training run, so the method and its ablations are also compared with it: a difference from the
# baseline that the control shows too is run-to-run variation, not distillation
CONTROLS = {"protokd": "protokd-seg_only"}

# the arm a practitioner would pick instead of distillation: one nnU-Net trained with modality dropout, predicted
# from each student modality; every distilled student is also compared with it (ModelKey.modality_dropout)
MODALITY_DROPOUT = METHODS["moddrop"]

METHOD_ORDER = (TEACHER.name, *METHODS)
# what `experiment`, `evidence` and the demo train unless told otherwise: a student per modality of each method
# (a method with one model on every channel is added by asking for it)
DEFAULT_METHODS = tuple(name for name, method in METHODS.items() if not method.every_channel)


def describe_method_settings() -> str:
    """One line per distilling trainer setting: name, valid range, default and meaning (for --help)."""
    return "\n".join(f"  {method}.{name}: {setting.range_text()}, default {json.dumps(setting.default)} "
                     f"({setting.meaning})"
                     for method, settings in METHOD_SETTINGS.items() for name, setting in settings.items())


def base_method(name: str) -> str:
    """The method of a method or of a variant of one ("protokd-no_kd" -> "protokd")."""
    return VARIANTS[name].method if name in VARIANTS else name


def method_trainer(name: str) -> str:
    """The trainer of a method, of a variant of one, or of the teacher."""
    return TEACHER.trainer if name == TEACHER.name else METHODS[base_method(name)].trainer


def title(name: str) -> str:
    """The table title of a method or variant (its name when unknown: a report may list other folders)."""
    if name == TEACHER.name:
        return TEACHER.title
    if name in VARIANTS:
        return VARIANTS[name].title
    return METHODS[name].title if name in METHODS else name


def distilling_trainers() -> tuple:
    return tuple(method.trainer for method in METHODS.values() if method.distils)


def method_of_trainer(trainer: str) -> Method | None:
    """The registered method that `trainer` trains (None for another trainer)."""
    return next((method for method in METHODS.values() if method.trainer == trainer), None)


def every_channel_methods() -> tuple:
    return tuple(name for name, method in METHODS.items() if method.every_channel)


class ModelKey(NamedTuple):
    """A trained model of the protocol: a method or variant and the modality it reads (None: the teacher, which
    reads every channel; "A+B": a subset of modalities). Its text form, "method:modality" (or "teacher"), is how
    reports and JSON files key their results."""
    method: str
    modality: str | None = None

    @property
    def text(self) -> str:
        return self.method if self.modality is None else f"{self.method}:{self.modality}"

    @classmethod
    def parse(cls, text: str) -> "ModelKey":
        method, separator, modality = text.partition(":")
        return cls(method, modality if separator else None)

    @property
    def base_method(self) -> str:
        return base_method(self.method)

    @property
    def is_variant(self) -> bool:
        return self.method in VARIANTS

    @property
    def baseline(self) -> "ModelKey | None":
        """The model every student is compared with: the unimodal baseline of its modality (None for the teacher,
        the baseline itself and a model of several modalities, which has no single-modality baseline)."""
        if self.method in (TEACHER.name, BASELINE.name) or not self.modality or \
                MODALITY_SEPARATOR in self.modality:
            return None
        return ModelKey(BASELINE.name, self.modality)

    @property
    def control(self) -> "ModelKey | None":
        """The control of the same modality that this method or variant is also compared with (CONTROLS); None for
        the control itself, a method without one and a model without a single modality."""
        control = CONTROLS.get(self.base_method)
        if control is None or self.method == control or not self.modality or MODALITY_SEPARATOR in self.modality:
            return None
        return ModelKey(control, self.modality)

    @property
    def distils(self) -> bool:
        """Learns from the teacher: a distilling method or a variant of one, except its control (whose distillation
        terms are all at weight 0). Its verdicts need a teacher that knows more than the baseline."""
        base = METHODS.get(self.base_method)
        return base is not None and base.distils and self.method not in CONTROLS.values()

    @property
    def modality_dropout(self) -> "ModelKey | None":
        """The modality-dropout model predicting from the same modality that this distilled student (a distilling
        method at its own settings, or a variant that starts from that model) is also compared with; None for every
        other model."""
        if self.is_variant and not VARIANTS[self.method].starts_from_modality_dropout:
            return None
        if not self.distils or not self.modality or MODALITY_SEPARATOR in self.modality:
            return None
        return ModelKey(MODALITY_DROPOUT.name, self.modality)

    def sort_key(self) -> tuple:
        """Report order: the teacher first, then per modality the baseline, each method in registry order with its
        variants after it; unknown methods last."""
        base = self.base_method
        rank = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
        return (self.modality is not None, self.modality or "", rank, self.is_variant, self.method)


def baseline_of(results: dict, key: str):
    """In a mapping keyed by ModelKey text (a report's results, the evidence's pooled values), the entry of the
    model `key` is compared with (ModelKey.baseline); None when it has none or the mapping lacks it."""
    baseline = ModelKey.parse(key).baseline
    return None if baseline is None else results.get(baseline.text)


def control_of(results: dict, key: str):
    """As `baseline_of`, for the model's control (ModelKey.control)."""
    control = ModelKey.parse(key).control
    return None if control is None else results.get(control.text)


def modality_dropout_of(results: dict, key: str):
    """As `baseline_of`, for the modality-dropout model a distilled student is compared with
    (ModelKey.modality_dropout)."""
    rival = ModelKey.parse(key).modality_dropout
    return None if rival is None else results.get(rival.text)
