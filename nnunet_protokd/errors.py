"""Errors that a user fixes by changing their input, and how commands show them: one `error: ...` line.

Our commands catch them (cli.run_reporting_errors). nnU-Net's commands (`nnUNetv2_train`, `nnUNetv2_predict`)
run our trainers' code but print any exception as a traceback; `show_user_errors_in_nnunet_commands` makes
them print ours as one line, the way our own commands do.
"""
from __future__ import annotations

import os
import sys


class UserError(Exception):
    """Bad input or an unusable setting, fully described by its message (which names the case, file or setting
    and what is wrong): shown to the user as one `error:` line, without a traceback."""


class ConfigurationError(UserError, ValueError):
    """A plans configuration or setting that cannot serve the requested student or teacher."""


class TeacherError(UserError, RuntimeError):
    """No usable teacher for this student; the message says which and why."""


class StepFailed(RuntimeError):
    """A command of the protocol (protocol/experiment.py) exited with an error (its own output says why)."""


def is_user_error(exc: BaseException) -> bool:
    """A UserError, or an exception whose class says it is one (`user_error = True`): data/brats_labels.py's
    ConversionError does, because that module also runs without the plugin, inside exported models, and so
    cannot derive from UserError."""
    return isinstance(exc, UserError) or getattr(type(exc), "user_error", False) is True


def show_user_errors_in_nnunet_commands() -> None:
    """In a process started as one of nnU-Net's commands, an uncaught UserError ends it with its message (exit
    status 1) instead of a traceback; other exceptions keep Python's usual report. A no-op in other processes
    (tests, notebooks, our own commands), so importing the trainers elsewhere changes nothing."""
    if not os.path.basename(sys.argv[0] if sys.argv else "").startswith("nnUNetv2_"):
        return
    if getattr(sys.excepthook, "shows_user_errors", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, traceback):
        if is_user_error(exc):
            print(f"error: {exc}", file=sys.stderr)
        else:
            previous(exc_type, exc, traceback)

    hook.shows_user_errors = True
    sys.excepthook = hook
