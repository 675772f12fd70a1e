"""Sampling: a registered sampler, built for the model's training objective, run batch by batch.

``dyncompute sample RUN_DIR`` writes a PNG grid and an ``.npz`` of uint8 NHWC images under
``arr_0`` (the ADM evaluator's format).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gin
import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from .config import bound_arguments
from .diffusion import OBJECTIVES, make_objective
from .errors import ConfigError, Diverged, one_line
from .io import atomic_write
from .model import DiffusionTransformer
from .observe import Observed, Observer
from .registry import SAMPLERS
from .runs import resolve_device
from .validate import check_device, check_sampling, need_int


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    labels: torch.Tensor
    nfe: int
    timesteps: list


@gin.configurable(denylist=["model", "observers"])
def generate(model: DiffusionTransformer, num_samples: int = 16, sampler: str = "ddpm", num_steps: int = 250,
             cfg_scale: float = 1.0, guided_channels: int | None = None, seed: int = 0, batch_size: int = 64,
             labels=None, clip_denoised: bool | None = None, device: str = "auto", progress: bool = False,
             objective: str = "gaussian", observers: Sequence[Observer] = (), **budget) -> SampleResult:
    """Class-conditional samples; labels cycle through the classes unless given.

    The sampler is built for the model's training ``objective`` (a mismatch is an error). Each batch is
    one sampling call with its own reducer `StepCache`; ``observers`` see every model evaluation.
    ``clip_denoised`` (Gaussian samplers) clips predicted x0 to [-1, 1]: right for pixel data, wrong for
    latents; None keeps the sampler's default (DiT's: off, for latents).
    """
    check_sampling(model, num_samples, num_steps, cfg_scale, guided_channels, seed, batch_size, labels,
                   clip_denoised, budget)
    check_device("generate.device", device)
    s = build_sampler(sampler, objective, model.learn_sigma, num_steps, clip_denoised)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    g = torch.Generator(device="cpu").manual_seed(seed)
    ys = torch.as_tensor(labels) if labels is not None else torch.arange(num_samples) % model.num_classes
    images, nfe, steps = [], 0, []
    for start in range(0, num_samples, batch_size):
        y = ys[start:start + batch_size].to(dev)
        z = torch.randn((len(y), model.in_channels, model.input_size, model.input_size), generator=g).to(dev)
        fn, kwargs = model_function(model, y, cfg_scale, guided_channels, budget, observers)
        if len(model.reducers):  # one trajectory state per sampling call
            kwargs["step_cache"] = model.new_step_cache(s.planned_nfe)
        if cfg_scale > 1.0:
            z = torch.cat([z, z])
        with torch.no_grad():
            x = s.sample(fn, z.shape, model_kwargs=kwargs, noise=z, device=dev, progress=progress)
        images.append(x[: len(y)].cpu())
        nfe, steps = nfe + s.nfe, s.timesteps_seen
    images = torch.cat(images)
    if not torch.isfinite(images).all():
        raise Diverged(f"sampling produced non-finite values ({sampler}, {num_steps} steps, cfg {cfg_scale}); "
                       "nothing was written")
    return SampleResult(images.clamp(-1, 1), ys, nfe, steps)


def build_sampler(sampler: str, objective: str, learn_sigma: bool, num_steps: int, clip_denoised: bool | None):
    """A registered sampler for a model trained with ``objective``; a mismatch names the samplers that fit."""
    try:
        obj = make_objective(objective, learn_sigma=learn_sigma)
    except ValueError as e:
        raise ConfigError(f"train.objective = {objective!r}: {one_line(e)}") from e
    cls = SAMPLERS.get(sampler)
    if not isinstance(obj, cls.trains_with):
        fits = [n for n in SAMPLERS.names() if isinstance(obj, SAMPLERS.get(n).trains_with)]
        wants = [n for n in OBJECTIVES if isinstance(make_objective(n), cls.trains_with)]
        raise ConfigError(f"sampler {sampler!r} samples models trained with train.objective = "
                          f"{' or '.join(map(repr, wants))}, but this one was trained with {objective!r}; "
                          f"use {' or '.join(fits)}")
    settings = {"num_steps": num_steps, **({} if clip_denoised is None else {"clip_denoised": clip_denoised})}
    try:
        return cls.for_objective(obj, **settings)
    except (ValueError, TypeError) as e:  # the sampler's own gin bindings (samplers.<name>.*)
        raise ConfigError(f"sampler {sampler!r}: {one_line(e)}") from e


def check_sampler() -> None:
    """The configured sampler (``generate.*`` bindings) exists and fits the objective: cheap, so it can run
    before a model is loaded."""
    s = bound_arguments(generate, "generate")
    need_int("generate.num_steps", s["num_steps"], 1)
    build_sampler(s["sampler"], s["objective"], True, s["num_steps"], s["clip_denoised"])


def model_function(model, y, cfg_scale: float, guided_channels, budget: dict, observers=()):
    """(observed model function, model kwargs) for a sampler; DiT's CFG batching [z; z] with labels
    [y; null] when ``cfg_scale > 1``."""
    if cfg_scale > 1.0:
        null = torch.full_like(y, model.num_classes)
        kw = dict(y=torch.cat([y, null]), cfg_scale=cfg_scale, guided_channels=guided_channels, **budget)
        return Observed(model.forward_with_cfg, observers, with_info=bool(observers), cfg=True), kw
    return Observed(model, observers, with_info=bool(observers)), dict(y=y, **budget)


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images (N, C, H, W) -> uint8 (N, H, W, 3); 1 channel is grey, >3 keeps the first 3."""
    x = images[:, :3] if images.shape[1] >= 3 else images[:, :1].expand(-1, 3, -1, -1)
    x = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def save_samples(images: torch.Tensor, out_dir: str | Path, name: str = "samples", nrow: int = 8,
                 grid_images: int | None = None) -> dict:
    """Write ``{name}.npz`` (``arr_0``: uint8 NHWC, every image) and ``{name}.png`` (a grid of the first
    ``grid_images``, default all) atomically."""
    out_dir = Path(out_dir)
    arr = to_uint8_nhwc(images)
    npz = atomic_write(out_dir / f"{name}.npz", lambda tmp: _savez(tmp, arr))
    grid = make_grid(torch.from_numpy(arr[:grid_images]).permute(0, 3, 1, 2), nrow=nrow, padding=2, pad_value=255)
    img = Image.fromarray(grid.permute(1, 2, 0).numpy()).resize(
        (grid.shape[2] * 4, grid.shape[1] * 4), Image.NEAREST)
    png = atomic_write(out_dir / f"{name}.png", lambda tmp: img.save(tmp, format="PNG"))
    return {"png": str(png), "npz": str(npz)}


def _savez(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object keeps numpy from appending ".npz" to the temp name
        np.savez(f, arr_0=arr)
