"""Safe file I/O: atomic writes and checkpoint reads with clear errors."""
from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = ["TEMP_SUFFIX", "CheckpointError", "atomic_save", "atomic_write", "atomic_write_text", "load_checkpoint"]

TEMP_SUFFIX = ".tmp"  # temp files are ".<name>.<random>.tmp" beside their target (see `atomic_write`)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's 0600 would hide results from others


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see a half-written file.

    An interrupted write leaves only ``.<name>.<random>.tmp``, which the next run removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """``torch.load(..., weights_only=True)`` with errors that name the file and the problem.

    ``mmap`` maps the file instead of reading it (a cheap look at a large checkpoint).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for truncated/garbage files
        raise CheckpointError(f"cannot read checkpoint {path}: {_load_problem(e)}") from e


def _load_problem(error: Exception) -> str:
    """What torch's error means, without its advice to load untrusted files with ``weights_only=False``."""
    text = str(error)
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe:
        return f"it holds a pickled Python object ({unsafe.group(1)}); only tensors and plain containers are loaded"
    if isinstance(error, EOFError) or not text.strip():
        return "the file is empty or truncated"
    if "central directory" in text or "zip archive" in text:
        return "the file is truncated or corrupted (not a complete torch zip archive)"
    return "not a torch checkpoint, or a corrupted one"
