"""DyDiT's FLOPs-constrained loss: the share of the blocks' attention and MLP MACs that ran, pulled to λ.

Per sample with L backbone tokens (its own length: packed DC-DiT tokens differ per sample), a block's
attention costs 4·L·D² (Q, K, V, output projection) + 2·L²·D (QKᵀ, AV) MACs, proportional to the heads
that run, and its MLP 2·L·D·D_mlp, proportional to the channel groups that run and to the tokens that
pass the token gate. The ratio (what ran / full, over all blocks, per sample) is computed from the hard
decisions (their straight-through gradients reach the gates), as DyDiT does, so it is the ratio the
model runs at; the loss is ``weight · (mean ratio - λ)²``. The accounting never uses these formulas:
it counts what ran with fvcore (:mod:`dyncompute.flops`).
"""
from __future__ import annotations

import torch

from dyncompute.errors import ConfigError


def check_target(target) -> None:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < float(target) <= 1:
        raise ConfigError(f"reducers.dydit.target (the FLOPs ratio λ) must lie in (0, 1], got {target!r}")


def block_macs(lengths: torch.Tensor, hidden: int, mlp_hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width attention and MLP MACs of one block per sample, from its token counts (B,)."""
    L = lengths.float()
    return 4 * L * hidden**2 + 2 * L**2 * hidden, 2 * L * hidden * mlp_hidden


def flops_ratio(blocks: list[dict], hidden: int, mlp_hidden: int) -> torch.Tensor:
    """(B,) MACs that ran / full-width MACs over the blocks; each block's record holds ``lengths`` (B,),
    ``heads`` (B, H), ``channels`` (B, G) decisions and ``tokens`` (B,) the share passing the gate."""
    ran = full = 0
    for b in blocks:
        attn, mlp = block_macs(b["lengths"], hidden, mlp_hidden)
        ran = ran + attn * b["heads"].mean(1) + mlp * b["channels"].mean(1) * b["tokens"]
        full = full + attn + mlp
    return ran / full


def flops_loss(ratio: torch.Tensor, target: float, weight: float) -> torch.Tensor:
    return weight * (ratio.mean() - target) ** 2
