"""Safe file I/O: atomic writes and checkpoint reads with clear errors."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read as one."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(..., weights_only=True)`` with errors that name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated/garbage files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
