"""The adaLN-Zero DiT backbone over packed `Tokens`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import width
from .attention import PackedAttention
from .layers import LayerNorm
from .linear import Mlp
from .reducer import Hooks
from .tokens import Tokens


@dataclass
class Branch:
    """One residual branch of a DiT block as an op of the block input: ``op(modulate(norm(x)))``.

    A token hook receives the branch and the block input, so a cache that answers for the op skips the
    norm and modulation too (as FORA and TaylorSeer do), and token merging merges the block input (ToMe's
    residual stream) before the norm. ``prepare`` gives the op's own input (e.g. for ToMe's keys).
    The shift and scale are per sample, so tokens merged by a reducer are modulated like the block's own.
    """

    norm: nn.Module
    op: Callable[..., torch.Tensor]
    shift: torch.Tensor  # (B, D)
    scale: torch.Tensor  # (B, D), 1 + scale

    def prepare(self, x: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        return tokens.modulate(self.norm(x), self.shift, self.scale)

    def __call__(self, x: torch.Tensor, tokens: Tokens, **kw) -> torch.Tensor:
        return self.op(self.prepare(x, tokens), tokens, **kw)


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = LayerNorm(hidden_size)
        self.attn = PackedAttention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = LayerNorm(hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.register_buffer("one_at_scale", torch.tensor([0, 1, 0, 0, 1, 0.0]).view(6, 1), persistent=False)

    def forward(self, h: torch.Tensor, c: torch.Tensor, tokens: Tokens, hooks: Hooks | None = None,
                index: int = 0) -> torch.Tensor:
        """h: ``tokens.batched()`` layout; c: (B, D) conditioning; reducers run at ``hooks``."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_vectors(c).unbind(1)  # (B, D) each
        attention = Branch(self.norm1, self.attn, shift_msa, scale_msa)
        mlp = Branch(self.norm2, self.run_mlp, shift_mlp, scale_mlp)
        a = hooks.token_op("attention", index, attention, h, tokens, self, attention.prepare) if hooks else \
            attention(h, tokens)
        h = tokens.gated_add(h, gate_msa, a)
        m = hooks.token_op("mlp", index, mlp, h, tokens, self, mlp.prepare) if hooks else mlp(h, tokens)
        return tokens.gated_add(h, gate_mlp, m)

    def adaLN_vectors(self, c: torch.Tensor) -> torch.Tensor:
        """adaLN's six per-sample vectors (B, 6, D): shift, 1 + scale, gate for attention, then the MLP."""
        # DiT's x * (1 + scale): the 1 is added per sample, not per token, and out of place (an in-place add
        # on the strided scale rows costs a copy of the whole tensor in the backward)
        ada = self.adaLN_modulation(c).unflatten(-1, (6, -1))
        return ada + self.one_at_scale.to(ada.dtype)

    def run_mlp(self, h: torch.Tensor, tokens: Tokens, active: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP with the (h, tokens) signature of a token hook's op; ``active`` (B, G), optional: the
        hidden-channel groups each sample runs (`dyncompute.width`)."""
        return self.mlp(h) if active is None else width.mlp(self.mlp, h, tokens, active)

    def modulated_input(self, h: torch.Tensor, c: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """The attention branch's adaLN-modulated input (TeaCache's change indicator reads block 0's)."""
        shift_msa, scale_msa = self.adaLN_vectors(c)[:, :2].unbind(1)
        return tokens.modulate(self.norm1(h), shift_msa, scale_msa)

    def zero_init(self) -> None:
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)


class Backbone(nn.Module):
    """A stack of DiT blocks; sees only tokens and the conditioning vector, never the grid."""

    def __init__(self, hidden_size: int, depth: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))

    def forward(self, tokens: Tokens, c: torch.Tensor, hooks: Hooks | None = None) -> Tokens:
        h = tokens.batched()
        for i, block in enumerate(self.blocks):
            h = block(h, c, tokens, hooks, i)
        return tokens.with_x(h.reshape(tokens.x.shape))
