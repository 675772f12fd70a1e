"""The tokenizer plugin interface: owns the grid -> tokens and tokens -> grid ends of a model.

Everything the framework may ask of a tokenizer is declared here with a default, so the core never
probes a plugin with ``getattr``: budgets, the accounting's component names, where the tokens sit on
the grid, and the training-time budget schedule.
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
import torch.nn as nn

from .tokens import Tokens


class Tokenizer(nn.Module, abc.ABC):
    """Base class of tokenizer plugins (static patchify, dynamic chunking, ...).

    A tokenizer is built by the model with the keyword arguments ``hidden_size``, ``in_channels``,
    ``out_channels``, ``input_size`` and ``cond_dim``; everything else is its own (gin-bound) setting.
    Budget keywords given to ``DiffusionTransformer.forward`` (e.g. ``tail_drop``) reach ``encode``; a
    tokenizer whose ``timestep_aware`` is True also gets the diffusion timesteps there, as ``t`` (B,).

    Decoding is split in two so that step-level reducers can cache on the grid, whatever the tokens:
    ``to_grid`` brings the backbone's tokens back to one feature vector per grid position, ``head``
    turns grid features into the prediction.
    """

    budget_keys: ClassVar[tuple[str, ...]] = ()  # the budget keywords encode() accepts
    timestep_aware: bool = False  # True: encode() also takes ``t``, the (B,) diffusion timesteps
    dynamic_tokens: ClassVar[bool] = False  # True when the tokens depend on the input (see `token_map`)
    # accounting (dyncompute.flops): {submodule prefix: component name}; "" is the tokenizer itself.
    # Undeclared submodules are counted under "tokenizer".
    flop_components: ClassVar[dict[str, str]] = {}
    flop_order: ClassVar[tuple[str, ...]] = ()  # component names in data-flow order, "backbone" included
    flop_ignored_ops: ClassVar[tuple[str, ...]] = ()  # custom ops that are zero MACs (e.g. an STE)
    # The compiled path (dyncompute.compile): True when every input of one size gives the same token count
    # (the whole forward compiles as one graph); else the submodules whose shapes follow the input grid.
    static_shapes: ClassVar[bool] = False
    static_parts: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def encode(self, x: torch.Tensor, c: torch.Tensor, **budget) -> tuple[Tokens, Any]:
        """Grid (B, C, H, W) and conditioning (B, D) -> packed tokens and a state for decoding."""

    @abc.abstractmethod
    def to_grid(self, tokens: Tokens, state: Any, c: torch.Tensor) -> torch.Tensor:
        """Backbone output tokens -> grid features (B, N_grid, D_grid): one row per position of the
        tokenizer's grid (a pixel for DC-DiT, a patch for patchify), the same rows at every step."""

    @abc.abstractmethod
    def head(self, h: torch.Tensor, state: Any, c: torch.Tensor) -> torch.Tensor:
        """Grid features from `to_grid` -> prediction on the input grid (B, C_out, H, W)."""

    def decode(self, tokens: Tokens, state: Any, c: torch.Tensor) -> torch.Tensor:
        """Backbone output tokens -> prediction on the input grid."""
        return self.head(self.to_grid(tokens, state, c), state, c)

    def aux_losses(self, state: Any) -> dict[str, torch.Tensor]:
        """Auxiliary training losses (already weighted), added to the diffusion loss."""
        return {}

    def initialize_weights(self) -> None:
        """Tokenizer-specific init, run after the model's generic (DiT) init."""

    def token_grid(self) -> tuple[int, int] | None:
        """(rows, cols) of the grid that ``Tokens.pos`` indexes; None when undeclared (reducers that
        work on cells of that grid, e.g. ToMeSD's random destinations, then refuse the tokenizer)."""
        return None

    def token_map(self, state: Any) -> torch.Tensor | None:
        """(B, H', W') bool: which grid positions became backbone tokens; None when every one did."""
        return None

    def boundary_probability(self, state: Any) -> torch.Tensor | None:
        """(B, H', W') float: a learned router's probability of keeping each position; None if none."""
        return None

    def training_budgets(self) -> tuple[tuple[dict[str, float], ...], int]:
        """Multi-budget training: the budgets one is drawn from per step, and the warm-up steps before
        drawing starts. ``((), 0)``: train at the default budget."""
        return (), 0

    def check_budget(self, budget: dict) -> None:
        unknown = sorted(set(budget) - set(self.budget_keys))
        if unknown:
            allowed = ", ".join(self.budget_keys) or "none"
            raise TypeError(f"{type(self).__name__} got unknown budget keyword(s) {unknown}; it accepts: {allowed}")
