"""`DiffusionTransformer`: conditioning + tokenizer + adaLN-Zero backbone (+ reducers)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import gin
import torch
import torch.nn as nn

from .backbone import Backbone
from .layers import LabelEmbedder, TimestepEmbedder
from .registry import REDUCERS, TOKENIZERS
from .tokenizer import Tokenizer


@dataclass
class ForwardInfo:
    """What a forward pass reports besides its prediction; unknown attributes read the tokenizer state."""

    tokens_per_sample: list[int]
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    state: Any = None

    def __getattr__(self, name: str):
        state = self.__dict__.get("state")
        if state is not None and hasattr(state, name):
            return getattr(state, name)
        raise AttributeError(name)


@gin.configurable
class DiffusionTransformer(nn.Module):
    """A DiT whose grid <-> token ends are a tokenizer plugin.

    ``forward(x, t, y, **budget)`` returns the prediction on the input grid (B, C_out, H, W).
    ``compile=True`` takes the compiled path of :mod:`dyncompute.compile` (training and sampling).
    """

    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 4,
        num_classes: int = 1000,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        tokenizer: str | Tokenizer = "patchify",
        reducers: Sequence[str | nn.Module] = (),
        learn_sigma: bool = True,
        class_dropout_prob: float = 0.1,
        compile: bool = False,
    ):
        super().__init__()
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        if isinstance(tokenizer, str):
            tokenizer = TOKENIZERS.build(tokenizer, hidden_size=hidden_size, in_channels=in_channels,
                                         out_channels=self.out_channels, input_size=input_size,
                                         cond_dim=hidden_size)
        self.tokenizer = tokenizer
        self.backbone = Backbone(hidden_size, depth, num_heads, mlp_ratio)
        self.initialize_weights()
        self.reducers = nn.ModuleList(REDUCERS.build(r) if isinstance(r, str) else r for r in reducers)
        for reducer in self.reducers:
            reducer.attach(self)
        if compile:  # the opt-in compiled path (dyncompute.compile)
            from .compile import compile_model

            compile_model(self)

    def initialize_weights(self) -> None:
        """DiT's init in one place, then the tokenizer's own."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.backbone.blocks:
            block.zero_init()
        self.tokenizer.initialize_weights()

    def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.t_embedder(t) + self.y_embedder(y, self.training)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_info: bool = False, **budget):
        self.check_input(x)
        c = self.condition(t, y)
        tokens, state = self.tokenizer.encode(x, c, **budget)
        lengths = list(tokens.lengths)
        tokens = self.backbone(tokens, c)
        out = self.tokenizer.decode(tokens, state, c)
        if not return_info:
            return out
        return out, ForwardInfo(lengths, self.tokenizer.aux_losses(state), state)

    def forward_with_cfg(self, x, t, y, cfg_scale: float, guided_channels: int | None = None,
                         uncond_budget: dict | None = None, return_info: bool = False, **budget):
        """Classifier-free guidance, DiT's batching: ``x`` is [x; x], ``y`` is [labels; null].

        ``guided_channels=3`` reproduces DiT's "guide only the first 3 channels"; ``None`` guides every
        predicted-noise channel. ``uncond_budget`` gives the unconditional half its own budget
        (e.g. Lite-CFG's larger tail drop); budgets become per-sample tensors.
        """
        half = x[: len(x) // 2]
        if uncond_budget is not None:
            budget = _split_budget(budget, uncond_budget, len(half), x.device)
        result = self(torch.cat([half, half]), t, y, return_info=return_info, **budget)  # hooks, compiled path
        out, info = result if return_info else (result, None)
        k = self.in_channels if guided_channels is None else guided_channels
        eps, rest = out[:, :k], out[:, k:]
        cond, uncond = eps.split(len(eps) // 2)
        guided = uncond + cfg_scale * (cond - uncond)
        out = torch.cat([torch.cat([guided, guided]), rest], dim=1)
        return (out, info) if return_info else out

    def check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"model expects input of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")


def _split_budget(cond: dict, uncond: dict, n: int, device) -> dict:
    """Per-sample budget tensors: the first n samples take ``cond``, the last n ``uncond``."""
    merged = {}
    for key in set(cond) | set(uncond):
        a = torch.as_tensor(cond.get(key, 0.0), dtype=torch.float32, device=device).expand(n)
        b = torch.as_tensor(uncond.get(key, 0.0), dtype=torch.float32, device=device).expand(n)
        merged[key] = torch.cat([a, b])
    return merged
