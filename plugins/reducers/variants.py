"""A trained run sampled with and without reducers, as the reducer benchmarks time and count it."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dyncompute.runs import load_run
from dyncompute.sampling import generate
from dyncompute.trajectory import TrajectoryCount, TrajectoryRecorder


def load_variant(run: str | Path, reducers: Sequence[str], bindings: Sequence[str] = ()) -> torch.nn.Module:
    """The run's EMA model with ``reducers`` (gin names) configured by ``bindings``."""
    extra = [f"DiffusionTransformer.reducers = {list(reducers)!r}", *bindings] if reducers else list(bindings)
    return load_run(run, bindings=extra)


def sampling_call(model, images: int, steps: int, sampler: str = "ddim", seed: int = 0) -> Callable[[], torch.Tensor]:
    """One sampling call of ``images`` images in one batch (x0 clipped: pixel data), same noise every call."""
    def call() -> torch.Tensor:
        return generate(model, num_samples=images, sampler=sampler, num_steps=steps, batch_size=images, seed=seed,
                        clip_denoised=True, device="cpu").images
    return call


def recorded(model, images: int, steps: int, sampler: str = "ddim",
             seed: int = 0) -> tuple[TrajectoryCount, torch.Tensor]:
    """Per-image compute of a sampling call, and its images."""
    recorder = TrajectoryRecorder(model)
    out = generate(model, num_samples=images, sampler=sampler, num_steps=steps, batch_size=images, seed=seed,
                   clip_denoised=True, device="cpu", observers=[recorder])
    return recorder.count(images), out.images


def trajectory_macs(model, images: int, steps: int, sampler: str = "ddim") -> float:
    """Useful MACs per image of a sampling call."""
    return recorded(model, images, steps, sampler)[0].useful_macs_per_image
