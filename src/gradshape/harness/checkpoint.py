"""Checkpoints that survive a crash: written atomically, read back safely.

:func:`save_checkpoint` serialises to a temporary file in the destination's directory, flushes
and fsyncs it, then renames it over the destination with :func:`os.replace` (atomic on POSIX
and Windows when both lie on one file system) and fsyncs the directory.  A process killed at
any moment therefore leaves either the previous checkpoint or the new one, never a torn file.
:func:`load_checkpoint` reads with ``torch.load(weights_only=True)``: plain tensors and Python
containers only, no arbitrary code from the file.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_checkpoint", "save_checkpoint"]


def _partial_path(path: Path) -> Path:
    # One fixed name per destination: a save killed half-way leaves this file, and the next
    # save of the same checkpoint overwrites it instead of accumulating debris.
    return path.with_name(f".{path.name}.partial")


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` (tensors and plain Python containers) to ``path`` atomically.

    The parent directory is created if needed.  Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_path(path)
    try:
        with open(partial, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU.

    Raises ``FileNotFoundError`` if ``path`` does not exist and ``ValueError`` naming the file
    if it is truncated, corrupt or holds objects other than tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({err})") from None
