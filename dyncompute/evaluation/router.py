"""Router diagnostics: the paper's pictures as numbers.

DC-DiT claims its router draws segmentation-like boundaries (tokens where the detail is) and keeps
more tokens as noise falls. On held-out images with ground-truth detail masks, noised at fixed
timesteps, these become: the AUROC of the boundary probability against the mask (pooled over every
pixel of every image; 0.5 = no better than chance), the fraction of grid positions kept, and the
Spearman correlation of each image's kept fraction with the noise level (negative: fewer tokens at
higher noise). Both maps come from the tokenizer's optional protocol (``boundary_probability``,
``token_map``); a tokenizer without a router has neither.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata, spearmanr


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count one half); NaN if one class is absent.

    The Mann-Whitney form: the probability that a random positive outscores a random negative.
    """
    s = scores.detach().flatten().double().cpu().numpy()
    y = labels.detach().flatten().bool().cpu().numpy()
    if s.shape != y.shape:
        raise ValueError(f"auroc needs one label per score, got {s.shape} scores and {y.shape} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (NaN when either side is constant)."""
    a, b = x.detach().flatten().double().cpu().numpy(), y.detach().flatten().double().cpu().numpy()
    if a.shape != b.shape:
        raise ValueError(f"spearman needs paired values, got {a.shape} and {b.shape}")
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def router_maps(model, info) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(boundary probability (B, H, W) float, kept tokens (B, H, W) bool) of one forward; None where absent."""
    p = model.tokenizer.boundary_probability(info.state)
    kept = model.tokenizer.token_map(info.state)
    return (None if p is None else p.detach().float()), (None if kept is None else kept.detach())


@torch.no_grad()
def has_router(model) -> bool:
    """Whether the model's tokenizer reports a boundary probability (one forward of a blank image)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = torch.zeros(1, model.in_channels, model.input_size, model.input_size, device=device)
        zero = torch.zeros(1, dtype=torch.long, device=device)
        with own_rng(device):  # a random router must not move the caller's RNG
            _, info = model(x, zero, zero, return_info=True)
        return router_maps(model, info)[0] is not None
    finally:
        model.train(was_training)


def own_rng(device: torch.device):
    """A context in which draws from the global RNG (CPU, and this CUDA device) leave the caller's state alone."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def masks_on_grid(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Detail masks (B, H, W) on a token grid: a token has detail if any of its pixels has."""
    if tuple(masks.shape[-2:]) == tuple(grid):
        return masks.bool()
    return F.adaptive_max_pool2d(masks[:, None].float(), grid)[:, 0].bool()


def plot_router_maps(images: torch.Tensor, masks: torch.Tensor, p: torch.Tensor, kept: torch.Tensor,
                     timesteps: list[int], scores: dict, path):
    """Rows: held-out images; columns: image, detail mask, then p at each timestep, titled with the
    pooled AUROC and kept fraction at that timestep; each map's own AUROC / kept fraction below it.

    ``p`` and ``kept`` are (T, B, H, W); ``scores`` maps ``router_auroc`` / ``kept_fraction`` to {t: value}.
    """
    import matplotlib.pyplot as plt

    from ..report import save_figure

    T, B = p.shape[:2]
    fig, axes = plt.subplots(B, T + 2, figsize=(1.25 * (T + 2), 1.35 * B + 0.4), squeeze=False)
    for r in range(B):
        img = images[r, :3] if images.shape[1] >= 3 else images[r, :1].expand(3, -1, -1)
        axes[r][0].imshow(((img.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
        axes[r][1].imshow(masks[r].numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        for j, t in enumerate(timesteps):
            ax = axes[r][j + 2]
            ax.imshow(p[j, r].numpy(), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            grid_mask = masks_on_grid(masks[r:r + 1], p.shape[-2:])[0]
            ax.set_xlabel(f"{auroc(p[j, r], grid_mask):.2f} / {kept[j, r].float().mean():.2f}", fontsize=6,
                          labelpad=1)
            if r == 0:
                ax.set_title(f"t={t}\nAUROC {scores['router_auroc'][t]:.2f}\nkept {scores['kept_fraction'][t]:.2f}",
                             fontsize=6)
    axes[0][0].set_title("image", fontsize=7)
    axes[0][1].set_title("detail mask (black)", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("boundary probability p on noised held-out images (bright = boundary); below each map: "
                 "its AUROC vs the mask / fraction kept", fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return save_figure(fig, path)
