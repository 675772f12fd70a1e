"""The convolutional ends of the scaffold: Stable-Diffusion style ResBlocks at width D / factor."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from dyncompute.layers import RMSNorm


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the official group count when it divides the width (tiny models: the gcd)."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv -> + conditioning bias -> GroupNorm -> SiLU -> 3x3 conv, plus skip.

    The inner width is min(in, out); a 1x1 skip projection appears when the width changes.
    """

    def __init__(self, in_dim: int, out_dim: int, cond_dim: int):
        super().__init__()
        inner = min(in_dim, out_dim)
        self.norm1 = group_norm(in_dim)
        self.conv1 = nn.Conv2d(in_dim, inner, 3, padding=1)
        self.cond_proj = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, inner))
        self.norm2 = group_norm(inner)
        self.conv2 = nn.Conv2d(inner, out_dim, 3, padding=1)
        self.skip_proj = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.cond_proj(c)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.skip_proj is None else self.skip_proj(x))


class ConvStack(nn.Module):
    """ResBlocks then an RMSNorm over channels; returns raster-order tokens (B, H*W, out_dim).

    The encoder widens in its last block (``widen="last"``), the decoder narrows in its first.
    """

    def __init__(self, in_dim: int, out_dim: int, depth: int, cond_dim: int, widen: str = "last"):
        super().__init__()
        if depth < 1:
            raise ValueError(f"a conv stack needs depth >= 1, got {depth}")
        if widen not in ("last", "first"):
            raise ValueError(f"widen must be 'last' (encoder) or 'first' (decoder), got {widen!r}")
        dims = [in_dim] * depth + [out_dim] if widen == "last" else [in_dim] + [out_dim] * depth
        self.blocks = nn.ModuleList(ResBlock(dims[i], dims[i + 1], cond_dim) for i in range(depth))
        self.norm = RMSNorm(out_dim, eps=1e-5)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, c)
        return self.norm(rearrange(x, "b d h w -> b (h w) d"))
