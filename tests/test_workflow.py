"""`experiment --workflow`: the protocol's steps as a Snakemake workflow, run by the real Snakemake on tiny phantoms
(teacher, unimodal and ProtoKD students of T1ce, one epoch of two iterations each; about 3.5 minutes of CPU),
locally and, where a SLURM controller answers (tests/slurm/start_local_slurm.sh starts one), through SLURM."""
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from unittest import mock

import pytest
from conftest import BIN, REPO, assert_same_training_data, copy_phantoms, nnunet_environment, run
from test_experiment import workspace  # noqa: F401  (a raw dataset with a held-out set, nothing trained)

pytest.importorskip("snakemake", reason="the workflow tests need the extra [cluster] (pip install -e '.[cluster]')")

PROTOCOL = ["-d", "501", "--modalities", "T1ce", "--methods", "unimodal", "protokd", "--epochs", "1",
            "--iterations-per-epoch", "2", "--val-iterations-per-epoch", "1", "--no-final-validation",
            "--device", "cpu", "-np", "1"]
DATASET = "Dataset501_BraTS2018"
STUDENT = "ProtoKDTrainer__nnUNetPlans__3d_fullres_1ep_2it_1val_nofv_T1ce"
# what this CPU affords: one core per job, no GPU, one retry
SMALL_RESOURCES = "resources:\n" + "".join(
    f"  {kind}: {{threads: 1, mem_mb: 2000, runtime: 20, gpu: 0, retries: 1}}\n"
    for kind in ("preprocess", "small", "train", "predict", "report"))


def workflow_folder(root: Path, phantom_folder: Path, preprocessed_phantoms: Path) -> Path:
    """The phantoms converted into nnUNet_raw under root (with nnU-Net's fingerprint of them, which its planning
    reuses), and the protocol written as a workflow in root/workflow."""
    env = nnunet_environment(root)
    env.update(nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1", OMP_NUM_THREADS="1")
    run([BIN / "python", REPO / "dataset_conversion" / "convert_brats2018.py", phantom_folder, "501"], env)
    assert_same_training_data(root / "nnUNet_raw" / "Dataset501_BraTS2018", preprocessed_phantoms)
    copy_phantoms(preprocessed_phantoms, root, "fingerprint")
    run([BIN / "nnunet-protokd", "experiment", *PROTOCOL, "-o", root / "experiment", "--workflow", root / "workflow"],
        env)
    (root / "workflow" / "config.yaml").write_text(SMALL_RESOURCES)
    return root / "workflow"


def snakemake(folder: Path, *arguments, timeout=1500, expect_success=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}  # the Snakefile sets them itself
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return run([BIN / "snakemake", "-s", folder / "Snakefile", "-d", folder, *arguments], env, timeout=timeout,
               expect_success=expect_success)


def planned_jobs(dry_run_output: str) -> dict:
    """{rule: count} from the job-stats table that `snakemake -n` prints."""
    table = dry_run_output.split("Job stats:")[1].split("total")[0]
    return {name: int(count) for name, count in re.findall(r"^(\w+)\s+(\d+)$", table, re.M) if name != "job"}


def experiment_of(root: Path):
    """The Experiment that `experiment` builds from the same arguments."""
    from nnunet_protokd.cli import build_parser
    from nnunet_protokd.commands import experiment_settings
    from nnunet_protokd.protocol.experiment import Experiment
    folders = {k: str(root / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    with mock.patch.dict(os.environ, folders):
        return Experiment(experiment_settings(build_parser().parse_args(
            ["experiment", *PROTOCOL, "-o", str(root / "experiment")])))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, phantom_folder, preprocessed_phantoms):
    root = tmp_path_factory.mktemp("workflow")
    folder = workflow_folder(root, phantom_folder, preprocessed_phantoms)
    planned = snakemake(folder, "-n", "-p").stdout
    completed = snakemake(folder, "--cores", "2")
    return root, folder, planned, completed.stdout + completed.stderr


def test_one_rule_per_step_of_the_experiment_with_its_command(local_run):
    from nnunet_protokd.protocol.workflow import through_runner
    root, folder, planned, _ = local_run
    steps = experiment_of(root).steps()
    assert planned_jobs(planned) == {**{step.name: 1 for step in steps}, "all": 1}
    experiment = experiment_of(root)
    for step in steps:  # the shell command Snakemake would run is the step's own; training and planning via --step
        expected = experiment.step_command(step.name) if through_runner(step) else step.command
        assert shlex.join(expected) in planned, step.name
    snakefile = (folder / "Snakefile").read_text()
    student = f"train_{STUDENT.split('__')[0]}_{STUDENT.split('__')[2]}_fold_0"
    rule = snakefile.split(f"rule {student}:")[1].split("\nrule ")[0]
    teacher = root / "nnUNet_results" / DATASET / "ProtoKDTeacherTrainer__nnUNetPlans__3d_fullres_1ep_2it_1val_nofv"
    assert str(teacher / "fold_0" / "checkpoint_final.pth") in rule.split("output:")[0]  # after its fold's teacher
    assert "splits_final.json" in rule.split("output:")[0]  # after the split, hence after preprocessing
    assert shlex.join(experiment.step_command(student)) in rule  # the lock and --c as `experiment` does them
    assert f"# runs: {shlex.join(next(s for s in steps if s.name == student).command)}" in rule


def test_local_run_writes_the_report_of_experiment(local_run):
    root, _, _, output = local_run
    report = root / "experiment" / "report"
    assert {"report.md", "summary.json", "dice.png", "overlays.png"} <= {p.name for p in report.iterdir()}
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary["results"]) == {p.key for p in experiment_of(root).prediction_sets()}
    assert set(summary["results"]) == {"teacher", "unimodal:T1ce", "protokd:T1ce"}
    assert summary["n_cases"] == 1  # fold 0's validation case of five phantoms
    times = summary["run"]["wall_time_seconds"]  # Snakemake's benchmark of every job before the report
    assert times["train ProtoKDTrainer 3d_fullres_1ep_2it_1val_nofv_T1ce fold 0"] > 0
    assert (root / "experiment" / "logs" / "plan_and_preprocess.log").stat().st_size > 0
    assert "| T1ce | ProtoKD |" in (report / "report.md").read_text()


def test_second_run_does_nothing_and_a_deleted_checkpoint_retrains_that_student_only(local_run):
    """Snakemake's own plan (`-n`) after deleting a student's final checkpoint: that training, its predictions and
    the report; nothing else. The job adds --c only if checkpoint_latest.pth exists: here it does not, as after
    any finished nnU-Net training, so it trains anew instead of continuing from checkpoint_best.pth."""
    root, folder, _, _ = local_run
    assert "Nothing to be done" in snakemake(folder, "-n").stdout
    student = root / "nnUNet_results" / DATASET / STUDENT / "fold_0"
    (student / "checkpoint_final.pth").unlink()
    assert (student / "checkpoint_best.pth").is_file() and not (student / "checkpoint_latest.pth").exists()
    name = f"{STUDENT.split('__')[0]}_{STUDENT.split('__')[2]}_fold_0"
    assert planned_jobs(snakemake(folder, "-n").stdout) == {f"train_{name}": 1, f"predict_{name}": 1, "report": 1,
                                                            "all": 1}


def test_a_training_job_is_refused_while_its_model_folder_is_locked_then_trains(local_run):
    """A job of the workflow and an `experiment` (or another job) on the same model folder never train it at once:
    the job holds the folder's lock as `experiment` does. Here this process holds it: the job fails, naming the
    lock, and leaves the folder as it was; once it is released, the same command trains the student."""
    from nnunet_protokd.io import held_exclusively
    from nnunet_protokd.protocol.experiment import TRAINING_LOCK
    root, folder, _, _ = local_run
    student = root / "nnUNet_results" / DATASET / STUDENT / "fold_0"
    (student / "checkpoint_final.pth").unlink(missing_ok=True)  # as the test before leaves it
    before = sorted(p.name for p in student.iterdir())
    with held_exclusively(str(student / TRAINING_LOCK), "the model folder"):
        refused = snakemake(folder, "--cores", "1", "--retries", "0", expect_success=False)
    assert refused.returncode != 0
    name = f"train_{STUDENT.split('__')[0]}_{STUDENT.split('__')[2]}_fold_0"
    job_log = (root / "experiment" / "logs" / f"{name}.log").read_text()
    assert "is in use by" in job_log and TRAINING_LOCK in job_log, job_log[-2000:]
    assert sorted(p.name for p in student.iterdir()) == before
    assert snakemake(folder, "--cores", "1").returncode == 0
    assert (student / "checkpoint_final.pth").is_file() and not (student / TRAINING_LOCK).exists()


def test_workflow_is_rewritten_only_for_the_same_protocol(workspace):  # noqa: F811
    env = nnunet_environment(workspace)
    command = [BIN / "nnunet-protokd", "experiment", "-d", "777", "--modalities", "T1ce", "--device", "cpu",
               "-o", workspace / "experiment", "--workflow", workspace / "workflow"]
    printed = run(command, env).stdout
    assert f"cd {workspace / 'workflow'} && snakemake --cores N" in printed
    snakefile = (workspace / "workflow" / "Snakefile").read_text()
    (workspace / "workflow" / "config.yaml").write_text(SMALL_RESOURCES)  # the user's resources
    run(command, env)
    assert (workspace / "workflow" / "Snakefile").read_text() == snakefile
    assert (workspace / "workflow" / "config.yaml").read_text() == SMALL_RESOURCES
    other = run(command + ["--folds", "0", "1"], env, expect_success=False)
    assert other.returncode == 1 and other.stderr.startswith(
        f"error: {workspace / 'workflow' / 'Snakefile'} exists and describes another protocol")
    assert (workspace / "workflow" / "Snakefile").read_text() == snakefile


def slurm_unavailable() -> str:
    """Why the SLURM test cannot run here ("" if it can)."""
    if shutil.which("sbatch") is None:
        return "no sbatch here (tests/slurm/start_local_slurm.sh starts a one-node SLURM on a Debian machine)"
    try:
        answered = subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        answered = False
    return "" if answered else "sbatch is installed but no SLURM controller answers (sinfo failed)"


SLURM_UNAVAILABLE = slurm_unavailable()


@pytest.mark.skipif(bool(SLURM_UNAVAILABLE), reason=SLURM_UNAVAILABLE)
def test_workflow_runs_through_slurm(tmp_path, phantom_folder, preprocessed_phantoms):
    folder = workflow_folder(tmp_path, phantom_folder, preprocessed_phantoms)
    completed = snakemake(folder, "--executor", "slurm", "--jobs", "2", "--slurm-status-command", "squeue",
                          "--slurm-no-account", "--slurm-init-seconds-before-status-checks", "5",
                          "--slurm-keep-successful-logs", "--latency-wait", "10", timeout=1800)
    output = completed.stdout + completed.stderr
    submitted = set(re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", output))
    steps = experiment_of(tmp_path).steps()
    cluster_steps = [step for step in steps if step.kind != "small"]  # small steps run on the submitting host
    assert len(submitted) == len(cluster_steps)
    assert (tmp_path / "experiment" / "report" / "report.md").is_file()
    assert "Nothing to be done" in snakemake(folder, "-n").stdout
