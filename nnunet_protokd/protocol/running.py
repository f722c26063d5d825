"""How the protocol runs a command (nnUNetv2_train, nnunet-protokd predict, ...): as a child that ends with it.

The child gets a process group of its own (a new session), so that a stop reaches everything it started (nnU-Net's
data-augmentation workers too), and not through the terminal: SIGTERM (what schedulers and `kill` send), SIGINT
(Ctrl-C) or SIGHUP sent to the runner is passed on to the child's group; the runner waits for the group's leader to
end and exits with its status (128 + the signal when the signal ended it), so that nothing it started outlives it
and a rerun never finds a training of the same model still running. A second signal while waiting kills the group.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

STOPPING_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:  # the group has ended
        pass


def run_command(command: list, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `command` to its end (its output goes where ours goes) and returns its exit status like subprocess.run.
    Stopped by a signal, it stops the command the same way, waits for it and raises SystemExit with its status."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread receives signals
        return subprocess.run(command, env=env)
    received: list = []
    process = None

    def stop(signum, frame):
        received.append(signum)
        if process is not None:
            _signal_group(process, signum if len(received) == 1 else signal.SIGKILL)

    previous = {signum: signal.signal(signum, stop) for signum in STOPPING_SIGNALS}
    try:
        process = subprocess.Popen(command, env=env, start_new_session=True)
        if received:  # arrived while the child was being started
            _signal_group(process, received[0])
        status = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        _signal_group(process, signal.SIGKILL)  # what its leader left behind (e.g. an orphaned worker)
        status = 128 - status if status < 0 else status or 128 + received[0]  # a stopped run did not succeed
        name = signal.Signals(received[0]).name
        print(f"stopped by {name}: {os.path.basename(command[0])} ended with exit status {status}; the same command "
              f"continues where it stopped", file=sys.stderr)
        raise SystemExit(status)
    return subprocess.CompletedProcess(command, status)
