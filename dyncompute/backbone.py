"""The adaLN-Zero DiT backbone over packed `Tokens`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.layers import Mlp

from .attention import PackedAttention
from .reducer import Hooks
from .tokens import Tokens


@dataclass
class Branch:
    """One residual branch of a DiT block as an op of the block input: ``op(modulate(norm(x)))``.

    A token hook receives the branch and the block input, so a cache that answers for the op skips the
    norm and modulation too (as FORA and TaylorSeer do), and token merging merges the block input (ToMe's
    residual stream) before the norm. ``prepare`` gives the op's own input (e.g. for ToMe's keys).
    """

    norm: nn.Module
    op: Callable[..., torch.Tensor]
    shift: torch.Tensor
    scale: torch.Tensor

    def prepare(self, x: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        return tokens.modulate(self.norm(x), self.shift, self.scale)

    def __call__(self, x: torch.Tensor, tokens: Tokens, **kw) -> torch.Tensor:
        return self.op(self.prepare(x, tokens), tokens, **kw)


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning; per-sample modulation is gathered onto tokens."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = PackedAttention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, h: torch.Tensor, c: torch.Tensor, tokens: Tokens, hooks: Hooks | None = None,
                index: int = 0) -> torch.Tensor:
        """h: ``tokens.batched()`` layout; c: (B, D) conditioning; reducers run at ``hooks``."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        attention = Branch(self.norm1, self.attn, shift_msa, scale_msa)
        mlp = Branch(self.norm2, self.run_mlp, shift_mlp, scale_mlp)
        a = hooks.token_op("attention", index, attention, h, tokens, self, attention.prepare) if hooks else \
            attention(h, tokens)
        h = tokens.gated_add(h, gate_msa, a)
        m = hooks.token_op("mlp", index, mlp, h, tokens, self, mlp.prepare) if hooks else mlp(h, tokens)
        return tokens.gated_add(h, gate_mlp, m)

    def run_mlp(self, h: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """The MLP with the (h, tokens) signature of a token hook's op."""
        return self.mlp(h)

    def modulated_input(self, h: torch.Tensor, c: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """The attention branch's adaLN-modulated input (TeaCache's change indicator reads block 0's)."""
        shift_msa, scale_msa = self.adaLN_modulation(c).chunk(6, dim=-1)[:2]
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
