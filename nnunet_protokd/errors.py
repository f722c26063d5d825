"""Errors that a user fixes by changing their input, and how commands show them: one `error: ...` line.

Our commands catch them (cli.run_reporting_errors). nnU-Net's commands (`nnUNetv2_train`, `nnUNetv2_predict`)
run our trainers' code but print any exception as a traceback; `show_user_errors_in_nnunet_commands` makes
them print ours as one line, the way our own commands do.
"""
from __future__ import annotations

import os
import sys

from nnunet_protokd.brats_labels import ConversionError


class UserError(Exception):
    """Bad input or an unusable setting, fully described by its message (which names the case, file or setting
    and what is wrong): shown to the user as one `error:` line, without a traceback."""


# ConversionError is one too, but derives from ValueError only: brats_labels.py also runs without the plugin,
# inside exported models
USER_ERRORS = (UserError, ConversionError)


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
        if issubclass(exc_type, USER_ERRORS):
            print(f"error: {exc}", file=sys.stderr)
        else:
            previous(exc_type, exc, traceback)

    hook.shows_user_errors = True
    sys.excepthook = hook
