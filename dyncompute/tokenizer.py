"""The tokenizer plugin interface: owns the grid -> tokens and tokens -> grid ends of a model."""
from __future__ import annotations

import abc
from typing import Any

import torch
import torch.nn as nn

from .tokens import Tokens


class Tokenizer(nn.Module, abc.ABC):
    """Base class of tokenizer plugins (static patchify, dynamic chunking, ...).

    A tokenizer is built by the model with the keyword arguments ``hidden_size``, ``in_channels``,
    ``out_channels``, ``input_size`` and ``cond_dim``; everything else is its own (gin-bound) setting.
    Budget keywords given to ``DiffusionTransformer.forward`` (e.g. ``tail_drop``) reach ``encode``.
    """

    budget_keys: tuple[str, ...] = ()  # the budget keywords encode() accepts

    @abc.abstractmethod
    def encode(self, x: torch.Tensor, c: torch.Tensor, **budget) -> tuple[Tokens, Any]:
        """Grid (B, C, H, W) and conditioning (B, D) -> packed tokens and a state for ``decode``."""

    @abc.abstractmethod
    def decode(self, tokens: Tokens, state: Any, c: torch.Tensor) -> torch.Tensor:
        """Backbone output tokens -> prediction on the input grid (B, C_out, H, W)."""

    def aux_losses(self, state: Any) -> dict[str, torch.Tensor]:
        """Auxiliary training losses (already weighted), added to the diffusion loss."""
        return {}

    def token_map(self, state: Any) -> torch.Tensor | None:
        """(B, H, W) bool: grid positions the backbone saw as tokens; None: every token is kept."""
        return None

    def boundary_probability(self, state: Any) -> torch.Tensor | None:
        """(B, H, W) float: a learned router's boundary probability per grid position; None: no router."""
        return None

    def initialize_weights(self) -> None:
        """Tokenizer-specific init, run after the model's generic (DiT) init."""

    def check_budget(self, budget: dict) -> None:
        unknown = sorted(set(budget) - set(self.budget_keys))
        if unknown:
            allowed = ", ".join(self.budget_keys) or "none"
            raise TypeError(f"{type(self).__name__} got unknown budget keyword(s) {unknown}; it accepts: {allowed}")
