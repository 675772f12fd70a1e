"""Tokenizer-agnostic views of a sampling trajectory: which grid positions the backbone saw.

Per sampling step, each sample's kept-token map comes from the tokenizer's optional
``token_map(state) -> (B, H, W) bool``; tokenizers without one keep every token. Two figures:
boundary maps (rows: samples, columns: timesteps) and tokens kept vs timestep (mean ± spread).

    dyncompute views RUN_DIR [--out DIR] [--num-samples N] [--steps K]
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from .io import atomic_write
from .report import save_figure


@dataclass
class Trajectory:
    timesteps: list[float]  # the model's timestep input per recorded step (first sample)
    maps: torch.Tensor  # (K, B, H, W) bool: kept tokens per step and sample
    images: torch.Tensor | None = None  # final samples (B, C, H, W)

    @property
    def kept_fraction(self) -> torch.Tensor:
        """(K, B) fraction of tokens kept."""
        return self.maps.flatten(2).float().mean(-1)


def token_map(model, info) -> torch.Tensor:
    """(B, H, W) bool kept-token map of one forward (every token kept when the tokenizer has no map)."""
    kept = model.tokenizer.token_map(info.state)
    if kept is not None:
        return kept.detach().cpu()
    B, n = len(info.tokens_per_sample), max(info.tokens_per_sample)
    side = int(round(n ** 0.5))
    return torch.ones(B, side, side, dtype=torch.bool)


class _Recorder:
    """A model function for samplers that records each call's token map (conditional half under CFG)."""

    def __init__(self, model, num_samples: int):
        self.model, self.num_samples, self.maps, self.timesteps = model, num_samples, [], []

    def __call__(self, x, t, **kwargs):
        out, info = self.model(x, t, return_info=True, **kwargs)
        self.maps.append(token_map(self.model, info)[: self.num_samples])
        self.timesteps.append(float(t.flatten()[0]))
        return out


@torch.no_grad()
def record_trajectory(model, num_samples: int = 8, sampler: str = "ddim", num_steps: int = 25,
                      seed: int = 0, labels=None, **budget) -> Trajectory:
    from .registry import SAMPLERS

    model.eval()
    kind = SAMPLERS.get(sampler).kind
    s = SAMPLERS.build(sampler, num_steps=num_steps,
                       **({} if kind == "flow" else {"learn_sigma": model.learn_sigma}))
    device = next(model.parameters()).device
    y = (torch.as_tensor(labels) if labels is not None else torch.arange(num_samples) % model.num_classes).to(device)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((num_samples, model.in_channels, model.input_size, model.input_size), generator=g).to(device)
    rec = _Recorder(model, num_samples)
    images = s.sample(rec, z.shape, model_kwargs=dict(y=y, **budget), noise=z, device=device)
    return Trajectory(rec.timesteps, torch.stack(rec.maps), images.cpu())


def plot_boundary_maps(traj: Trajectory, path, max_columns: int = 8, max_rows: int = 8):
    """Rows: samples; columns: timesteps (evenly chosen along the trajectory)."""
    import matplotlib.pyplot as plt  # Agg backend: set by .report

    K, B = traj.maps.shape[:2]
    cols = torch.linspace(0, K - 1, min(K, max_columns)).round().long().unique().tolist()
    rows = min(B, max_rows)
    extra = int(traj.images is not None)  # last column: the final sample, for reference
    fig, axes = plt.subplots(rows, len(cols) + extra, figsize=(1.3 * (len(cols) + extra), 1.4 * rows),
                             squeeze=False)
    frac = traj.kept_fraction
    for r in range(rows):
        for j, k in enumerate(cols):
            ax = axes[r][j]
            ax.imshow(traj.maps[k, r].numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xlabel(f"{frac[k, r]:.2f}", fontsize=6, labelpad=1)
            if r == 0:
                ax.set_title(f"t={traj.timesteps[k]:.0f}", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"#{r}", fontsize=7)
        if extra:
            img = traj.images[r, :3] if traj.images.shape[1] >= 3 else traj.images[r, :1].expand(3, -1, -1)
            axes[r][-1].imshow(((img.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
            if r == 0:
                axes[r][-1].set_title("sample", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("tokens the backbone processes (black; fraction kept below each map), noisy -> clean",
                 fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return save_figure(fig, path)


def plot_kept_vs_timestep(traj: Trajectory, path):
    import matplotlib.pyplot as plt  # Agg backend: set by .report

    frac = traj.kept_fraction
    mean, std = frac.mean(1).numpy(), frac.std(1, unbiased=False).numpy()
    lo, hi = frac.min(1).values.numpy(), frac.max(1).values.numpy()
    t = traj.timesteps
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.fill_between(t, lo, hi, alpha=0.15, label="min–max")
    ax.fill_between(t, mean - std, mean + std, alpha=0.3, label="±1 std")
    ax.plot(t, mean, label="mean")
    ax.set_xlabel("timestep (sampling runs left to right, noisy -> clean)")
    ax.set_ylabel("fraction of grid positions kept")
    ax.invert_xaxis() if len(t) > 1 and t[0] > t[-1] else None
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def kept_table(traj: Trajectory) -> pd.DataFrame:
    frac = traj.kept_fraction
    return pd.DataFrame({"step": range(len(traj.timesteps)), "timestep": traj.timesteps,
                         "kept_mean": frac.mean(1).numpy(), "kept_std": frac.std(1, unbiased=False).numpy(),
                         "kept_min": frac.min(1).values.numpy(), "kept_max": frac.max(1).values.numpy()})


def write_views(model, out_dir, num_samples: int = 8, steps: int = 25, sampler: str = "ddim", **budget) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    traj = record_trajectory(model, num_samples=num_samples, sampler=sampler, num_steps=steps, **budget)
    table = kept_table(traj)
    atomic_write(out / "kept_vs_timestep.csv", lambda tmp: table.to_csv(tmp, index=False))
    return {"boundary_maps": str(plot_boundary_maps(traj, out / "boundary_maps.png")),
            "kept_vs_timestep": str(plot_kept_vs_timestep(traj, out / "kept_vs_timestep.png")),
            "table": str(out / "kept_vs_timestep.csv"), "mean_kept": float(table["kept_mean"].mean())}


def register_cli(sub) -> None:
    p = sub.add_parser("views", help="boundary maps and tokens kept vs timestep over a sampling trajectory")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output folder (default RUN_DIR/views)")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--weights", default="ema", help="ema or model")
    p.set_defaults(func=_cmd_views)


def _cmd_views(args) -> None:
    import json

    from .sampling import load_run

    model = load_run(args.run_dir, weights=args.weights)
    files = write_views(model, args.out or Path(args.run_dir) / "views", args.num_samples, args.steps, args.sampler)
    print(json.dumps(files))
