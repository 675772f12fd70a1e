"""`DiffusionTransformer`: conditioning + tokenizer + adaLN-Zero backbone (+ reducers at hook points)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import gin
import torch
import torch.nn as nn

from .backbone import Backbone
from .layers import LabelEmbedder, TimestepEmbedder
from .linear import adopt
from .reducer import ForwardInfo, Hooks, Reducer, StepCache, new_step_cache
from .registry import REDUCERS, TOKENIZERS
from .tokenizer import Tokenizer

__all__ = ["DiffusionTransformer", "ForwardInfo", "ModelConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """A model's configuration as data: what accounting, matching and checkpoint export read."""

    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    tokenizer: str = "patchify"
    tokenizer_kwargs: dict = field(default_factory=dict)  # settings beyond the gin-bound ones
    reducers: tuple = ()

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def build(self) -> DiffusionTransformer:
        """The one builder: every model (gin, official checkpoints, matched baselines) is made here."""
        return DiffusionTransformer(**asdict(self))

    def replace(self, **changes) -> ModelConfig:
        return ModelConfig(**{**asdict(self), **changes})


@gin.configurable
class DiffusionTransformer(nn.Module):
    """A DiT whose grid <-> token ends are a tokenizer plugin, with reducers at declared hook points.

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
        reducers: Sequence[str | Reducer] = (),
        learn_sigma: bool = True,
        class_dropout_prob: float = 0.1,
        tokenizer_kwargs: dict | None = None,
        compile: bool = False,
    ):
        super().__init__()
        self.config = ModelConfig(input_size, in_channels, num_classes, hidden_size, depth, num_heads, mlp_ratio,
                                  learn_sigma, class_dropout_prob,
                                  tokenizer if isinstance(tokenizer, str) else type(tokenizer).__name__,
                                  dict(tokenizer_kwargs or {}),
                                  tuple(r if isinstance(r, str) else type(r).__name__ for r in reducers))
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        self.learn_sigma = learn_sigma
        self.out_channels = self.config.out_channels
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        if isinstance(tokenizer, str):
            tokenizer = TOKENIZERS.build(tokenizer, hidden_size=hidden_size, in_channels=in_channels,
                                         out_channels=self.out_channels, input_size=input_size,
                                         cond_dim=hidden_size, **(tokenizer_kwargs or {}))
        self.tokenizer = tokenizer
        self.backbone = Backbone(hidden_size, depth, num_heads, mlp_ratio)
        self.initialize_weights()
        self.reducers = nn.ModuleList(_build_reducer(r) for r in reducers)
        names = [r.name or type(r).__name__ for r in self.reducers]
        if len(set(names)) < len(names):  # reports and the accounting key reducers by name
            raise ValueError(f"reducers must be listed once each, got {names}")
        for reducer in self.reducers:
            reducer.check_model(self)
            reducer.bind(self)
        adopt(self)  # every dense layer through the fast CPU matmul (dyncompute.linear)
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

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_info: bool = False,
                step_cache: StepCache | None = None, **budget):
        """Prediction on the input grid; ``step_cache`` carries the reducers' trajectory state."""
        self.check_input(x)
        if step_cache is not None:
            step_cache.advance()
        c = self.condition(t, y)
        tokens, state = self.tokenizer.encode(x, c, **({"t": t} if self.tokenizer.timestep_aware else {}), **budget)
        hooks = Hooks(self.reducers, step_cache, t, c) if len(self.reducers) else None
        ran = []

        def backbone(tokens_):
            ran.append(True)
            return self.backbone(tokens_, c, hooks)

        def to_grid(tokens_):
            return self.tokenizer.to_grid(tokens_, state, c)

        def backbone_to_grid() -> torch.Tensor:
            return to_grid(backbone(tokens))

        h = hooks.step(backbone_to_grid, tokens, state, self, backbone, to_grid) if hooks else backbone_to_grid()
        out = self.tokenizer.head(h, state, c)
        if not return_info:
            return out
        aux = {**self.tokenizer.aux_losses(state), **(hooks.aux_losses() if hooks else {})}
        return out, ForwardInfo(list(tokens.lengths), aux, state, bool(ran),
                                hooks.runs if hooks else [], hooks.reports() if hooks else {}, budget)

    def new_step_cache(self, num_evaluations: int | None = None) -> StepCache:
        """Trajectory state for this model's reducers: allocate one per sampling call."""
        return new_step_cache(self.reducers, num_evaluations)

    def forward_with_cfg(self, x, t, y, cfg_scale: float, guided_channels: int | None = None,
                         uncond_budget: dict | None = None, return_info: bool = False,
                         step_cache: StepCache | None = None, **budget):
        """Classifier-free guidance, DiT's batching: ``x`` is [x; x], ``y`` is [labels; null].

        ``guided_channels=3`` reproduces DiT's "guide only the first 3 channels"; ``None`` guides every
        predicted-noise channel. ``uncond_budget`` gives the unconditional half its own budget
        (e.g. Lite-CFG's larger tail drop); budgets become per-sample tensors.
        """
        half = x[: len(x) // 2]
        if uncond_budget is not None:
            budget = _split_budget(budget, uncond_budget, len(half), x.device)
        if step_cache is not None:
            budget["step_cache"] = step_cache
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


def _build_reducer(reducer: str | Reducer) -> Reducer:
    if isinstance(reducer, Reducer):
        return reducer
    built = REDUCERS.build(reducer)
    built.name = reducer
    return built


def _split_budget(cond: dict, uncond: dict, n: int, device) -> dict:
    """Per-sample budget tensors: the first n samples take ``cond``, the last n ``uncond``."""
    merged = {}
    for key in set(cond) | set(uncond):
        a = torch.as_tensor(cond.get(key, 0.0), dtype=torch.float32, device=device).expand(n)
        b = torch.as_tensor(uncond.get(key, 0.0), dtype=torch.float32, device=device).expand(n)
        merged[key] = torch.cat([a, b])
    return merged
