"""`experiment --workflow DIR`: the protocol's steps as a Snakemake workflow, for a cluster or a big machine.

One rule per step of `Experiment.steps()` (the list `experiment` runs): its command as the shell command, the
files the step reads and writes as input and output, so that Snakemake runs every fold, modality and method in
parallel where the dependencies allow (preprocessing and the cross-validation split first, each fold's teacher
before that fold's students, the report last) and a rerun resumes from what exists. A training's job (and the
planning's) is `experiment --step NAME` (through_runner): it holds the model folder's lock as `experiment` does and
adds nnU-Net's `--c` only when checkpoint_latest.pth exists (a retry after a time limit continues; a lone
checkpoint_best.pth is never continued from). Resources per step kind live in DIR/config.yaml.

Files: DIR/Snakefile (generated: regenerate rather than edit), DIR/config.yaml (resources and retries per kind of
step: edit freely, never overwritten), DIR/slurm/config.yaml (an example SLURM profile); per job a log in
<output>/logs/<step>.log and Snakemake's benchmark (wall time, memory) in <output>/benchmarks/<step>.tsv, which
the report's run information reads.
"""
from __future__ import annotations

import importlib.util
import os
import shlex

from nnunet_protokd.io import write_text_atomically
from nnunet_protokd.protocol.experiment import STEP_RESOURCES, Experiment, ExperimentSettings, Step

MISSING_SNAKEMAKE = "the workflow needs Snakemake: pip install 'nnunet-protokd[cluster]' (snakemake and its SLURM " \
                    "executor plugin)"

SLURM_PROFILE = """\
# An example SLURM profile: cd {folder} && snakemake --workflow-profile slurm
# (resources per kind of step come from {config}; Snakemake's slurm executor turns them into sbatch options:
# threads -> --cpus-per-task, mem_mb -> --mem, runtime (minutes) -> -t, gpu -> --gpus)
executor: slurm
jobs: 20                      # SLURM jobs queued or running at a time
latency-wait: 60              # seconds to wait for a job's files to appear on a shared file system
# retries per kind of step are in {config}; a retried training continues from checkpoint_latest.pth
rerun-incomplete: true
keep-going: true              # other folds and methods go on when one job fails
default-resources:
  slurm_partition: gpu        # your cluster's partition (and slurm_account: ... if it needs one)
slurm-logdir: {slurm_logs}  # sbatch's own output of each job (the command's output: <output>/logs/<step>.log)
slurm-keep-successful-logs: true
# without slurmdbd (sacct disabled) query job states with squeue instead:
# slurm-status-command: squeue
"""


def snakemake_available() -> bool:
    return importlib.util.find_spec("snakemake") is not None


def log_file(experiment: Experiment, step: Step) -> str:
    return os.path.join(experiment.settings.output_folder, "logs", f"{step.name}.log")


def _literal(*words) -> str:
    """Shell words for Snakemake's shell directive, which formats the string: braces doubled."""
    return shlex.join(words).replace("{", "{{").replace("}", "}}")


def through_runner(step: Step) -> bool:
    """A step whose job is `experiment --step NAME`, run as `experiment` runs it: a training (under the model folder's
    lock, so that a second job, a rerun or an `experiment` on the same folders is refused while it trains; --c only
    when checkpoint_latest.pth exists and is whole) and the planning (in the environment nnU-Net's planner needs)."""
    return bool(step.continue_from) or step.environment is not None


def _shell(experiment: Experiment, step: Step, log: str) -> str:
    """The step's command, its output going to the log."""
    command = experiment.step_command(step.name) if through_runner(step) else step.command
    return _literal(*command) + f" > {_literal(log)} 2>&1"


def _rule(experiment: Experiment, step: Step) -> str:
    resources = f'R["{step.kind}"]'
    inputs = [repr(f) for f in step.inputs] + [f"ancient({f!r})" for f in step.after]
    outputs = [f"touch({f!r})" if step.markers else repr(f) for f in step.outputs]
    outputs += [f"directory({f!r})" for f in step.output_folders]
    lines = [f"rule {step.name}:", f"    # {step.title}"]
    if through_runner(step):  # what the job's `--step` runs, for a reader of the Snakefile
        resumes = " (with --c to continue)" if step.continue_from else ""
        lines.append(f"    # runs: {shlex.join(step.command)}{resumes}")
    if inputs:
        lines.append(f"    input: {', '.join(inputs)}")
    lines += [f"    output: {', '.join(outputs)}",
              f"    log: {log_file(experiment, step)!r}",
              f"    benchmark: {experiment.benchmark_file(step.name)!r}",
              f"    threads: {resources}['threads']",
              f"    resources: mem_mb={resources}['mem_mb'], runtime={resources}['runtime'], gpu={resources}['gpu']",
              f"    retries: {resources}['retries']",
              f"    shell: {_shell(experiment, step, log_file(experiment, step))!r}"]
    return "\n".join(lines)


def snakefile_text(experiment: Experiment, steps: list, folder: str) -> str:
    environment = {k: v for k, v in sorted(os.environ.items()) if k.startswith("nnUNet_")}
    targets = [f for step in steps if not step.markers for f in step.outputs + step.output_folders]
    small = [step.name for step in steps if step.kind == "small"]
    header = f"""\
# The Table-1 protocol of nnunet-protokd as a Snakemake workflow: one rule per step of `experiment`.
# Written by: nnunet-protokd experiment {shlex.join(experiment.settings.arguments())} --workflow {folder}
# Regenerate it with that command rather than editing it; resources and retries are in config.yaml.
#   local:  cd {folder} && snakemake --cores N
#   SLURM:  cd {folder} && snakemake --workflow-profile slurm
import os

configfile: {os.path.join(folder, 'config.yaml')!r}
R = config["resources"]  # per kind of step
workdir: {folder!r}
# nnU-Net's folders and settings when the workflow was written; every job (also on a cluster node) gets them
os.environ.update({environment!r})

localrules: {', '.join(small)}

rule all:
    input: {', '.join(repr(f) for f in targets)}
    default_target: True
"""
    return header + "\n\n" + "\n\n".join(_rule(experiment, step) for step in steps) + "\n"


def config_text() -> str:
    lines = ["# Resources of each kind of step, read by the Snakefile: threads (SLURM --cpus-per-task), mem_mb,",
             "# runtime (minutes), gpu (GPUs per job), retries (a retried training continues from",
             "# checkpoint_latest.pth). Defaults: nnU-Net's 3d_fullres on one GPU.", "resources:"]
    for kind, values in STEP_RESOURCES.items():
        lines.append(f"  {kind}: {{{', '.join(f'{k}: {v}' for k, v in values.items())}}}")
    return "\n".join(lines) + "\n"


def write_workflow(settings: ExperimentSettings, folder: str, log=print) -> str:
    """Writes folder/Snakefile, folder/config.yaml and folder/slurm/config.yaml (those two kept if present);
    returns the Snakefile's path. A Snakefile of another protocol is never replaced."""
    if not snakemake_available():  # first: a user without it learns what to install before anything else
        raise ValueError(MISSING_SNAKEMAKE)
    experiment = Experiment(settings)
    folder = os.path.abspath(folder)
    snakefile = os.path.join(folder, "Snakefile")
    steps = experiment.steps()
    text = snakefile_text(experiment, steps, folder)
    if os.path.isfile(snakefile):
        with open(snakefile) as f:
            if f.read() != text:
                raise ValueError(f"{snakefile} exists and describes another protocol or other folders: remove it "
                                 f"(and {os.path.join(folder, '.snakemake')}) or choose another folder")
    os.makedirs(os.path.join(folder, "slurm"), exist_ok=True)
    files = {snakefile: text, os.path.join(folder, "config.yaml"): config_text(),
             os.path.join(folder, "slurm", "config.yaml"): SLURM_PROFILE.format(
                 folder=folder, config=os.path.join(folder, "config.yaml"),
                 slurm_logs=os.path.join(folder, "slurm_logs"))}
    for path, content in files.items():
        if not os.path.exists(path):
            write_text_atomically(content, path)
    log(f"wrote {snakefile} ({len(steps)} rules, one per step), {os.path.join(folder, 'config.yaml')} "
        f"(resources) and {os.path.join(folder, 'slurm', 'config.yaml')} (an example SLURM profile)\n"
        f"  run here:      cd {folder} && snakemake --cores N\n"
        f"  run on SLURM:  cd {folder} && snakemake --workflow-profile slurm")
    return snakefile
