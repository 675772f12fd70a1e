"""Where cells run: submitit executors.

- ``local`` (default): every cell in a fresh subprocess (gin is process-global state); the scheduler
  keeps at most K running (submitit's local executor has no cap of its own). With GPUs, cells take
  them round-robin, one each.
- ``slurm``: every round of ready cells is one Slurm job array (``array_parallelism`` caps how many
  run at once); parameters are sbatch's (partition, time in minutes, gpus_per_node, cpus_per_task,
  mem, account, qos, constraint, setup, ...) from ``sweep.slurm`` or the command line. A cell with
  ``gpus_per_node > 1`` trains as one multi-process ``ignite.distributed`` run.
- ``debug``: in this process, one cell after the other, for tests and debugging.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import submitit

from ..errors import UserError
from .cell import run_cell

EXECUTORS = ("local", "slurm", "debug")
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit's local default (2 min) would kill any real cell
POLL_S = {"debug": 0.0, "local": 0.5, "slurm": 15.0}


@dataclass
class ExecutorConfig:
    kind: str = "local"
    jobs: int | None = None  # local: cells at once (default 1); slurm: array_parallelism
    slurm: dict = field(default_factory=dict)  # sbatch parameters (submitit's SlurmExecutor names)

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise UserError(f"unknown executor {self.kind!r}; known: {', '.join(EXECUTORS)}")
        if self.jobs is not None and self.jobs < 1:
            raise UserError(f"--jobs must be >= 1, got {self.jobs}")

    @property
    def max_running(self) -> int | None:
        """How many cells the scheduler keeps running (None: as many as are ready)."""
        if self.kind == "slurm":
            return None
        return self.jobs or 1

    @property
    def gpus_per_cell(self) -> int:
        return int(self.slurm.get("gpus_per_node") or 0) if self.kind == "slurm" else 0


class CellExecutor:
    """Submits prepared cell folders to a submitit executor; `submit` returns one job per folder."""

    def __init__(self, config: ExecutorConfig, folder: str | Path):
        self.config, self.folder = config, Path(folder)
        self.poll_s = POLL_S[config.kind]
        self._gpus, self._next_gpu = _visible_gpus() if config.kind == "local" else 0, 0
        self.executor = self._make()

    def _make(self) -> submitit.Executor:
        kind = self.config.kind
        if kind == "debug":
            return submitit.DebugExecutor(self.folder)
        if kind == "local":
            ex = submitit.LocalExecutor(self.folder)
            ex.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
            return ex
        ex = submitit.SlurmExecutor(self.folder)
        params = {"job_name": "dyncompute-sweep", **self.config.slurm}
        if self.config.jobs:
            params["array_parallelism"] = self.config.jobs
        ex.update_parameters(**params)
        return ex

    def submit(self, cell_dirs: list[Path]) -> list:
        paths = [str(p) for p in cell_dirs]
        if self.config.kind == "slurm":
            return self.executor.map_array(run_cell, paths)  # one job array per round
        jobs = []
        for p in paths:
            if self._gpus:  # one GPU per local cell, round-robin
                self.executor.update_parameters(gpus_per_node=1, visible_gpus=[self._next_gpu % self._gpus])
                self._next_gpu += 1
            jobs.append(self.executor.submit(run_cell, p))
        return jobs


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
