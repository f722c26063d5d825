"""Files that are whole or absent: every file the plugin writes for later reading appears by one rename, so that a
failed or interrupted write leaves the previous version (or nothing) in place; and checkpoints read without
executing code."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager

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


def write_json_atomically(content, path: str, indent: int = 4) -> None:
    """JSON by one rename. NaN and infinity are refused: JSON has no such numbers (Python would write
    `Infinity`)."""
    write_text_atomically(json.dumps(content, indent=indent, allow_nan=False), path)


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
