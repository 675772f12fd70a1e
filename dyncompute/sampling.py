"""Sampling from a trained run: rebuild the model from its gin config, run a registered sampler.

``dyncompute sample RUN_DIR`` writes a PNG grid and an ``.npz`` of uint8 NHWC images under
``arr_0`` (the ADM evaluator's format).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gin
import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from .config import scoped
from .engine import latest_checkpoint, resolve_device
from .io import atomic_write, load_checkpoint
from .model import DiffusionTransformer
from .registry import SAMPLERS


def load_run(run_dir: str | Path, weights: str = "ema", bindings=()) -> DiffusionTransformer:
    """The model of a run directory, with its EMA (default) or online weights from the latest checkpoint."""
    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'}: train first")
    with scoped([run_dir / "config.gin"], bindings):
        model = DiffusionTransformer()
    state = load_checkpoint(ckpt)
    if weights not in state:
        raise KeyError(f"checkpoint {ckpt} has no {weights!r} weights; it has {sorted(state)}")
    model.load_state_dict(state[weights])
    return model.eval()


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    labels: torch.Tensor
    nfe: int
    timesteps: list


@gin.configurable(denylist=["model"])
def generate(model: DiffusionTransformer, num_samples: int = 16, sampler: str = "ddpm", num_steps: int = 250,
             cfg_scale: float = 1.0, guided_channels: int | None = None, seed: int = 0, batch_size: int = 64,
             labels=None, clip_denoised: bool | None = None, device: str = "auto", progress: bool = False,
             **budget) -> SampleResult:
    """Class-conditional samples; labels cycle through the classes unless given.

    ``clip_denoised`` (Gaussian samplers) clips predicted x0 to [-1, 1]: right for pixel data, wrong for
    latents; None keeps the sampler's default (DiT's: off, for latents).
    """
    dev = resolve_device(device)
    model = model.to(dev).eval()
    s = SAMPLERS.build(sampler, num_steps=num_steps, **_gaussian_kw(sampler, model, clip_denoised))
    g = torch.Generator(device="cpu").manual_seed(seed)
    ys = torch.as_tensor(labels) if labels is not None else torch.arange(num_samples) % model.num_classes
    images, nfe, steps = [], 0, []
    for start in range(0, num_samples, batch_size):
        y = ys[start:start + batch_size].to(dev)
        shape = (len(y), model.in_channels, model.input_size, model.input_size)
        z = torch.randn(shape, generator=g).to(dev)
        fn, kwargs = _model_fn(model, y, cfg_scale, guided_channels, budget)
        if cfg_scale > 1.0:
            z = torch.cat([z, z])
        with torch.no_grad():
            x = s.sample(fn, z.shape, model_kwargs=kwargs, noise=z, device=dev, progress=progress)
        images.append(x[: len(y)].cpu())
        nfe, steps = nfe + s.nfe, s.timesteps_seen
    return SampleResult(torch.cat(images).clamp(-1, 1), ys, nfe, steps)


def _gaussian_kw(sampler: str, model, clip_denoised: bool | None) -> dict:
    if SAMPLERS.get(sampler).kind == "flow":
        return {}
    return {"learn_sigma": model.learn_sigma, **({} if clip_denoised is None else {"clip_denoised": clip_denoised})}


def _model_fn(model, y, cfg_scale, guided_channels, budget):
    """DiT's CFG batching: [z; z] with labels [y; null]."""
    if cfg_scale > 1.0:
        null = torch.full_like(y, model.num_classes)
        kw = dict(y=torch.cat([y, null]), cfg_scale=cfg_scale, guided_channels=guided_channels, **budget)
        return model.forward_with_cfg, kw
    return model, dict(y=y, **budget)


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images (N, C, H, W) -> uint8 (N, H, W, 3); 1 channel is grey, >3 keeps the first 3."""
    x = images[:, :3] if images.shape[1] >= 3 else images[:, :1].expand(-1, 3, -1, -1)
    x = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def save_samples(images: torch.Tensor, out_dir: str | Path, name: str = "samples", nrow: int = 8) -> dict:
    """Write ``{name}.png`` (grid) and ``{name}.npz`` (``arr_0``: uint8 NHWC) atomically."""
    out_dir = Path(out_dir)
    arr = to_uint8_nhwc(images)
    npz = atomic_write(out_dir / f"{name}.npz", lambda tmp: _savez(tmp, arr))
    grid = make_grid(torch.from_numpy(arr).permute(0, 3, 1, 2), nrow=nrow, padding=2, pad_value=255)
    img = Image.fromarray(grid.permute(1, 2, 0).numpy()).resize(
        (grid.shape[2] * 4, grid.shape[1] * 4), Image.NEAREST)
    png = atomic_write(out_dir / f"{name}.png", lambda tmp: img.save(tmp, format="PNG"))
    return {"png": str(png), "npz": str(npz)}


def _savez(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object keeps numpy from appending ".npz" to the temp name
        np.savez(f, arr_0=arr)
