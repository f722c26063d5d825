"""Stopping: a stopped `experiment` leaves no training behind, and a model folder that a live process trains is never
trained a second time (protocol/running.py, io.held_exclusively, Experiment.training_lock)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
from conftest import BIN, copy_phantoms, nnunet_environment, run

from nnunet_protokd.cli import main
from nnunet_protokd.errors import UserError
from nnunet_protokd.io import held_exclusively, load_checkpoint_weights_only
from nnunet_protokd.protocol import experiment as experiment_module
from nnunet_protokd.protocol.running import run_command

EPOCHS = 3
CONFIGURATION = f"3d_fullres_{EPOCHS}ep_2it_1val_nofv"
TEACHER_STEP = f"train_ProtoKDTeacherTrainer_{CONFIGURATION}_fold_0"
EXPERIMENT = ["-d", "501", "-c", "3d_fullres", "--methods", "unimodal", "--modalities", "T1ce", "--epochs", str(EPOCHS),
              "--iterations-per-epoch", "2", "--val-iterations-per-epoch", "1", "--no-final-validation",
              "--device", "cpu"]


def ended_process() -> int:
    """The id of a process of this host that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_a_live_owners_lock_is_refused_naming_it_and_a_stale_one_is_taken_over(tmp_path):
    lock = tmp_path / ".training.lock"
    with held_exclusively(str(lock), "the model folder X"):
        recorded = json.loads(lock.read_text())
        assert recorded["host"] == socket.gethostname()
        # flock's lock belongs to the open file: a second claim, even from this process, finds it held
        with pytest.raises(UserError) as refused:
            with held_exclusively(str(lock), "the model folder X"):
                pass
        assert f"the model folder X is in use by process {recorded['pid']} on {socket.gethostname()}" \
               f" (lock file {lock})" in str(refused.value)
    assert not lock.exists()

    gone = ended_process()
    lock.write_text(json.dumps({"pid": gone, "host": socket.gethostname()}))
    lines = []
    with held_exclusively(str(lock), "the model folder X", log=lines.append):
        assert json.loads(lock.read_text())["pid"] != gone
    assert lines == [f"taking over {lock}, left by process {gone} on {socket.gethostname()} that has ended"]
    assert not lock.exists()

    # another host's process cannot be checked from here: refused, saying when to delete the file
    lock.write_text(json.dumps({"pid": gone, "host": "elsewhere.example"}))
    with pytest.raises(UserError, match=f"process {gone} on elsewhere.example .*delete {lock}"):
        with held_exclusively(str(lock), "the model folder X"):
            pass
    assert lock.exists()


def test_a_stopped_runner_stops_its_command_and_everything_the_command_started(tmp_path):
    """SIGTERM to the runner reaches the child's whole process group (a background grandchild too); the runner exits
    with 128 + the signal."""
    marker = tmp_path / "started"
    started = []

    def stop_when_started():
        while not marker.exists():
            time.sleep(0.05)
        # only the command's own processes: an earlier test in this xdist worker may have left a child process of
        # its own running (CI saw a `python` one), which is not the runner's to stop
        command = [child for child in psutil.Process().children() if str(marker) in " ".join(child.cmdline())]
        started.extend(command + [grandchild for child in command for grandchild in child.children(recursive=True)])
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the main thread, inside run_command

    threading.Thread(target=stop_when_started, daemon=True).start()
    with pytest.raises(SystemExit) as stopped:
        run_command(["sh", "-c", f"sleep 60 & touch {marker}; sleep 60"])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert len(started) == 3  # sh and its two sleeps
    gone, alive = psutil.wait_procs(started, timeout=5)
    assert not alive


def epoch_started(fold, epoch: int) -> bool:
    """Whether nnU-Net's training log in `fold` says that `epoch` has started."""
    return any(re.search(rf"Epoch {epoch} *$", log.read_text(), re.M) for log in fold.glob("training_log_*.txt"))


def trainings_of(results) -> list:
    """nnUNetv2_train processes (and their workers) writing into `results`."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any("nnUNetv2_train" in word for word in process.info["cmdline"] or []) and \
                    process.environ().get("nnUNet_results") == str(results) and \
                    process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_a_stopped_experiment_leaves_no_training_and_the_rerun_continues_it_once(preprocessed_phantoms, tmp_path):
    copy_phantoms(preprocessed_phantoms, tmp_path)
    env = nnunet_environment(tmp_path)
    results = tmp_path / "nnUNet_results"
    fold = results / "Dataset501_BraTS2018" / f"ProtoKDTeacherTrainer__nnUNetPlans__{CONFIGURATION}" / "fold_0"
    experiment = subprocess.Popen([str(BIN / "nnunet-protokd"), "experiment", *EXPERIMENT, "-o", str(tmp_path / "e")],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # nnU-Net saves checkpoint_best.pth at the end of its first epoch and then logs "Epoch 1": the checkpoint is
        # whole and the training under way, with epochs to go (the file alone can be caught half-written)
        deadline = time.time() + 240
        while not epoch_started(fold, 1) and experiment.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert experiment.poll() is None and epoch_started(fold, 1), experiment.communicate()[0]
        assert (fold / ".training.lock").exists() and trainings_of(results)
        experiment.send_signal(signal.SIGTERM)  # to the experiment only, as a scheduler does
        output = experiment.communicate(timeout=30)[0]
    finally:
        if experiment.poll() is None:
            experiment.kill()
    assert experiment.returncode == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM" in output
    time.sleep(0.5)  # the group's last workers are reaped by the system
    assert not trainings_of(results)
    assert not (fold / ".training.lock").exists()
    assert not (fold / "checkpoint_final.pth").exists()  # it was stopped in the middle

    # nnU-Net writes checkpoint_latest.pth every 50 epochs: here its best checkpoint, of the same run, stands for it
    (fold / "checkpoint_latest.pth").write_bytes((fold / "checkpoint_best.pth").read_bytes())
    epoch = load_checkpoint_weights_only(str(fold / "checkpoint_latest.pth"))["current_epoch"]
    assert 0 < epoch < EPOCHS
    logs_before = set(fold.glob("training_log_*.txt"))
    rerun = run([BIN / "nnunet-protokd", "experiment", *EXPERIMENT, "-o", tmp_path / "e", "--step", TEACHER_STEP],
                env, timeout=240)
    new_logs = set(fold.glob("training_log_*.txt")) - logs_before
    assert len(new_logs) == 1, rerun.stdout  # one training, continued
    epochs_trained = [int(n) for n in re.findall(r"Epoch (\d+) *$", new_logs.pop().read_text(), re.M)]
    assert epochs_trained == list(range(epoch, EPOCHS))
    assert (fold / "checkpoint_final.pth").exists() and not (fold / ".training.lock").exists()


def test_a_model_folder_in_training_is_not_trained_again(preprocessed_phantoms, tmp_path, monkeypatch, capsys):
    """A second experiment (or workflow step) finds the live owner's lock: one error line naming the model folder,
    the process and its host; nothing is started. (In this process: flock's lock belongs to the open file, so
    this process's own claim is another owner's.)"""
    copy_phantoms(preprocessed_phantoms, tmp_path)
    for key, value in nnunet_environment(tmp_path).items():
        if key.startswith("nnUNet_"):
            monkeypatch.setenv(key, value)
    fold = tmp_path / "nnUNet_results" / "Dataset501_BraTS2018" / \
        f"ProtoKDTeacherTrainer__nnUNetPlans__{CONFIGURATION}" / "fold_0"
    fold.mkdir(parents=True)
    started = []
    monkeypatch.setattr(experiment_module, "run_command", started.append)
    with held_exclusively(str(fold / ".training.lock"), "x"):
        status = main(["experiment", *EXPERIMENT, "-o", tmp_path / "e", "--step", TEACHER_STEP])
    assert status == 1 and not started
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: the model folder {fold} is in use by process {os.getpid()} on {socket.gethostname()} (lock file "
        f"{fold / '.training.lock'}): wait for it to end or stop it, then run again"]
    assert not list(fold.iterdir())
