"""Boundary rules, tail dropping, and the chunk / plug-back index maths on the raster grid."""
from __future__ import annotations

import torch

from dyncompute.tokens import Tokens


class STE(torch.autograd.Function):
    """Straight-through estimator: forward ones, backward passes the gradient to the confidence."""

    @staticmethod
    def forward(ctx, x):
        return torch.ones_like(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def boundary_rules(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First and last tokens are boundaries (p := 1); p > 0.5 is a boundary; confidence max(p, 1-p).

    Returns (p, mask, confidence), all (B, L).
    """
    ends = torch.zeros_like(p, dtype=torch.bool)
    ends[:, 0] = ends[:, -1] = True
    p = torch.where(ends, torch.ones_like(p), p)
    mask = p > 0.5
    return p, mask, torch.where(mask, p, 1 - p)


def check_tail_drop(rho) -> None:
    values = rho.detach().float() if torch.is_tensor(rho) else torch.tensor(float(rho))
    if values.numel() and (values.min() < 0 or values.max() >= 1 or torch.isnan(values).any()):
        raise ValueError(f"tail_drop must lie in [0, 1), got {rho}")


def drop_tail(p: torch.Tensor, mask: torch.Tensor, rho) -> torch.Tensor:
    """Drop the floor(rho * |B|) boundaries with the lowest p of each sample; rho: float or (B,)."""
    if not torch.is_tensor(rho) and rho == 0:
        return mask
    frac = rho.to(p.device, torch.float32).reshape(-1, 1) if torch.is_tensor(rho) else float(rho)
    n_drop = (mask.sum(-1, keepdim=True).float() * frac).long()
    order = p.float().masked_fill(~mask, float("inf")).argsort(dim=-1, stable=True)
    ranks = order.argsort(dim=-1, stable=True)
    return mask & ~(ranks < n_drop)


def chunk(h: torch.Tensor, mask: torch.Tensor, pos_embed: torch.Tensor, width: int) -> Tokens:
    """Keep boundary tokens of h (B, L, D) in raster order, add their original-position embedding."""
    B, L = mask.shape
    rows = mask.flatten().nonzero().squeeze(1)  # the one wait for the GPU: how many tokens are kept
    flat = rows % L  # raster index of every kept token, sample after sample
    pos = torch.stack([flat // width, flat % width], dim=1)
    counts = mask.sum(1)
    return Tokens.from_lengths(h.flatten(0, 1)[rows] + pos_embed[flat].to(h.dtype), counts.tolist(), pos, counts)


def pad_packed(x: torch.Tensor, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (T, ...) -> padded (B, M, ...) and its validity mask (B, M)."""
    (out,), valid = pad_all(tokens, x)
    return out, valid


def pad_all(tokens: Tokens, *xs: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`pad_packed` of several packed tensors of the same tokens, with one set of indices."""
    B, M, T = tokens.num_samples, tokens.max_len, tokens.x.shape[0]
    device = tokens.cu_seqlens.device
    # indices from the device's cu_seqlens: no host-to-device copy or boolean indexing, so no wait for the GPU
    valid = torch.arange(M, device=device)[None] < tokens.cu_seqlens.diff()[:, None]
    slot = tokens.batch * M + torch.arange(T, device=device) - tokens.cu_seqlens[tokens.batch]
    padded = []
    for x in xs:
        out = x.new_zeros((B * M,) + tuple(x.shape[1:]))
        out[slot] = x
        padded.append(out.unflatten(0, (B, M)))
    return padded, valid


def nearest_kept(mask: torch.Tensor, width: int, max_len: int | None = None) -> torch.Tensor:
    """(B, L) index, among each sample's kept tokens (raster order), of every grid position's nearest
    kept token by Euclidean distance; ties go to the earlier raster index. ``max_len``: the most tokens a
    sample kept, when known (counting it waits for the GPU)."""
    B, L = mask.shape
    idx = torch.arange(L, device=mask.device)
    counts = mask.sum(1, keepdim=True)
    M = int(counts.max()) if max_len is None else max_len
    order = torch.where(mask, idx[None], L + idx[None]).argsort(dim=1)[:, :M]  # kept first, raster order
    valid = torch.arange(M, device=mask.device)[None] < counts
    grid = torch.stack([idx // width, idx % width], -1)
    return sq_distances(grid.expand(B, L, 2), grid[order], valid).argmin(dim=2)


def sq_distances(a: torch.Tensor, b: torch.Tensor, b_valid: torch.Tensor | None = None) -> torch.Tensor:
    """|a_i - b_j|^2 (B, n, m) of integer grid coordinates a (B, n, 2), b (B, m, 2), as one batched matmul
    of [a, |a|^2, 1] and [-2b, 1, |b|^2] (one pass over the result instead of five). Every term is an integer
    far below 2^24, so float32 is exact; a reduced-precision matmul (TF32, bfloat16) would not be, so then the
    product runs in float64. Columns where ``b_valid`` (B, m) is False get a distance of ~1e30."""
    dtype = torch.float32 if torch.get_float32_matmul_precision() == "highest" else torch.float64
    a, b = a.to(dtype), b.to(dtype)
    a_sq, b_sq = a.square().sum(-1, keepdim=True), b.square().sum(-1, keepdim=True)
    if b_valid is not None:
        b_sq = b_sq.masked_fill(~b_valid[..., None], 1e30)
    lhs = torch.cat([a, a_sq, torch.ones_like(a_sq)], -1)
    rhs = torch.cat([-2 * b, torch.ones_like(b_sq), b_sq], -1)
    return torch.bmm(lhs, rhs.transpose(1, 2)).float()


def previous_kept(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) index of the last kept token at or before each raster position (the first is kept)."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)
