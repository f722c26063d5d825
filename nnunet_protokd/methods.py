"""The one registry of the plugin's methods: which trainer trains each, in what order reports list them, under what
title, and the variants (a method with other settings) that the protocol can train beside them.

Adding a method is one entry in METHODS and one trainer file in trainers/ (README, "Adding a method"). A trained
model of the protocol is named by its ModelKey: the method (or variant) and the modality it reads.
"""
from __future__ import annotations

from typing import NamedTuple

# joins the modality names of a channel subset: "T1ce+FLAIR" (configuration names, model keys, input folders)
MODALITY_SEPARATOR = "+"


class Method(NamedTuple):
    name: str  # what the protocol and the reports call it: "protokd"
    trainer: str  # its nnU-Net trainer class in trainers/
    title: str  # its name in tables and figures
    distils: bool = False  # learns from its fold's frozen teacher (which must be trained first)
    every_channel: bool = False  # one model on every channel (predicted from subsets), not a student per modality


class Variant(NamedTuple):
    """A method with other settings, trained beside it on a configuration of its own
    (<student configuration>-<variant suffix>)."""
    name: str  # "<method>-<suffix>"
    method: str
    settings: dict  # {trainer: {setting: value}}
    title: str


TEACHER = Method("teacher", "ProtoKDTeacherTrainer", "Teacher (all modalities)", every_channel=True)
BASELINE = Method("unimodal", "UnimodalTrainer", "Unimodal")
# in report order
METHODS = {method.name: method for method in (
    BASELINE,
    Method("protokd", "ProtoKDTrainer", "ProtoKD", distils=True),
    Method("kdnet", "KDNetTrainer", "KD-Net", distils=True),
    Method("lckd", "LCKDTrainer", "LCKD", every_channel=True),
)}

VARIANTS = {variant.name: variant for variant in (
    # the ablations of the ProtoKD paper's Tables 2 and 3
    Variant("protokd-no_kd", "protokd", {"ProtoKDTrainer": {"alpha": 0.0}}, "ProtoKD without L_kd"),
    Variant("protokd-no_proto", "protokd", {"ProtoKDTrainer": {"beta": 0.0}}, "ProtoKD without L_proto"),
    Variant("protokd-intra", "protokd", {"ProtoKDTrainer": {"intra_class_only": True}},
            "ProtoKD, intra-class L_proto"),
    # temperature 1: for a voxel the student cannot resolve, the KD optimum is calibrated instead of T times
    # sharper than the evidence the student has (see docs/evidence/README.md)
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
)}

METHOD_ORDER = (TEACHER.name, *METHODS)


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

    def sort_key(self) -> tuple:
        """Report order: the teacher first, then per modality the baseline, each method in registry order with its
        variants after it; unknown methods last."""
        base = self.base_method
        rank = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
        return (self.modality is not None, self.modality or "", rank, self.is_variant, self.method)
