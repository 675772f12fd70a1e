"""`dyncompute quickstart`: the front door, a small sweep that shows what the framework is for.

It runs ``experiments/sweeps/quickstart.gin`` (DiT/2, DC-DiT N = 4 and DC-DiT's iso-FLOP DiT/2,
trained on the built-in data and sampled under several settings) with the local executor and writes
its report. The output folder defaults to ``reports/quickstart-run/`` (ignored by git: a run never
touches committed files); the committed example is ``reports/quickstart/``. Rerunning resumes.
"""
from __future__ import annotations

import os
from pathlib import Path

from .config import PROJECT_ROOT

SWEEP = PROJECT_ROOT / "experiments" / "sweeps" / "quickstart.gin"
DEFAULT_OUT = "reports/quickstart-run"


def quickstart(out: str | Path = DEFAULT_OUT, jobs: int | None = None, executor: str = "local",
               bindings=(), progress: bool = True) -> dict:
    """Run (or resume) the quickstart sweep into ``out`` and write its report; returns the sweep summary."""
    from .sweeps.executors import ExecutorConfig
    from .sweeps.grid import run_sweep
    from .sweeps.spec import load_sweep

    jobs = jobs or min(3, os.cpu_count() or 1)  # three training runs: up to three at once
    sweep = load_sweep(SWEEP, bindings)
    return run_sweep(SWEEP, out, ExecutorConfig(executor, jobs), progress=progress, sweep=sweep)
