"""DC-DiT's ratio loss (H-Net's Switch-style load balancing toward a target compression N)."""
from __future__ import annotations

import torch


def check_target_ratio(N: float) -> None:
    if not N > 1:
        raise ValueError(f"target_ratio N must be > 1 (e.g. 4 or 16), got {N}")


def ratio_loss(p: torch.Tensor, mask: torch.Tensor, N: float, group_size: int | None = None) -> torch.Tensor:
    """N/(N-1) * ((1-F)(1-G) + (N-1) F G) with F the kept fraction (pre-drop mask, no gradient) and
    G the mean boundary probability; equals 1 at F = G = 1/N. ``group_size`` averages the loss over
    groups of that many samples (the official ``ratio_batch_size``) when it divides the batch."""
    check_target_ratio(N)
    B = p.shape[0]
    g = group_size if group_size and B % group_size == 0 else B
    F = mask.float().reshape(B // g, -1).mean(-1)
    G = p.float().reshape(B // g, -1).mean(-1)
    return ((N / (N - 1)) * ((1 - F) * (1 - G) + (N - 1) * F * G)).mean()
