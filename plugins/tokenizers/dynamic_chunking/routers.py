"""Routers: score every grid token with a boundary probability p (B, L).

A router only scores; the boundary rules (first and last token always boundaries, p > 0.5 is a
boundary, confidence max(p, 1 - p), tail dropping) live in `chunking` and are shared by all routers.
- ``predictability`` (DC-DiT v2): how badly a token's 3x3 context predicts it.
- ``cosine`` (DC-DiT v1): H-Net's cosine dissimilarity between a token and its neighbourhood mean.
- ``random`` (ablation): boundaries drawn at rate 1/N, no learning.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from dyncompute.registry import Registry

from .encoder import group_norm

ROUTERS = Registry("routers")


class Router(nn.Module):
    """Base class: ``forward(h (B, L, D), grid=(H, W)) -> p (B, L)`` in float32."""

    def __init__(self, dim: int, target_ratio: float = 4.0):
        super().__init__()
        self.dim, self.target_ratio = dim, target_ratio

    def initialize_weights(self) -> None:
        """Router-specific init, run after the model's generic (DiT) init."""


@ROUTERS.register("predictability")
class PredictabilityRouter(Router):
    """Local predictability: project to D/4, predict each token from its 3x3 context, score the residual."""

    def __init__(self, dim: int, target_ratio: float = 4.0, init_bias: float = -1.1):
        super().__init__(dim, target_ratio)
        bottleneck = dim // 4
        self.init_bias = init_bias
        self.proj = nn.Conv2d(dim, bottleneck, 1)
        self.context_predictor = nn.Conv2d(bottleneck, bottleneck, 3, padding=1)
        self.residual_scorer = nn.Sequential(
            nn.Conv2d(bottleneck, bottleneck, 3, padding=1),
            group_norm(bottleneck, 8),
            nn.SiLU(),
            nn.Conv2d(bottleneck, 1, 1),
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        nn.init.constant_(self.residual_scorer[-1].bias, self.init_bias)

    def forward(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.proj(rearrange(h.float(), "b (r c) d -> b d r c", r=grid[0], c=grid[1]))
        residual = x - self.context_predictor(x)
        return torch.sigmoid(self.residual_scorer(residual).flatten(1))


@ROUTERS.register("cosine")
class CosineRouter(Router):
    """H-Net's router on the grid: p = (1 - cos(W_q h, W_k mean_3x3(h))) / 2.

    The key is a learnable 3x3 neighbourhood mean (one kernel shared by all channels, initialised to
    the uniform average of the 8 neighbours); W_q and W_k start as the identity, as in H-Net.
    """

    def __init__(self, dim: int, target_ratio: float = 4.0):
        super().__init__(dim, target_ratio)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.neighbour_mean = nn.Parameter(torch.empty(1, 1, 3, 3))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        with torch.no_grad():
            self.q_proj.weight.copy_(torch.eye(self.dim))
            self.k_proj.weight.copy_(torch.eye(self.dim))
            self.neighbour_mean.fill_(1 / 8)
            self.neighbour_mean[..., 1, 1] = 0.0

    def forward(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h = h.float()
        B, L, D = h.shape
        planes = rearrange(h, "b (r c) d -> (b d) 1 r c", r=grid[0], c=grid[1])
        context = rearrange(F.conv2d(planes, self.neighbour_mean, padding=1), "(b d) 1 r c -> b (r c) d", b=B)
        cos = F.cosine_similarity(self.q_proj(h), self.k_proj(context), dim=-1)
        return ((1 - cos) / 2).clamp(0.0, 1.0)


@ROUTERS.register("random")
class RandomRouter(Router):
    """Ablation: each token is a boundary with probability 1/N; p is a monotone map of the draw u."""

    def forward(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        rate = 1.0 / self.target_ratio
        u = torch.rand(h.shape[:2], device=h.device)
        # u < rate  <=>  p > 0.5; lower draws are more confident boundaries (tail drop order).
        return torch.where(u < rate, 1 - 0.5 * u / rate, 0.5 * (1 - u) / (1 - rate))
