"""The method registry: one entry names a method's trainer, title, settings and place in every table, and a trained
model's key ("method:modality") is read and written in one place."""
import subprocess
import sys

import pytest

from nnunet_protokd.methods import (
    BASELINE,
    DEFAULT_METHODS,
    METHOD_DEFAULTS,
    METHOD_SETTINGS,
    METHODS,
    TEACHER,
    VARIANTS,
    ModelKey,
    baseline_of,
    control_of,
    method_trainer,
    modality_dropout_of,
    title,
)
from nnunet_protokd.protocol.benchmark import TRAINERS


def test_model_keys_read_what_they_write():
    for text, key in (("teacher", ModelKey("teacher")), ("protokd:T1ce", ModelKey("protokd", "T1ce")),
                      ("lckd:T1ce+FLAIR", ModelKey("lckd", "T1ce+FLAIR")),
                      ("protokd-no_kd:T1", ModelKey("protokd-no_kd", "T1"))):
        assert ModelKey.parse(text) == key and key.text == text


def test_every_student_is_compared_with_the_baseline_of_its_modality_and_nothing_else_is():
    assert ModelKey.parse("protokd:T1ce").baseline == ModelKey("unimodal", "T1ce")
    assert ModelKey.parse("protokd-no_kd:T1").baseline == ModelKey("unimodal", "T1")
    assert ModelKey.parse("lckd:T1ce").baseline == ModelKey("unimodal", "T1ce")
    for text in ("teacher", "unimodal:T1ce", "lckd:T1ce+FLAIR"):
        assert ModelKey.parse(text).baseline is None, text
    results = {"unimodal:T1ce": 1, "protokd:T1ce": 2, "kdnet:FLAIR": 3}
    assert baseline_of(results, "protokd:T1ce") == 1 and baseline_of(results, "kdnet:FLAIR") is None


def test_a_method_with_a_control_and_its_ablations_are_compared_with_the_control_of_their_modality_only():
    assert ModelKey.parse("protokd:T1").control == ModelKey("protokd-seg_only", "T1")
    assert ModelKey.parse("protokd-no_kd:T1ce").control == ModelKey("protokd-seg_only", "T1ce")
    # the control itself, a method without a control, the teacher, the baseline and a subset model: none
    for text in ("protokd-seg_only:T1", "kdnet:T1", "kdnet-no_kd:T1ce", "teacher", "unimodal:T1",
                 "protokd:T1+T1ce", "moddrop:T1"):
        assert ModelKey.parse(text).control is None, text
    results = {"protokd-seg_only:T1": "control T1", "unimodal:T1": "baseline T1"}
    assert control_of(results, "protokd-intra:T1") == "control T1"
    assert control_of(results, "protokd:T1ce") is None  # not trained for T1ce
    assert control_of(results, "kdnet:T1") is None and control_of(results, "protokd-seg_only:T1") is None


def test_distilled_students_are_compared_with_modality_dropout_of_their_modality_and_need_a_teacher():
    assert ModelKey.parse("protokd:T1").modality_dropout == ModelKey("moddrop", "T1")
    assert ModelKey.parse("kdnet:T1ce").modality_dropout == ModelKey("moddrop", "T1ce")
    # a variant started from that model is compared with it: does distillation add to where it starts?
    assert ModelKey.parse("protokd-from_moddrop:T1ce").modality_dropout == ModelKey("moddrop", "T1ce")
    # other variants, non-distilling models and subsets are not
    for text in ("protokd-no_kd:T1", "unimodal:T1", "moddrop:T1", "lckd:T1", "teacher", "protokd:T1+T2"):
        assert ModelKey.parse(text).modality_dropout is None, text
    assert modality_dropout_of({"moddrop:T1": 1}, "protokd:T1") == 1
    assert modality_dropout_of({"moddrop:T1": 1}, "protokd:T1ce") is None
    # what learns from the teacher: the distilling methods and their variants, not the control (both terms at 0)
    assert ModelKey.parse("protokd-no_kd:T1").distils and ModelKey.parse("kdnet:T1ce").distils
    for text in ("protokd-seg_only:T1", "unimodal:T1", "moddrop:T1", "lckd:T1", "teacher", "other:T1"):
        assert not ModelKey.parse(text).distils, text


def test_tables_list_the_teacher_then_each_modality_in_registry_order_with_variants_after_their_method():
    keys = ["kdnet:T1", "protokd-no_kd:T1", "unimodal:T1ce", "lckd:T1", "protokd:T1", "teacher", "unimodal:T1",
            "other:T1"]
    ordered = sorted(keys, key=lambda text: ModelKey.parse(text).sort_key())
    assert ordered == ["teacher", "unimodal:T1", "protokd:T1", "protokd-no_kd:T1", "kdnet:T1", "lckd:T1", "other:T1",
                       "unimodal:T1ce"]


def test_the_registry_entry_is_all_the_other_tables_are_made_of():
    assert method_trainer("teacher") == TEACHER.trainer and method_trainer("protokd-intra") == "ProtoKDTrainer"
    assert title("protokd-no_kd") == "ProtoKD without L_kd" and title("unknown") == "unknown"
    assert DEFAULT_METHODS == ("unimodal", "protokd", "kdnet")  # a student per modality; LCKD when asked for
    assert set(METHOD_SETTINGS) == {m.trainer for m in METHODS.values() if m.settings} == set(METHOD_DEFAULTS)
    assert METHOD_DEFAULTS["ProtoKDTrainer"]["alpha"] == 10.0 and METHOD_DEFAULTS["KDNetTrainer"]["lambda"] == 0.75
    assert all(v.method in METHODS and set(v.settings) <= set(METHOD_SETTINGS) for v in VARIANTS.values())
    # the benchmark measures every method's trainer (LCKD in both stages) and the teacher's step
    assert TRAINERS[0] == BASELINE.trainer and TRAINERS[-1] == TEACHER.trainer
    assert {m.trainer for m in METHODS.values()} < set(TRAINERS) and "LCKDTrainer:subsets" in TRAINERS


@pytest.mark.parametrize("arguments", [["--help"], ["experiment", "--no-such-option"]])
def test_help_and_argument_errors_answer_without_loading_pytorch(arguments):
    """The command line parses before it imports the stages (PyTorch and nnU-Net take seconds to import)."""
    probe = ("import sys\nfrom nnunet_protokd.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
             "    pass\nprint('torch loaded:', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe, *arguments], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "torch loaded: False", result.stdout + result.stderr
