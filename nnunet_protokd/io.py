"""Files that are whole or absent: every file the plugin writes for later reading appears by one rename, so that a
failed or interrupted write leaves the previous version (or nothing) in place; checkpoints read without
executing code; and the owner (process and host) of a lock file or scratch folder, so that what a stopped process
left behind is recognised and what a live one holds is not touched."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from nnunet_protokd.errors import UserError

# numpy scalars that nnU-Net stores in its checkpoints (e.g. the EMA Dice); allowed in weights-only loading
_CHECKPOINT_SAFE_GLOBALS = [np.dtype, np._core.multiarray.scalar, np.dtypes.Float32DType,
                            np.dtypes.Float64DType, np.dtypes.Int64DType]


@contextmanager
def atomic_file(path: str):
    """Yields a temporary path beside `path` (same folder, same ending) to write; on success it replaces `path`
    by a rename, on any exception it is removed and `path` is untouched. The file gets the permissions a file
    opened for writing would get (mkstemp's are private: a checkpoint or plans file is made to be read by others)."""
    ending = "".join(os.path.basename(path).partition(".")[1:]) or ".tmp"
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp_",
                                         suffix=f".{ending.lstrip('.')}")
    os.close(handle)
    try:
        yield temporary
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def read_json(path: str) -> dict:
    """A JSON file the user gave; a UserError naming it when it is missing or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UserError(f"{path} is not JSON: {exc}") from None


def write_text_atomically(text: str, path: str) -> None:
    with atomic_file(path) as temporary:
        with open(temporary, "w") as f:
            f.write(text)


def write_json_atomically(content, path: str, indent: int = 4, allow_nan: bool = False) -> None:
    """JSON by one rename: a reader (or a run stopped while writing) sees the old file or the new one, never half
    of one. NaN and infinity are refused unless `allow_nan` (JSON has no such numbers; Python writes `NaN`, which
    Python reads back: a report's statistics where a test is undefined)."""
    write_text_atomically(json.dumps(content, indent=indent, allow_nan=allow_nan), path)


@contextmanager
def staged_folder(path: str, prefix: str = ".tmp_", replace: bool = False):
    """Yields an empty temporary folder beside `path` to fill; on success it becomes `path` by one rename, on any
    exception it is deleted and `path` is untouched. `replace`: a folder already at `path` is deleted once the new
    one is complete (otherwise the rename fails on it)."""
    staging = tempfile.mkdtemp(prefix=prefix, dir=os.path.dirname(os.path.abspath(path)))
    try:
        yield staging
        if replace and os.path.exists(path):
            shutil.rmtree(path)
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint_weights_only(path: str, map_location="cpu") -> dict:
    """An nnU-Net checkpoint read with torch's weights-only unpickler: tensors, numbers, text and the numpy scalars
    nnU-Net stores, never code."""
    with torch.serialization.safe_globals(_CHECKPOINT_SAFE_GLOBALS):
        return torch.load(path, map_location=map_location, weights_only=True)


@dataclass(frozen=True)
class Owner:
    """A process by its id and host: who holds a lock file (`held_exclusively`) or made a scratch folder (the
    converter's)."""
    pid: int
    host: str

    @classmethod
    def this_process(cls) -> Owner:
        return cls(os.getpid(), socket.gethostname())

    def is_gone(self) -> bool:
        """True only when it has certainly ended: it ran on this host and no process has its id now. Another
        host's processes cannot be seen from here."""
        if self.host != socket.gethostname() or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # someone else's process
            return False
        return False

    def __str__(self) -> str:
        return f"process {self.pid} on {self.host}"


def _owner_recorded(handle: int) -> Owner | None:
    """The owner a lock file names; None when it names none (empty, or not written by `held_exclusively`)."""
    try:
        record = json.loads(os.pread(handle, 4096, 0).decode())
        return Owner(int(record["pid"]), str(record["host"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def _lock(handle: int) -> bool | None:
    """flock's exclusive lock on an open file, without waiting: True when taken, False when another open file holds
    it, None on a file system without such locks (some network file systems), where the recorded owner decides."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            return None
        raise


def _same_file(handle: int, path: str) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle).st_ino
    except FileNotFoundError:
        return False


@contextmanager
def held_exclusively(path: str, what: str, log=None):
    """Holds the lock file `path` for `what` (a text such as "the model folder X") while the block runs; then
    removes it. The file names its owner (pid and host, JSON) and this process holds flock's lock on it, which the
    system releases when the process ends, however it ends.

    Another live owner: a UserError naming `what`, the owner and the lock file. A lock file left by a process of
    this host that has ended (killed, or the machine's power went): taken over, with a line on `log` (stderr by
    default). One left by a process of another host cannot be checked from here: refused, saying when to delete it.
    The file appears whole (written, locked, then linked into place), so a reader never sees it empty."""
    log = log or (lambda line: print(line, file=sys.stderr))
    me = Owner.this_process()
    record = json.dumps({"pid": me.pid, "host": me.host}).encode()
    while True:
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp_")
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(handle, 0o666 & ~umask)  # mkstemp's are private: another user's run must read the owner
            os.write(handle, record)
            _lock(handle)
            os.link(temporary, path)
            break  # ours from the moment it exists
        except FileExistsError:
            os.close(handle)
        except BaseException:
            os.close(handle)
            raise
        finally:
            os.remove(temporary)
        try:
            handle = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue  # its owner removed it meanwhile: try again
        locked = _lock(handle)
        if locked is not False and not _same_file(handle, path):
            os.close(handle)  # its owner removed it meanwhile and another took the place: look again
            continue
        previous = _owner_recorded(handle)
        # nobody holds the lock of a file left by a process of this host that ended; where the file system has no
        # such locks (None), the recorded process must be gone
        if locked:
            stale = previous is None or previous.host == me.host
        else:
            stale = locked is None and previous is not None and previous.is_gone()
        if not stale:
            os.close(handle)
            advice = f"if no process {previous.pid} runs on {previous.host} any more, delete {path}" \
                if previous is not None and previous.host != me.host else "wait for it to end or stop it"
            raise UserError(f"{what} is in use by {previous or 'another process'} (lock file {path}): {advice}, "
                            f"then run again")
        log(f"taking over {path}, left by {previous or 'a process'} that has ended")
        os.ftruncate(handle, 0)
        os.pwrite(handle, record, 0)
        break
    try:
        os.fsync(handle)
        yield
    finally:
        if _same_file(handle, path):
            os.remove(path)
        os.close(handle)
