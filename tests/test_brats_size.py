"""BraTS geometry on CPU: every trainer at nnU-Net's default plans for 240x240x155 at 1 mm.

Slow (45-60 minutes on 2 cores, up to about 20 GB of memory) and therefore marked `slow`, which the default
test run (and CI) deselects. Run it alone, on an otherwise idle machine:

    PROTOKD_TEST_WORKERS=0 ./bootstrap.sh test -m slow tests/test_brats_size.py -s

PROTOKD_BRATS_SIZE_DIR keeps the work folder (default: a pytest temporary folder); the figures are written to
brats_size.json and brats_size.md there and printed. Phantoms at BraTS geometry go through the converter,
`nnUNetv2_plan_and_preprocess` with nnU-Net's default plans, a one-iteration teacher (so that students have a
teacher checkpoint), the benchmark (one warm-up and PROTOKD_BRATS_SIZE_STEPS measured steps, default 1, of every
trainer on the same batches, each in its own process under an address-space limit of PROTOKD_BRATS_SIZE_MEMORY_GB,
default 18, so that a trainer that does not fit is a result; PROTOKD_BRATS_SIZE_PRECISION=bfloat16 or float16 runs
its steps under CPU autocast, the stand-in for CUDA's, default float32), a one-iteration UnimodalTrainer and
`nnUNetv2_predict` of one full-size case from its one modality.

On a machine with a GPU, PROTOKD_BRATS_SIZE_DEVICE=cuda runs every command there as users do (nnU-Net's float16
autocast; no address-space limit, which CUDA's start-up does not survive) and PROTOKD_BRATS_SIZE_COMPILE (the
benchmark's --compile: nnunet, on or off; default nnunet, which compiles on CUDA) says whether to compile.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import BIN, REPO, nnunet_environment, run

from nnunet_protokd.data.phantoms import generate_brats_phantoms

pytestmark = pytest.mark.slow
DATASET = "Dataset501_BraTS2018"
# address space of each benchmark process (it counts 3-4 GB of mapped libraries that are never resident): 18 GB on
# a 24 GB machine that other jobs share; PROTOKD_BRATS_SIZE_MEMORY_GB raises it on a machine of its own
MEMORY_LIMIT_GB = float(os.environ.get("PROTOKD_BRATS_SIZE_MEMORY_GB", "18"))
STEPS = int(os.environ.get("PROTOKD_BRATS_SIZE_STEPS", "1"))  # measured steps per trainer, after one of warm-up
# the benchmark's steps under CPU autocast (bfloat16 is fast only on CPUs with bfloat16 instructions, e.g. AVX512_BF16)
PRECISION = os.environ.get("PROTOKD_BRATS_SIZE_PRECISION", "float32")
DEVICE = os.environ.get("PROTOKD_BRATS_SIZE_DEVICE", "cpu")
COMPILE = os.environ.get("PROTOKD_BRATS_SIZE_COMPILE", "nnunet")


def timed(command: list, env: dict) -> dict:
    """Wall time and peak resident memory (the largest single process of the command's tree) of a command."""
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", "import resource, subprocess, sys; "
                                "code = subprocess.run(sys.argv[1:]).returncode; "
                                "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
                                "sys.exit(code)", *map(str, command)], env=env, capture_output=True, text=True)
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-4000:]
    peak_kb = int(completed.stdout.strip().splitlines()[-1].split()[1])
    return {"wall_s": round(time.perf_counter() - start, 1), "peak_gb": round(peak_kb / 2 ** 20, 2)}


def test_every_trainer_at_brats_size(tmp_path_factory):
    root = Path(os.environ.get("PROTOKD_BRATS_SIZE_DIR") or tmp_path_factory.mktemp("brats_size"))
    root.mkdir(parents=True, exist_ok=True)
    env = nnunet_environment(root)
    if COMPILE != "nnunet":  # nnU-Net's own trainings and predictions compile (or not) as the benchmark does
        env["nnUNet_compile"] = "true" if COMPILE == "on" else "false"
    figures = {}
    geometry = {"shape_zyx": (155, 240, 240), "spacing_xyz": (1.0, 1.0, 1.0), "seed": 0}
    if not (root / "train").is_dir():  # a kept work folder reuses its phantoms (minutes each at this size)
        generate_brats_phantoms(str(root / "train.partial"), num_hgg=3, num_lgg=2, **geometry)
        os.rename(root / "train.partial", root / "train")
    if not (root / "test").is_dir():
        generate_brats_phantoms(str(root / "test.partial"), num_hgg=1, num_lgg=1, with_segmentation=False,
                                first_case_index=100, **geometry)
        os.rename(root / "test.partial", root / "test")
    run([BIN / "python", REPO / "dataset_conversion" / "convert_brats2018.py", root / "train", "501",
         "--test", root / "test"], env)
    figures["plan_and_preprocess"] = timed([BIN / "nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "3d_fullres",
                                            "-np", "2"], env)
    plans = json.loads((root / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    planned = plans["configurations"]["3d_fullres"]
    figures["plans"] = {"patch_size": planned["patch_size"], "batch_size": planned["batch_size"],
                        "features_per_stage": planned["architecture"]["arch_kwargs"]["features_per_stage"]}
    assert planned["batch_size"] == 2 and np.prod(planned["patch_size"]) >= 100 * 150 * 120  # about 112x160x128

    run([BIN / "nnunet-protokd", "add-config", "-d", "501", "-c", "3d_fullres", "--name", "3d_probe", "--epochs", "1",
         "--iterations-per-epoch", "1", "--val-iterations-per-epoch", "1", "--no-final-validation"], env)
    run([BIN / "nnunet-protokd", "add-config", "-d", "501", "-c", "3d_probe", "-m", "T1ce"], env)
    figures["teacher_one_epoch"] = timed([BIN / "nnUNetv2_train", "501", "3d_probe", "0", "-tr",
                                          "ProtoKDTeacherTrainer", "-device", DEVICE], env)
    output = root / "brats_size_benchmark.json"
    limits = ["--memory-limit-gb", str(MEMORY_LIMIT_GB), "--precision", PRECISION] if DEVICE == "cpu" else []
    run([BIN / "nnunet-protokd", "benchmark", "-d", "501", "-c", "3d_probe_T1ce", "--device", DEVICE, "--steps",
         str(STEPS), "--warmup", "1", "--inference-cases", "1", "--compile", COMPILE, *limits, "-o", output], env,
        timeout=3 * 3600)
    figures["benchmark"] = json.loads(output.read_text())["results"]
    figures["unimodal_one_epoch"] = timed([BIN / "nnUNetv2_train", "501", "3d_probe_T1ce", "0", "-tr",
                                           "UnimodalTrainer", "-device", DEVICE], env)
    t1ce_only = root / "t1ce_only"
    t1ce_only.mkdir(exist_ok=True)
    case = next((root / "nnUNet_raw" / DATASET / "imagesTs").glob("*_0001.nii.gz"))
    os.link(case, t1ce_only / case.name.replace("_0001.nii.gz", "_0000.nii.gz"))
    figures["predict_one_case"] = timed([BIN / "nnUNetv2_predict", "-i", t1ce_only, "-o", root / "predicted", "-d",
                                         "501", "-c", "3d_probe_T1ce", "-tr", "UnimodalTrainer", "-f", "0",
                                         "-device", DEVICE, "--disable_tta", "-npp", "1", "-nps", "1"], env)
    predicted = sitk.ReadImage(str(next((root / "predicted").glob("*.nii.gz"))))
    assert predicted.GetSize() == (240, 240, 155)

    (root / "brats_size.json").write_text(json.dumps(figures, indent=2))
    table = brats_size_table(figures)
    (root / "brats_size.md").write_text(table)
    print("\n" + table)
    for name, result in figures["benchmark"].items():
        if "error" in result:  # did not fit is a result; anything else is a defect
            assert "memory" in result["error"].lower() or "alloc" in result["error"].lower(), (name, result)
        elif name not in ("teacher", "inference"):
            assert all(np.isfinite(v) for step in result["loss_terms"] for v in step.values()), (name, result)


def brats_size_table(figures: dict) -> str:
    plans = figures["plans"]
    where = (f"CPU {PRECISION}; peak = resident memory of the trainer's process" if DEVICE == "cpu" else
             f"{DEVICE}, nnU-Net's float16 autocast; peak = the tensors the trainer's process allocated")
    lines = [f"nnU-Net 3d_fullres plans: patch {'x'.join(map(str, plans['patch_size']))}, batch "
             f"{plans['batch_size']}, features {plans['features_per_stage']}; {where}; compile {COMPILE}; {STEPS} "
             f"measured step(s) after 1 of warm-up (median)", "",
             "| trainer | s/iteration | peak GB | limit s | x limit (overhead) | x limit paired in its process "
             "(rounds) | loss terms' forward s |",
             "|---|---|---|---|---|---|---|"]
    for name, result in figures["benchmark"].items():
        if name == "inference":
            continue
        if "error" in result:
            lines.append(f"| {name} | did not fit ({result['error'][:80]}) | > {MEMORY_LIMIT_GB:g} (address space) "
                         f"| | | | |")
            continue
        limit = (f"{result['limit_s']:.1f} | {result['limit_ratio']:.3f} ({result['overhead_percent']:+.1f} %)"
                 if "limit_s" in result else " | ")
        paired = result.get("paired_limit")
        paired = f"{paired['limit_ratio']:.3f} ({paired['rounds']})" if paired else ""
        terms = ", ".join(f"{term} {s:.2f}" for term, s in result.get("loss_forward_s", {}).items())
        lines.append(f"| {name}{' (forward only)' if name == 'teacher' else ''} | {result['median_s']:.1f} | "
                     f"{result['peak_memory_mb'] / 1024:.1f} | {limit} | {paired} | {terms} |")
    inference = figures["benchmark"].get("inference", {})
    if "ratio" in inference:
        lines.append(f"| single-modality inference, one case: student / plain nnU-Net | "
                     f"{inference['student_median_s']:.1f} / {inference['plain_median_s']:.1f} s "
                     f"(x{inference['ratio']:.2f}) | | | | | |")
    for name in ("plan_and_preprocess", "teacher_one_epoch", "unimodal_one_epoch", "predict_one_case"):
        lines.append(f"| {name} (whole command) | {figures[name]['wall_s']:.0f} s | {figures[name]['peak_gb']:.1f} "
                     f"| | | | |")
    return "\n".join(lines) + "\n"
