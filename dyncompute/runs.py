"""Run directories: their checkpoints, their fixed config, their lock and history, and their model rebuilt.

A run directory holds ``config.gin`` (every binding of the run; fixed once written), ``operative_config.gin``
(what was used), ``checkpoints/`` (``checkpoint_<step>.pt``; other names are ignored), ``metrics.csv``
and ``history.jsonl`` (one line per start, resume and end, with what changed).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import socket
import sys
from pathlib import Path

import ignite.distributed as idist
import torch

from . import __version__
from .config import RUN_CONFIGURABLES, bindings_of, scoped
from .errors import CheckpointError, ConfigError, RunDirError
from .io import TEMP_SUFFIX, load_checkpoint
from .model import DiffusionTransformer

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.gin"
METRICS_FILE = "metrics.csv"
HISTORY_FILE = "history.jsonl"
BAD_SUFFIX = ".bad"  # a checkpoint that failed its check is renamed aside, never deleted
_CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)\.pt")
_IGNITE_TEMP = re.compile(r"tmp[a-z0-9_]{8}")  # ignite's DiskSaver temp names (runs of earlier versions)
log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: this process's device under ignite.distributed (CUDA when there is one)."""
    if device == "auto":
        return idist.device()
    return torch.device(device)


# -- checkpoints -----------------------------------------------------------------------------------

def checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoints, oldest first; files that are not ``checkpoint_<step>.pt`` are ignored."""
    found = [(int(m.group(1)), p) for p in (Path(run_dir) / CHECKPOINT_DIR).glob("checkpoint_*.pt")
             if (m := _CHECKPOINT_NAME.fullmatch(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    return int(_CHECKPOINT_NAME.fullmatch(path.name).group(1))


def non_finite(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors in a state dict that hold NaN or inf."""
    return [k for k, v in state_dict.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]


def check_state(path: Path, state, keys) -> None:
    """A checkpoint must hold every one of ``keys`` and finite weights under each."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a training checkpoint")
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {', '.join(map(repr, missing))}; it has {sorted(state)}")
    for key in keys:
        if key in ("model", "ema") and (bad := non_finite(state[key])):
            raise CheckpointError(f"checkpoint {path} holds non-finite {key} weights ({len(bad)} tensors, "
                                  f"e.g. {bad[0]})")


def load_good_checkpoint(run_dir: str | Path, keys=("model",), quarantine: bool = False, mmap: bool = False):
    """``(path, state)`` of the newest checkpoint that reads and passes `check_state`, else ``(None, None)``
    when there is none at all.

    Newer bad ones are skipped with a warning naming each (``quarantine`` renames them to ``*.bad`` so
    that they no longer count as checkpoints); when every checkpoint is bad, the newest one's problem is
    raised.
    """
    problems = []
    for path in reversed(checkpoints(run_dir)):
        try:
            state = load_checkpoint(path, mmap=mmap)
            check_state(path, state, keys)
        except CheckpointError as e:
            problems.append((path, e))
            continue
        for bad, problem in problems:
            if quarantine:
                bad.rename(bad.with_name(bad.name + BAD_SUFFIX))
            log.warning(f"warning: {problem}; using {path.name} instead"
                        + (f" (renamed the bad file to {bad.name}{BAD_SUFFIX})" if quarantine else ""))
        return path, state
    if problems:
        raise CheckpointError(f"{problems[0][1]}" + ("; no earlier checkpoint is usable either"
                                                     if len(problems) > 1 else ""))
    return None, None


def clean_temp_files(run_dir: Path) -> list[Path]:
    """Remove the temp files of writes a killed run left behind (call only while holding the `RunLock`)."""
    removed = []
    for folder in (run_dir, run_dir / CHECKPOINT_DIR):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            ours = p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)
            if p.is_file() and (ours or (folder.name == CHECKPOINT_DIR and _IGNITE_TEMP.fullmatch(p.name))):
                p.unlink()
                removed.append(p)
    return removed


# -- the run directory as a whole -----------------------------------------------------------------

def check_run_dir(run_dir: Path) -> None:
    """A path that is, or can become, a run directory (nothing is created here)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} is a file, not a directory")
    for name in (CHECKPOINT_DIR, CONFIG_FILE):
        p = run_dir / name
        if p.exists() and p.is_dir() != (name == CHECKPOINT_DIR):
            raise RunDirError(f"{p} should be a {'directory' if name == CHECKPOINT_DIR else 'file'}")
    parent = next((p for p in [run_dir, *run_dir.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot write into {parent} (to create or update run directory {run_dir})")


def config_changes(run_dir: Path, config_text: str) -> dict[str, tuple[str | None, str | None]]:
    """``{binding: (old, new)}`` between the run directory's ``config.gin`` and ``config_text``."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return {}
    old, new = bindings_of(path.read_text()), bindings_of(config_text)
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def check_config_change(run_dir: Path, changes: dict, free=(), steps_key: str | None = None,
                        allow: bool = False) -> None:
    """A run directory's config is fixed: refuse changes other than the ``free`` bindings and a larger
    ``steps_key`` (or any, with ``allow``), naming every change."""
    done = checkpoint_step(latest_checkpoint(run_dir)) if latest_checkpoint(run_dir) else 0
    if steps_key in changes:
        new = changes[steps_key][1]
        try:
            target = int(new) if new is not None else None
        except ValueError:
            target = None
        if target is not None and target < done:
            raise RunDirError(f"run directory {run_dir} has trained {done} steps, more than {steps_key} = {target}")
    fixed = {k: v for k, v in changes.items() if k not in free and k != steps_key}
    if fixed and not allow:
        listed = "; ".join(f"{k}: {_shown(a)} -> {_shown(b)}" for k, (a, b) in fixed.items())
        raise RunDirError(f"run directory {run_dir} was made with another config ({listed}); use another "
                          "--run-dir, or pass --allow-config-change to go on from its checkpoint with this config")


def _shown(value: str | None) -> str:
    return "(unset)" if value is None else value


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold the run directory for one training process (tree) at a time: an advisory lock on the
    directory itself, so that taking it writes nothing; the kernel drops it when the holder dies."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no lock
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunDirError(f"run directory {run_dir} is in use by another training process; wait for it to "
                                  "end or use another --run-dir") from None
        yield
    finally:
        os.close(fd)


def record(run_dir: Path, event: str, **info) -> None:
    """Append one line to the run's history: what ran, when, where, with which changes."""
    entry = {"event": event, "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             **info, "host": socket.gethostname(), "pid": os.getpid(), "argv": sys.argv,
             "dyncompute": __version__, "torch": torch.__version__}
    with open(run_dir / HISTORY_FILE, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")


# -- the trained model -----------------------------------------------------------------------------

def load_run(run_dir: str | Path, weights: str = "ema", bindings=()) -> DiffusionTransformer:
    """The model of a run directory, with its EMA (default) or online weights from the newest good checkpoint.

    Only the model is rebuilt, so the trainer's own bindings in ``config.gin`` are not needed here.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunDirError(f"{run_dir} is not a run directory (no {CONFIG_FILE}): train first")
    ckpt, state = load_good_checkpoint(run_dir, keys=(weights,))
    if ckpt is None:
        raise RunDirError(f"no checkpoint in {run_dir / CHECKPOINT_DIR}: train first")
    with scoped([run_dir / CONFIG_FILE], bindings, skip_unknown=RUN_CONFIGURABLES):
        model = DiffusionTransformer()
    try:
        model.load_state_dict(state[weights])
    except RuntimeError as e:
        raise ConfigError(f"checkpoint {ckpt} does not fit the configured model: {str(e).splitlines()[0]}") from e
    return model.eval()


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """EMA weights (else online) from a run directory's newest good checkpoint or a checkpoint file."""
    if Path(path).is_dir():
        ckpt, state = load_good_checkpoint(path)
        if ckpt is None:
            raise RunDirError(f"no checkpoint in {path}")
    else:
        state = load_checkpoint(path)
    weights = state.get("ema", state.get("model", state))
    if bad := non_finite(weights):
        raise CheckpointError(f"checkpoint {path} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]})")
    model.load_state_dict(weights)
