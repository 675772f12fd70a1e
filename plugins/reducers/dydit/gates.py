"""DyDiT's gates: hard 0/1 decisions whose gradient is a sigmoid's (straight-through estimator).

Training adds logistic noise (the difference of two Gumbels) to the logits, scaled by ``noise``; the
trainer anneals ``noise`` to 0 (`DyDiT.schedule`), so the last fine-tuning steps take the very decisions
inference takes (logit > 0) and the FLOPs loss constrains what will actually run.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dyncompute.layers import TimestepEmbedder


def gumbel_sigmoid(logits: torch.Tensor, tau: float, noise: float, training: bool) -> torch.Tensor:
    """Decisions ``noisy logits > 0`` (exactly 0 or 1) carrying the gradient of sigmoid(noisy logits / tau)
    in training; ``logits > 0`` without gradient at inference. All-on gates reproduce the ungated model."""
    if not training:
        return (logits > 0).to(logits.dtype)
    if noise:
        u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
        logits = logits + noise * (torch.log(u) - torch.log1p(-u))
    soft = torch.sigmoid(logits / tau)
    hard = (logits > 0).to(logits.dtype)
    return hard + (soft - soft.detach())


class WidthRouter(nn.Module):
    """TDW: per step, on/off for G - 1 groups (heads or MLP channel groups) from the timestep's
    sinusoidal embedding; the first group is always on. It depends on t alone, so a sampler's
    decisions at a step are the same for every image."""

    def __init__(self, groups: int, frequency_size: int = 256, bias_init: float = 2.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.linear = nn.Linear(frequency_size, groups - 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.constant_(self.linear.bias, bias_init)  # every group on: the DiT it starts from

    def forward(self, t: torch.Tensor, tau: float, noise: float) -> torch.Tensor:
        """(B,) timesteps -> (B, G) decisions, column 0 always 1."""
        freq = TimestepEmbedder.timestep_embedding(t, self.frequency_size).to(self.linear.weight.dtype)
        gates = gumbel_sigmoid(self.linear(freq), tau, noise, self.training)
        return torch.cat([torch.ones_like(gates[:, :1]), gates], dim=1)


class TokenGate(nn.Module):
    """SDT: per token of the residual stream after attention, whether it runs the MLP (D -> D/16 -> 1)."""

    def __init__(self, hidden_size: int, bias_init: float = 2.0):
        super().__init__()
        inner = max(4, hidden_size // 16)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, inner), nn.ReLU(), nn.Linear(inner, 1))
        nn.init.constant_(self.mlp[-1].bias, bias_init)

    def forward(self, h: torch.Tensor, tau: float, noise: float) -> torch.Tensor:
        """h (..., D) -> (...) decisions."""
        return gumbel_sigmoid(self.mlp(h).squeeze(-1), tau, noise, self.training)
