"""De-chunkers: backbone outputs on kept tokens (packed) -> one vector per grid position (B, L, D).

- ``gaussian_nearest`` (DC-DiT): confidence-weighted Gaussian smoothing over the kept tokens in 2-D,
  then every grid position copies its nearest kept token.
- ``ema_raster`` (H-Net): EMA over the kept tokens in raster order, each position repeats the last
  kept token at or before it.
- ``nearest`` (ablation, "no smoothing"): every grid position copies its nearest kept token.
Both run in float32 on the padded (B, M, ...) layout of the kept tokens; the result of a sample never
depends on the other samples of the batch.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dyncompute.registry import Registry
from dyncompute.tokens import Tokens

from .chunking import nearest_kept, pad_all, pad_packed, previous_kept, sq_distances

DECHUNKERS = Registry("dechunkers")
P_CLAMP = 1e-4  # official clamp of p inside the de-chunk
# Gaussian weights below exp(-FAR) are set to 0: times p >= P_CLAMP they would be subnormal floats, which x86
# computes ~5x slower (exp on DC-DiT-S's 8 x 283 x 283 pairs: 7.4 vs 1.5 ms), and next to a token's own
# weight (>= P_CLAMP) they are ~1e-30 of the sum, far below float32 resolution
FAR = 78.0


class Dechunker(nn.Module):
    """``forward(z packed (T, D), tokens, p (B, L), mask (B, L), grid) -> (B, L, D)``."""

    def __init__(self, sigma: float = 1.0):
        super().__init__()
        self.sigma = sigma

    @staticmethod
    def kept_p(p: torch.Tensor, tokens: Tokens, width: int) -> torch.Tensor:
        """p (B, L) of the kept tokens, packed (T,), clamped, read at the tokens' own positions (p[mask]
        would wait for the GPU to count the mask)."""
        rows = tokens.batch * p.shape[1] + tokens.pos[:, 0] * width + tokens.pos[:, 1]
        return p.float().clamp(P_CLAMP, 1 - P_CLAMP).flatten()[rows]


@DECHUNKERS.register("gaussian_nearest")
class GaussianNearest(Dechunker):
    """out_i = p_i z_i + (1 - p_i) sum_j w_ij z_j, w_ij ∝ p_j exp(-|pos_i - pos_j|^2 / 2 sigma^2)."""

    def forward(self, z, tokens: Tokens, p, mask, grid):
        (zp, pk, pos), _ = pad_all(tokens, z.float(), self.kept_p(p, tokens, grid[1]), tokens.pos)
        # log weights -|pos_i - pos_j|^2 / 2 sigma^2, far pairs (FAR) at -inf; padding has pk = 0, so weight 0
        logits = F.threshold(sq_distances(pos, pos).mul_(-0.5 / self.sigma ** 2), -FAR, float("-inf"))
        w = logits.exp_().mul_(pk[:, None])
        w = w.mul_((1 - pk[..., None]) / (w.sum(-1, keepdim=True) + 1e-8))  # rows: (1 - p_i) w_ij / sum_j w_ij
        out = torch.baddbmm(pk[..., None] * zp, w, zp)  # p_i z_i + (1 - p_i) smoothed_i
        return _gather_rows(out, nearest_kept(mask, grid[1], tokens.max_len))


@DECHUNKERS.register("ema_raster")
class EmaRaster(Dechunker):
    """h_j = p_j z_j + (1 - p_j) h_{j-1} over kept tokens in raster order (closed form, one bmm)."""

    def forward(self, z, tokens: Tokens, p, mask, grid):
        (zp, pk), valid = pad_all(tokens, z.float(), self.kept_p(p, tokens, grid[1]))
        decay = torch.log1p(-pk).masked_fill(~valid, 0.0).cumsum(1)  # A_j = sum_{k<=j} log(1 - p_k)
        M = zp.shape[1]
        causal = torch.ones(M, M, dtype=torch.bool, device=z.device).tril()
        log_w = decay[:, :, None] - decay[:, None]
        w = torch.exp(log_w.masked_fill(~causal | (log_w < -FAR), float("-inf"))) * pk[:, None]  # FAR: as above
        return _gather_rows(torch.bmm(w, zp), previous_kept(mask))


@DECHUNKERS.register("nearest")
class Nearest(Dechunker):
    """The smoothing ablation: ``gaussian_nearest`` without the confidence-weighted smoothing."""

    def forward(self, z, tokens: Tokens, p, mask, grid):
        return nearest_plug_back(z.float(), tokens, mask, grid[1])


def nearest_plug_back(z: torch.Tensor, tokens: Tokens, mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, L, D): every pixel takes its nearest kept token's row of the packed ``z`` (T, D), as it is."""
    return _gather_rows(pad_packed(z, tokens)[0], nearest_kept(mask, width, tokens.max_len))


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))
