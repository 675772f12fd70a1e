"""The adaLN-Zero DiT backbone over packed `Tokens`."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import Mlp

from .attention import PackedAttention
from .reducer import Hooks
from .tokens import Tokens


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning; per-sample modulation is gathered onto tokens once."""

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
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c, tokens)
        a = tokens.modulate(self.norm1(h), shift_msa, scale_msa)
        a = hooks.token_op("attention", index, self.attn, a, tokens, h, self) if hooks else self.attn(a, tokens)
        h = tokens.gated_add(h, gate_msa, a)
        m = tokens.modulate(self.norm2(h), shift_mlp, scale_mlp)
        m = hooks.token_op("mlp", index, self.run_mlp, m, tokens, h, self) if hooks else self.mlp(m)
        return tokens.gated_add(h, gate_mlp, m)

    def modulation(self, c: torch.Tensor, tokens: Tokens) -> tuple[torch.Tensor, ...]:
        """adaLN's six vectors per token: shift, 1 + scale, gate for attention, then for the MLP."""
        ada = self.adaLN_modulation(c).unflatten(-1, (6, -1))  # (B, 6, D)
        ada[:, 1::3] += 1  # DiT's x * (1 + scale): the 1 is added per sample, not per token
        return tokens.per_token(ada.flatten(1)).chunk(6, dim=-1)  # one gather per block, whatever the batch

    def run_mlp(self, h: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """The MLP with the (h, tokens) signature of a token hook's op."""
        return self.mlp(h)

    def modulated_input(self, h: torch.Tensor, c: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """The attention branch's adaLN-modulated input (TeaCache's change indicator reads block 0's)."""
        shift_msa, scale_msa = self.modulation(c, tokens)[:2]
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
