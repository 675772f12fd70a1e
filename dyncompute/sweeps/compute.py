"""A cell's compute: per-image MACs/FLOPs over its sampling trajectory, NFE, wall-clock and memory.

Counts come from :mod:`dyncompute.trajectory` (every model evaluation of a real sampling run, both
CFG branches, the backbone lengths each sample really had); units as in :mod:`dyncompute.flops`:
MACs are multiply-accumulates, FLOPs = 2 x MACs, "useful" counts valid tokens only, "executed"
includes padding. Wall-clock and memory are measured on the sampling run that produced the cell's
samples, without the recorder (which would add its own overhead).
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import torch

from ..flops import count_parameters
from ..sampling import SampleResult, generate
from ..trajectory import TrajectoryRecorder


@dataclass
class TimedSamples:
    samples: SampleResult
    wall_s: float
    peak_cuda_bytes: int | None
    cpu_s: float = float("nan")  # CPU seconds of this process meanwhile: less sensitive to other jobs than wall_s


def timed_samples(model, num_samples: int, seed: int) -> TimedSamples:
    """The cell's samples (sampler, steps, CFG and budget from gin), one batch, timed."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0, cpu0 = time.perf_counter(), time.process_time()
    samples = generate(model, num_samples=num_samples, batch_size=num_samples, seed=seed, device=str(device))
    if cuda:
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    return TimedSamples(samples, wall, torch.cuda.max_memory_allocated(device) if cuda else None,
                        time.process_time() - cpu0)


def count_compute(model, timed: TimedSamples, count_images: int, seed: int) -> dict:
    """Labelled compute columns of one cell (per image over the whole sampling trajectory)."""
    device = next(model.parameters()).device
    recorder = TrajectoryRecorder(model)
    generate(model, num_samples=count_images, batch_size=count_images, seed=seed, device=str(device),
             observers=[recorder])
    traj = recorder.count(count_images)
    n = len(timed.samples.images)
    out = {
        "per_image_TFLOPs": traj.flops_per_image / 1e12,
        "per_image_GMACs": traj.useful_macs_per_image / 1e9,
        "per_image_executed_GMACs": traj.executed_macs_per_image / 1e9,
        "NFE": traj.nfe,
        "backbone_evaluations": traj.nfe if traj.backbone_evaluations is None else traj.backbone_evaluations,
        "per_image_backbone_GMACs": traj.by_component.get("backbone", 0.0) / 1e9,
        "per_step_GFLOPs": traj.flops_per_image / traj.nfe / 1e9,
        "backbone_tokens_per_step": float(traj.steps["tokens_mean_cond"].mean()),
        "params_M": count_parameters(model) / 1e6,
        "sampling_wall_ms_per_image": 1e3 * timed.wall_s / n,
        "sampling_cpu_ms_per_image": 1e3 * timed.cpu_s / n,
        "process_peak_rss_MiB": _peak_rss_mib(),
    }
    if timed.peak_cuda_bytes is not None:
        out["sampling_peak_cuda_MiB"] = timed.peak_cuda_bytes / 2**20
    details = {
        "counted_images": count_images, "timed_images": n, "device": str(device),
        "per_image_GFLOPs_by_component": {k: 2 * v / 1e9 for k, v in traj.by_component.items()},
        "tokens_per_step": traj.steps["tokens_mean_cond"].tolist(), "timesteps": traj.steps["t"].tolist(),
        "notes": traj.notes,
    }
    return {"columns": out, "details": details}


def _peak_rss_mib() -> float:
    """Peak resident memory of this process so far (training included when it ran here)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
