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
    method_trainer,
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
