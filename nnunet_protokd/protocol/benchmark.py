"""`nnunet-protokd benchmark`: what distillation costs, side by side in one run.

Batches are drawn once from nnU-Net's own training data loader (real loading and augmentation) and cached, so
every trainer gets the very same batches and the measured step excludes data loading. Each trainer then runs in
a process of its own (its peak resident memory is that process's; on CUDA torch.cuda.max_memory_allocated):
after warm-up steps, the median and IQR of seconds per `train_step`, and of the forward pass of each loss term
(the trainer's loss functions timed where it calls them, synchronised). The teacher's plain forward is timed the
same way, and the student's sliding-window inference through nnU-Net's predictor against a plain one-channel
nnU-Net network of the same plans.

The physical limit of a distilling trainer's step is the unimodal step plus one teacher forward pass (no
gradient), both measured in the same run: the report gives it and the overhead beyond it. Because step times differ
between processes (15-20 % at BraTS size on a CPU, measured), each distilling trainer's process also measures its
limit itself, in rounds on the same batch (paired_limit): its step, its student's plain segmentation step and its
teacher's forward, in rotating order, so that the ratio compares like with like. The memory limit is the
unimodal peak plus what a distilling step holds of its teacher (teacher_memory: its weights and the outputs of its
forward that the losses read), measured in the distilling trainer's process.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import nnunetv2.paths as nnunet_paths  # read at call time: tests and commands set them late
import numpy as np
import scipy.stats
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_protokd.channels import StudentModality
from nnunet_protokd.errors import ConfigurationError
from nnunet_protokd.methods import BASELINE, METHODS, TEACHER, distilling_trainers
from nnunet_protokd.plans import load_preprocessed, resolved_configuration
from nnunet_protokd.training import losses
from nnunet_protokd.training.base import SingleModalityTrainer, build_checked_network, seed_everything, step_autocast

# every trainer of the registry and the teacher's. A method with one model on every channel (LCKD, modality
# dropout) trains on the student configuration's multi-channel base; one whose schedule has two stages (LCKD's
# full_modality_fraction) is measured in both: every modality (the first epochs), and random subsets with
# cross-modal KD from two teachers (T1ce for TC/ET and FLAIR for WT, as the phantoms elect them; channels 1 and
# M-1 in general)
STAGE_SEPARATOR = ":"  # "LCKDTrainer:subsets": a trainer measured in one stage of its schedule
TRAINERS = tuple(trainer for method in METHODS.values()
                 for trainer in ((method.trainer, f"{method.trainer}{STAGE_SEPARATOR}subsets")
                                 if "full_modality_fraction" in (method.settings or {}) else (method.trainer,))
                 ) + (TEACHER.trainer,)
MODES = TRAINERS + ("teacher", "inference")  # what one run measures, unless told fewer
EVERY_CHANNEL_TRAINERS = tuple(method.trainer for method in (*METHODS.values(), TEACHER) if method.every_channel)

# glibc's malloc hands every block above its mmap threshold (32 MiB at most) back to the kernel when it is freed,
# so on a CPU each BraTS-size step maps its large tensors afresh and faults in every page of them: measured at
# BraTS size under bfloat16 (2 cores), 40 % of the CPU time in the kernel and rounds spreading by 10 %. "retain"
# (glibc tunables: no mmap, no trimming) keeps freed memory in the process for the next step, as PyTorch's caching
# allocator does on CUDA: the same run took 12.4 instead of 27.2 s per unimodal step, IQR 0.21 instead of 3.7 s. The
# price: the process's peak resident memory is then what the allocator holds, not what the step needs at once (and
# at BraTS size in float32 more than a 22 GB address space)
CPU_ALLOCATORS = {"system": None,
                  "retain": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=" + str(2 ** 62)}


def allocator_environment(cpu_allocator: str, device: str) -> dict:
    """The environment variables that give the measuring processes `cpu_allocator` (CPU_ALLOCATORS)."""
    if cpu_allocator not in CPU_ALLOCATORS:
        raise ConfigurationError(f"--cpu-allocator must be one of {', '.join(CPU_ALLOCATORS)}, got {cpu_allocator!r}")
    if CPU_ALLOCATORS[cpu_allocator] is None:
        return {}
    if device != "cpu":
        raise ConfigurationError(f"--cpu-allocator {cpu_allocator} applies to --device cpu only (got {device}: "
                                 "PyTorch's CUDA allocator caches freed memory already)")
    if platform.libc_ver()[0] != "glibc":
        raise ConfigurationError(f"--cpu-allocator {cpu_allocator} sets glibc's malloc tunables, and this Python "
                                 f"does not run on glibc ({platform.libc_ver()[0] or 'unknown C library'})")
    tunables = ":".join(filter(None, (os.environ.get("GLIBC_TUNABLES"), CPU_ALLOCATORS[cpu_allocator])))
    return {"GLIBC_TUNABLES": tunables}


def _trainer(name: str, plans: dict, configuration: str, dataset_json: dict, device: str, teacher_checkpoint: str,
             precision: str = "float32", compile_network: str = "nnunet"):
    """A trainer writing into a scratch results folder, its teacher named by path (so nothing of the user's
    nnUNet_results is touched).

    precision: on CPU, "float16"/"bfloat16" run the step under CPU autocast with a GradScaler, the stand-in for
    nnU-Net's CUDA autocast (on CUDA nnU-Net's float16 autocast always applies). compile_network: "nnunet"
    (nnU-Net's decision: on for CUDA), "on" (forced, also on CPU; student and teacher) or "off"; LCKDTrainer
    always decides for itself (off)."""
    settings = plans["configurations"][configuration].setdefault("protokd", {})
    settings["teacher"] = {**settings.get("teacher", {}), "checkpoint": teacher_checkpoint}
    plans["continue_training"] = False
    trainer = recursive_find_trainer_class_by_name(name)(plans, configuration, 0, dataset_json, torch.device(device))
    if compile_network != "nnunet" and name != "LCKDTrainer":
        trainer._do_i_compile = lambda: compile_network == "on"
    if precision != "float32" and trainer.device.type == "cpu":
        trainer.cpu_autocast_dtype = getattr(torch, precision)
        trainer.grad_scaler = torch.amp.GradScaler("cpu")
    trainer.initialize()
    return trainer


def _measured_plans(args: dict) -> tuple[dict, dict]:
    """(plans, dataset.json), with the patch size asked for (`--patch-size`) in the student configuration and every
    configuration it inherits from (LCKD trains on the base): in memory only, the plans file is not touched."""
    plans, dataset_json = load_preprocessed(args["dataset"], args["plans"])
    patch_size = args.get("patch_size")
    name = args["configuration"]
    while patch_size and name is not None:
        strides = resolved_configuration(plans, name)["architecture"]["arch_kwargs"].get("strides")
        total_stride = np.prod(np.array(strides), axis=0).tolist() if strides is not None else None
        if total_stride is not None and (len(total_stride) != len(patch_size)
                                         or any(p % s for p, s in zip(patch_size, total_stride))):
            raise ConfigurationError(f"--patch-size {' '.join(map(str, patch_size))}: configuration {name!r} needs "
                                     f"a multiple of its network's total stride {total_stride} on each axis")
        plans["configurations"][name]["patch_size"] = list(patch_size)
        name = plans["configurations"][name].get("inherits_from")
    return plans, dataset_json


def _weights(network: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


def _same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, function, *args, **kwargs) -> tuple:
    """(function(*args, **kwargs), its seconds), synchronised on CUDA before and after."""
    _synchronize(device)
    start = time.perf_counter()
    value = function(*args, **kwargs)
    _synchronize(device)
    return value, time.perf_counter() - start


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _statistics(seconds: list) -> dict:
    q1, median, q3 = np.percentile(seconds, [25, 50, 75])
    return {"median_s": float(median), "iqr_s": float(q3 - q1), "n": len(seconds)}


def _time_loss_functions(trainer, device: str, seconds: dict) -> None:
    """Replaces the loss functions (training/losses.py) that the trainer's classes call with timed ones: each call
    adds its forward seconds (synchronised) to `seconds[name]` of the step under way (`seconds["step"]`). The
    names are replaced in the modules of the trainer's classes (nnU-Net imports trainers under names of its own)."""
    namespaces = {id(f.__globals__): f.__globals__ for cls in type(trainer).__mro__ for f in vars(cls).values()
                  if inspect.isfunction(f)}
    for module, name in [(m, n) for m in namespaces.values() for n in list(m)]:
        function = module[name]
        if name.endswith("_loss") and getattr(function, "__module__", None) == losses.__name__:
            def timed(*args, _function=function, _name=name, **kwargs):
                value, elapsed = _timed(device, _function, *args, **kwargs)
                per_step = seconds.setdefault(_name, {})
                per_step[seconds["step"]] = per_step.get(seconds["step"], 0.0) + elapsed
                return value
            module[name] = timed


def unimodal_step(trainer, batch: dict) -> dict:
    """UnimodalTrainer's train_step on a distilling trainer's student (network, optimiser, GradScaler): the
    segmentation loss alone, SingleModalityTrainer's terms, through the same step."""
    return trainer.train_step_with_terms(batch, SingleModalityTrainer.weighted_loss_terms.__get__(trainer),
                                         ("seg_loss",))


def teacher_forward(trainer, batch: dict) -> tuple:
    """The distilling `trainer`'s teacher on `batch` as its step runs it (under the step's autocast)."""
    with step_autocast(trainer):
        return trainer.teacher(batch["data"].to(trainer.device))


def _megabytes(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20


def teacher_memory(trainer, batch: dict) -> dict:
    """What a distilling step holds of its teacher beyond the unimodal step: the teacher's weights and what its
    forward returns (logits and the captured features the losses read), kept through the student's forward and
    backward. The forward's other activations are freed before the student's forward starts (no_grad)."""
    logits, features = teacher_forward(trainer, batch)
    network = trainer.teacher.network
    return {"weights_mb": _megabytes([*network.parameters(), *network.buffers()]),
            "kept_mb": _megabytes([logits, *features.values()]), "kept": sorted(features)}


LIMIT_BOUND = 1.05  # a distilling step within 5 % of its limit


def paired_limit(trainer, batches: list, rounds: int, device: str) -> dict:
    """The distilling `trainer`'s step against its limit, measured in this process: each round takes the next
    batch (cyclically) and times, in an order that rotates from round to round, (1) the trainer's train_step,
    (2) the same train_step with only the segmentation loss (SingleModalityTrainer's terms: the unimodal step, on
    the same student network, optimiser and GradScaler) and (3) the teacher's forward under the step's autocast.
    limit_ratio is the median over rounds of (1) / ((2) + (3)); every round's seconds are kept (per_round).
    Rounds are the unit of replication: limit_ratio_ci95 is the distribution-free 95 % confidence interval of
    that median (order statistics; None where too few rounds give one) and below_bound_p the one-sided sign
    test's p that the median ratio is below LIMIT_BOUND (at least 0.5^rounds: 5 rounds can give p < 0.05).
    Each part runs once untimed first: (2) is a code path the trainer's warm-up steps did not take, and under
    torch.compile its first call compiles (measured at BraTS size on CPU: 23 s against 10 s). The student's
    weights move in (1) and (2) alike: run it after the checks of the measured steps."""
    parts = (trainer.train_step, functools.partial(unimodal_step, trainer), functools.partial(teacher_forward, trainer))
    for part in parts:
        _timed(device, part, batches[0])
    # the order shifts once more after every lcm(batches, 3) rounds, so that 3 x len(batches) rounds time each
    # batch in each order (batch and order effects apart, also where 3 divides the number of batches)
    period = math.lcm(len(batches), 3)
    per_round = []
    for index in range(rounds):
        batch, seconds, rotation = batches[index % len(batches)], [0.0, 0.0, 0.0], index + index // period
        for position in range(3):
            part = (rotation + position) % 3
            seconds[part] = _timed(device, parts[part], batch)[1]
        per_round.append(seconds)
    step, plain, teacher = (np.array(column) for column in zip(*per_round))
    ratios = step / (plain + teacher)
    q1, median, q3 = np.percentile(ratios, [25, 50, 75])
    interval = scipy.stats.quantile_test(ratios, q=LIMIT_BOUND, p=0.5).confidence_interval(0.95)
    below_bound = scipy.stats.quantile_test(ratios, q=LIMIT_BOUND, p=0.5, alternative="less")
    return {"rounds": rounds, "step_s": float(np.median(step)), "unimodal_step_s": float(np.median(plain)),
            "teacher_forward_s": float(np.median(teacher)), "limit_ratio": float(median),
            "limit_ratio_iqr": float(q3 - q1), "overhead_percent": 100.0 * (float(median) - 1.0),
            "limit_ratio_ci95": [float(interval.low), float(interval.high)]
                                if np.isfinite([interval.low, interval.high]).all() else None,
            "bound": LIMIT_BOUND, "below_bound_p": float(below_bound.pvalue), "per_round": per_round}


def worker(mode: str, args: dict) -> dict:
    """Runs in its own process: one trainer's steps, the teacher's forward, or the inference comparison."""
    seed_everything(0)  # the same batches and initial weights in every run
    if args.get("memory_limit_gb"):  # fail with an allocation error instead of driving the machine out of memory
        limit = int(args["memory_limit_gb"] * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    plans, dataset_json = _measured_plans(args)
    device, warmup = args["device"], args["warmup"]
    batches = torch.load(args["batches"], weights_only=True)
    if mode == "inference":
        return _inference(plans, dataset_json, args)
    name, _, stage = mode.partition(STAGE_SEPARATOR)
    configuration = args["configuration"]
    if name in EVERY_CHANNEL_TRAINERS:
        configuration = plans["configurations"][configuration]["inherits_from"]
    # the teacher's forward is timed through a distilling trainer, which builds it as training does
    trainer = _trainer(distilling_trainers()[0] if mode == "teacher" else name, plans, configuration, dataset_json,
                       device, args["teacher_checkpoint"], args.get("precision", "float32"),
                       args.get("compile", "nnunet"))
    if name == "LCKDTrainer":  # the stage is fixed, whatever the configuration's schedule would say at epoch 0
        trainer.settings = {**trainer.settings, "full_modality_fraction": 0.0 if stage == "subsets" else 1.0}
    if name == "LCKDTrainer":  # both stages distil (kd_from_start, the authors' schedule)
        torch.manual_seed(0)  # the same subsets in every run
        trainer.teachers = [trainer.num_modalities - 1, 1, 1]
    teacher = getattr(trainer, "teacher", None)
    student_before, teacher_before = _weights(trainer.network), teacher and _weights(teacher.network)
    seconds, loss_terms, loss_seconds, skipped_steps = [], [], {"step": 0}, 0
    scaler = trainer.grad_scaler if mode != "teacher" else None
    if mode != "teacher":
        _time_loss_functions(trainer, device, loss_seconds)
    for index, batch in enumerate(batches):
        loss_seconds["step"] = index
        _synchronize(device)
        start = time.perf_counter()
        if mode == "teacher":  # as a distilling step runs it, under the step's autocast
            teacher_logits_dtype = str(teacher_forward(trainer, batch)[0].dtype)
        else:
            scale = scaler and scaler.get_scale()
            loss_terms.append({k: float(v) for k, v in trainer.train_step(batch).items()})
            # GradScaler skips a step whose gradients are not finite and lowers its scale: the student did not
            # change at that step (on CUDA, where the scale starts high, the first steps of a run often are skipped)
            if scaler is not None and scaler.get_scale() < scale:
                skipped_steps += 1
        _synchronize(device)
        if index >= warmup:
            seconds.append(time.perf_counter() - start)
    # what was measured worked: every step's loss terms, the student learnt, a teacher stayed frozen
    checks = {"loss_terms": loss_terms, "student_changed": not _same_weights(student_before, _weights(trainer.network)),
              "teacher_unchanged": None if teacher is None
                                   else _same_weights(teacher_before, _weights(teacher.network)),
              "compiled": hasattr(trainer.network, "_orig_mod"), "gradient_norms": trainer._gradient_norms,
              "scaler_skipped_steps": None if scaler is None else skipped_steps,
              **({"logits_dtype": teacher_logits_dtype} if mode == "teacher" else {})}
    loss_forward = {name: float(np.median([per_step.get(i, 0.0) for i in range(warmup, len(batches))]))
                    for name, per_step in loss_seconds.items() if name != "step"}
    peak_memory_mb = _peak_memory_mb(device)  # of the measured steps, before the paired rounds run three things
    limits = {}
    if name in distilling_trainers():
        limits["teacher_memory"] = teacher_memory(trainer, batches[0])
        if args.get("paired_rounds"):
            limits["paired_limit"] = paired_limit(trainer, batches[warmup:] or batches, args["paired_rounds"], device)
    return {**_statistics(seconds), "peak_memory_mb": peak_memory_mb, "loss_forward_s": loss_forward, **checks,
            **limits}


def _inference(plans: dict, dataset_json: dict, args: dict) -> dict:
    """Sliding-window prediction of a few preprocessed cases (student channel) by the student's network and by
    a plain nnU-Net network with the same weights, after one untimed prediction by each, alternating to share the
    machine's state fairly."""
    configuration = args["configuration"]
    modality = StudentModality.of_configuration(plans, configuration, dataset_json)
    plans_manager = PlansManager(modality.single_channel_plans(plans))
    configuration_manager = plans_manager.get_configuration(configuration)
    heads = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    student = build_checked_network(plans_manager, configuration_manager, 1, heads, False)
    plain = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, 1, heads, False)
    plain.load_state_dict(student.state_dict())
    folder = os.path.join(str(nnunet_paths.nnUNet_preprocessed), plans["dataset_name"],
                          configuration_manager.data_identifier)
    dataset_class = modality.dataset_class(infer_dataset_class(folder))
    identifiers = dataset_class.get_identifiers(folder)[:args["inference_cases"]]
    dataset = dataset_class(folder, identifiers)
    times = {"student": [], "plain": []}

    def predicted_in_seconds(network, data) -> float:
        predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device(args["device"]),
                                    perform_everything_on_device=args["device"].startswith("cuda"),
                                    verbose=False, allow_tqdm=False)
        predictor.manual_initialization(network.to(args["device"]).eval(), plans_manager, configuration_manager,
                                        None, modality.single_channel_dataset_json(dataset_json), "benchmark", None)
        return _timed(args["device"], predictor.predict_sliding_window_return_logits, data)[1]

    for index, identifier in enumerate(identifiers):
        data = torch.from_numpy(np.ascontiguousarray(dataset.load_case(identifier)[0][:])).float()
        if index == 0:  # untimed: the first prediction pays for CUDA's start (cuDNN's algorithm search, the
            for network in (student, plain):  # allocator), measured x10.8 for whichever network came first
                predicted_in_seconds(network, data)
        for name, network in (("student", student), ("plain", plain)) if index % 2 == 0 \
                else (("plain", plain), ("student", student)):
            times[name].append(predicted_in_seconds(network, data))
    student_median, plain_median = np.median(times["student"]), np.median(times["plain"])
    return {"student_median_s": float(student_median), "plain_median_s": float(plain_median),
            "ratio": float(student_median / plain_median), "cases": len(identifiers)}


def cache_batches(args: dict, count: int) -> None:
    """`count` batches from nnU-Net's training data loader (single-threaded, so the cache itself is cheap)."""
    seed_everything(0)  # the same batches and initial weights in every run
    plans, dataset_json = _measured_plans(args)
    trainer = _trainer(BASELINE.trainer, plans, args["configuration"], dataset_json, args["device"],
                       args["teacher_checkpoint"])
    loader, _ = trainer.get_dataloaders()
    batches = [next(loader) for _ in range(count)]
    torch.save([{"data": b["data"], "target": b["target"]} for b in batches], args["batches"])


def run_benchmark(dataset: str, configuration: str, teacher_checkpoint: str, device: str = "cpu",
                  steps: int = 20, warmup: int = 3, plans: str = "nnUNetPlans", inference_cases: int = 3,
                  precision: str = "float32", compile_network: str = "nnunet", trainers=None,
                  memory_limit_gb: float = None, patch_size=None, paired_rounds: int = None,
                  cpu_allocator: str = "system", log=print, on_result=None) -> dict:
    """Measures `trainers` (default: every mode, TRAINERS and the teacher's forward and inference, MODES).
    paired_rounds: rounds of each distilling trainer's paired_limit (default: `steps`; 0: none).
    cpu_allocator: "system" (glibc's malloc as it comes) or "retain" (CPU_ALLOCATORS) in the measuring processes.

    on_result(report) is called after each mode with the report so far ("complete": False until the last), so
    that a run that is stopped or cut off by a time limit keeps what it measured."""
    paired_rounds = steps if paired_rounds is None else paired_rounds
    if steps < 1 or warmup < 0 or inference_cases < 1 or paired_rounds < 0:
        raise ConfigurationError(f"--steps must be at least 1 (got {steps}), --warmup at least 0 (got {warmup}), "
                                 f"--inference-cases at least 1 (got {inference_cases}) and --paired-rounds at "
                                 f"least 0 (got {paired_rounds})")
    modes = tuple(trainers or MODES)
    unknown = [t for t in modes if t not in MODES]
    if unknown:
        raise ConfigurationError(f"unknown trainer(s) {unknown}: the benchmark measures {', '.join(MODES)}")
    allocator = allocator_environment(cpu_allocator, device)
    teacher_checkpoint = os.path.abspath(teacher_checkpoint)
    if not os.path.isfile(teacher_checkpoint):
        raise ConfigurationError(f"teacher checkpoint {teacher_checkpoint} does not exist")
    with tempfile.TemporaryDirectory(prefix="protokd_benchmark_") as scratch:
        env = dict(os.environ, nnUNet_results=scratch, nnUNet_n_proc_DA="0", **allocator)
        args = {"dataset": dataset, "plans": plans, "configuration": configuration, "device": device,
                "teacher_checkpoint": teacher_checkpoint, "warmup": warmup,
                "batches": os.path.join(scratch, "batches.pt"), "inference_cases": inference_cases,
                "precision": precision, "compile": compile_network, "memory_limit_gb": memory_limit_gb,
                "patch_size": list(patch_size) if patch_size else None, "paired_rounds": paired_rounds}
        _measured_plans(args)  # a patch size the networks cannot take stops here, with its reason
        log(f"caching {steps + warmup} batches from nnU-Net's data loader")
        _in_subprocess(["cache", json.dumps({**args, "count": steps + warmup})], env)
        results = {}

        def report() -> dict:
            base = results.get(BASELINE.trainer)
            for mode in (m for m in results if m in TRAINERS):
                if base and "error" not in base and "error" not in results[mode]:
                    results[mode]["step_ratio"] = results[mode]["median_s"] / base["median_s"]
                    results[mode]["memory_ratio"] = results[mode]["peak_memory_mb"] / base["peak_memory_mb"]
            add_limits(results)
            return {"dataset": dataset, "configuration": configuration, "device": device, "steps": steps,
                    "warmup": warmup,
                    "precision": precision if device == "cpu" else "nnU-Net's CUDA autocast (float16)",
                    "compile": compile_network, "patch_size": patch_size and list(patch_size),
                    "cpu_allocator": cpu_allocator if device == "cpu" else None,
                    "paired_rounds": paired_rounds,
                    "batches": "cached: drawn once from nnU-Net's training data loader, the same for every trainer; "
                               "data loading is not in the measured step",
                    "torch": torch.__version__, "complete": len(results) == len(modes), "results": results}

        for mode in modes:
            log(f"measuring {mode}")
            try:
                results[mode] = _in_subprocess(["worker", mode, json.dumps(args)], env)
            except RuntimeError as exc:  # e.g. did not fit in memory: a result, and the others still run
                results[mode] = {"error": str(exc).strip().splitlines()[-1]}
                log(f"{mode} failed: {results[mode]['error']}")
            if on_result is not None:
                on_result(report())
    return report()


def add_limits(results: dict) -> None:
    """For each distilling trainer measured with the unimodal step: memory_limit_mb (the unimodal peak plus what
    the step holds of its teacher: weights and the forward's kept outputs, teacher_memory) and memory_limit_ratio;
    with the teacher's forward measured too: limit_s (the unimodal step + the teacher's forward, the least a step
    that trains the student and runs the teacher can cost), the overhead beyond it as a ratio (median / limit) and
    in percent, and the share of the step spent in its loss terms' forward passes. (The trainer's own
    paired_limit, measured in its process, needs nothing from the others.)"""
    base, teacher = results.get(BASELINE.trainer), results.get("teacher")
    if not base or "error" in base:
        return
    limit = None if not teacher or "error" in teacher else base["median_s"] + teacher["median_s"]
    for mode in distilling_trainers():
        row = results.get(mode)
        if not row or "error" in row:
            continue
        if "teacher_memory" in row:
            row["memory_limit_mb"] = (base["peak_memory_mb"] + row["teacher_memory"]["weights_mb"]
                                      + row["teacher_memory"]["kept_mb"])
            row["memory_limit_ratio"] = row["peak_memory_mb"] / row["memory_limit_mb"]
        if limit is not None:
            row["limit_s"] = limit
            row["limit_ratio"] = row["median_s"] / limit
            row["overhead_percent"] = 100.0 * (row["median_s"] - limit) / limit
            row["loss_forward_share"] = sum(row.get("loss_forward_s", {}).values()) / row["median_s"]


def _in_subprocess(arguments: list, env: dict) -> dict:
    """Runs this module with `arguments` in a new Python process (a trainer's own peak memory, a clean state) and
    returns the JSON it prints last."""
    completed = subprocess.run([sys.executable, "-m", "nnunet_protokd.protocol.benchmark", *arguments], env=env,
                               capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark process {arguments[:2]} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def format_table(report: dict) -> str:
    r = report["results"]
    nan = float("nan")
    lines = [f"{'':<24}{'median s/step':>14}{'IQR':>10}{'peak MB':>10}{'x step':>8}{'x memory':>10}{'limit s':>9}"
             f"{'x limit':>9}{'over %':>8}{'x paired':>10}{'95% CI':>14}{'p below':>9}{'x mem limit':>12}"
             f"  loss terms' forward s"]
    for mode in [m for m in TRAINERS + ("teacher",) if m in r]:
        row = r[mode]
        if "error" in row:
            lines.append(f"{mode:<24}failed: {row['error']}")
            continue
        terms = ", ".join(f"{name} {s:.4f}" for name, s in row.get("loss_forward_s", {}).items())
        paired = row.get("paired_limit", {})
        interval = paired.get("limit_ratio_ci95", "")  # absent from reports older than the interval
        interval = "too few" if interval is None else "-".join(f"{bound:.3f}" for bound in interval)
        lines.append(f"{mode:<24}{row['median_s']:>14.4f}{row['iqr_s']:>10.4f}{row['peak_memory_mb']:>10.0f}"
                     f"{row.get('step_ratio', nan):>8.2f}{row.get('memory_ratio', nan):>10.2f}"
                     f"{row.get('limit_s', nan):>9.4f}{row.get('limit_ratio', nan):>9.3f}"
                     f"{row.get('overhead_percent', nan):>8.1f}"
                     f"{paired.get('limit_ratio', nan):>10.3f}{interval:>14}{paired.get('below_bound_p', nan):>9.3f}"
                     f"{row.get('memory_limit_ratio', nan):>12.3f}  {terms}")
    if any("limit_s" in row for row in r.values()):
        lines.append("limit = UnimodalTrainer's step + the teacher's forward (no gradient), measured in this run")
    if any("paired_limit" in row for row in r.values()):
        lines.append("x paired = the trainer's step / (its student's unimodal step + its teacher's forward), median "
                     "over rounds on the same batch in its own process; its 95 % confidence interval (order "
                     f"statistics, 6 rounds or more) and the sign test's p that it is below {LIMIT_BOUND}")
    if report.get("cpu_allocator") == "retain":
        lines.append("peak MB under --cpu-allocator retain: what the allocator held, freed blocks included (a step's "
                     "needs: --cpu-allocator system)")
    if any("memory_limit_mb" in row for row in r.values()):
        lines.append("x mem limit = the trainer's peak / (UnimodalTrainer's peak + its teacher's weights and the "
                     "outputs its forward keeps for the losses)")
    i = r.get("inference")
    if i is None:
        return "\n".join(lines)
    if "error" in i:
        return "\n".join(lines + [f"inference failed: {i['error']}"])
    lines.append(f"inference (sliding window, {i['cases']} cases): student {i['student_median_s']:.3f} s, plain "
                 f"nnU-Net {i['plain_median_s']:.3f} s, x{i['ratio']:.3f}")
    return "\n".join(lines)


def measure(arguments: list) -> dict:
    """What one measuring process does with the arguments _in_subprocess gives it: ["cache", OPTIONS] caches the
    batches, ["worker", MODE, OPTIONS] measures one mode."""
    if arguments[0] == "cache":
        options = json.loads(arguments[1])
        cache_batches(options, options["count"])
        return {}
    return worker(arguments[1], json.loads(arguments[2]))


if __name__ == "__main__":  # the per-trainer processes
    print(json.dumps(measure(sys.argv[1:])))
