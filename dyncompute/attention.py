"""Self-attention over packed `Tokens`.

Dispatch (DESIGN.md): equal-length tokens take one fused SDPA call on (B, H, L, d); variable-length
tokens use flash-attn's varlen kernel when it is installed on CUDA, else a per-sample SDPA loop
(measured on CPU: padded+masked SDPA ~2x and nested tensors ~10-25x slower than the loop).

``log_size`` (optional, one value per token) adds a bias to every key's logit: ToMe's proportional
attention, softmax(q k^T / sqrt(d) + log s), where s is how many tokens a merged key stands for.
The bias is elementwise (0 MACs); the biased path is plain SDPA (flash-attn's varlen kernel takes no bias).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention

from .tokens import Tokens

try:  # optional CUDA kernel
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: Tokens,
                     key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention within each sample of packed q, k, v (T, H, d); ``key_bias`` (T,) is added to every
    key's logit; returns (T, H, d)."""
    fast = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and key_bias is None
    if flash_attn_varlen_func is not None and fast:
        cu = tokens.cu_seqlens.to(torch.int32)
        n = max(tokens.lengths)
        return flash_attn_varlen_func(q, k, v, cu, cu, n, n)
    lengths = list(tokens.lengths)
    biases = torch.split(key_bias.to(q.dtype), lengths) if key_bias is not None else [None] * len(lengths)
    outs = []
    for qs, ks, vs, bs in zip(*(torch.split(t, lengths) for t in (q, k, v)), biases):
        mask = None if bs is None else bs.view(1, 1, -1)
        o = F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1), attn_mask=mask)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


class PackedAttention(Attention):
    """timm's multi-head self-attention (same parameters, same key names) run on `Tokens`."""

    def forward(self, h: torch.Tensor, tokens: Tokens, log_size: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if tokens.uniform:  # h: (B, L, D) -> timm's fused path
            if log_size is None:
                return super().forward(h)
            return super().forward(h, attn_mask=log_size.to(h.dtype).view(h.shape[0], 1, 1, h.shape[1]))
        T = h.shape[0]
        q, k, v = self.qkv(h).view(T, 3, self.num_heads, self.head_dim).unbind(1)
        o = varlen_attention(self.q_norm(q), self.k_norm(k), v, tokens, log_size)
        return self.proj_drop(self.proj(self.norm(o.reshape(T, self.attn_dim))))
