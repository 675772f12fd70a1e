"""Run directories: where a run's checkpoints are, which device it runs on, and its model rebuilt.

A run directory holds ``config.gin`` (every binding of the run), ``operative_config.gin`` (what was
used), ``checkpoints/`` (ignite `Checkpoint` files ``checkpoint_<step>.pt``) and ``metrics.csv``.
"""
from __future__ import annotations

import re
from pathlib import Path

import ignite.distributed as idist
import torch

from .config import RUN_CONFIGURABLES, scoped
from .io import load_checkpoint
from .model import DiffusionTransformer

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.gin"
METRICS_FILE = "metrics.csv"
_CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)\.pt")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: this process's device under ignite.distributed (CUDA when there is one)."""
    if device == "auto":
        return idist.device()
    return torch.device(device)


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoints, oldest first; files that are not ``checkpoint_<step>.pt`` are ignored."""
    found = [(int(m.group(1)), p) for p in (Path(run_dir) / CHECKPOINT_DIR).glob("checkpoint_*.pt")
             if (m := _CHECKPOINT_NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    return int(_CHECKPOINT_NAME.fullmatch(path.name).group(1))


def load_run(run_dir: str | Path, weights: str = "ema", bindings=()) -> DiffusionTransformer:
    """The model of a run directory, with its EMA (default) or online weights from the latest checkpoint.

    Only the model is rebuilt, so the trainer's own bindings in ``config.gin`` are not needed here.
    """
    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir / CHECKPOINT_DIR}: train first")
    with scoped([run_dir / CONFIG_FILE], bindings, skip_unknown=RUN_CONFIGURABLES):
        model = DiffusionTransformer()
    state = load_checkpoint(ckpt)
    if weights not in state:
        raise KeyError(f"checkpoint {ckpt} has no {weights!r} weights; it has {sorted(state)}")
    model.load_state_dict(state[weights])
    return model.eval()


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """EMA weights (else online) from a run directory's latest checkpoint or a checkpoint file."""
    ckpt = latest_checkpoint(path) if Path(path).is_dir() else Path(path)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {path}")
    state = load_checkpoint(ckpt)
    model.load_state_dict(state.get("ema", state.get("model", state)))
