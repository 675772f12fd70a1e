"""Per-sample width: attention heads and MLP hidden-channel groups switched on or off per sample.

A width mask ``active`` (B, G) says which of G equal groups of an op's width (heads; MLP hidden
channels) run for each sample (DyDiT's timestep-wise dynamic width). Without a gradient on the mask
(inference) the groups that are off are not computed at all: the op runs once per distinct mask on the
samples that have it, with only the weight rows and columns of its active groups, so fvcore counts
exactly what ran. With a gradient (training, a straight-through 0/1 mask) every group runs and the
mask multiplies the group's inner activations, so gradients reach whatever produced the mask.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .linear import linear
from .tokens import Tokens


def is_masked(active: torch.Tensor | None) -> bool:
    """A mask that must be multiplied in (it carries a gradient); else groups that are off are skipped."""
    return active is not None and torch.is_grad_enabled() and active.requires_grad


def all_on(active: torch.Tensor) -> bool:
    return bool((active.detach() > 0.5).all())


def groups_on(active: torch.Tensor) -> tuple[int, ...]:
    """Per sample, how many of the mask's groups ran (for `reducer.BlockRun`)."""
    return tuple(int(n) for n in (active.detach() > 0.5).sum(1).tolist())


def by_width(h: torch.Tensor, tokens: Tokens, active: torch.Tensor, run: Callable) -> torch.Tensor:
    """``run(h_sub, tokens_sub, pattern)`` once per distinct mask, on only the samples that have it and
    only their active groups (``pattern`` (G,) bool); an all-on mask runs ``run(h, tokens, None)``."""
    if all_on(active):
        return run(h, tokens, None)
    patterns, inverse = torch.unique(active.detach() > 0.5, dim=0, return_inverse=True)
    out = torch.zeros_like(h)
    for k, pattern in enumerate(patterns):
        samples = (inverse == k).nonzero().squeeze(1)
        if tokens.uniform:  # (B, L, D) rows
            keep = torch.isin(tokens.batch, samples)
            sub = Tokens.from_lengths(tokens.x[keep], [tokens.lengths[0]] * len(samples), tokens.pos[keep])
            out[samples] = run(h[samples], sub, pattern).to(out.dtype)
        else:
            sub, rows = tokens.select(torch.isin(tokens.batch, samples), drop_empty=True)
            out[rows] = run(sub.batched(h[rows]), sub, pattern).reshape(-1, h.shape[-1]).to(out.dtype)
    return out


def mlp(module, h: torch.Tensor, tokens: Tokens, active: torch.Tensor) -> torch.Tensor:
    """timm's `Mlp` with per-sample hidden-channel groups ``active`` (B, G)."""
    if is_masked(active):
        return _channels(module, h, tokens, None, active)
    return by_width(h, tokens, active, lambda h_, t_, p: _channels(module, h_, t_, p))


def _channels(module, h: torch.Tensor, tokens: Tokens, pattern: torch.Tensor | None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """The MLP on the channel groups where ``pattern`` is True (all when None), hidden activations
    times ``mask`` (B, G)."""
    if pattern is None and mask is None:
        return module(h)
    w1, b1, w2 = module.fc1.weight, module.fc1.bias, module.fc2.weight
    if pattern is not None:
        G, groups = len(pattern), pattern.nonzero().squeeze(1)
        w1, b1 = w1.view(G, -1, w1.shape[1])[groups].flatten(0, 1), b1.view(G, -1)[groups].flatten()
        w2 = w2.view(w2.shape[0], G, -1)[:, groups].flatten(1)
    a = linear(h, w1, b1)
    if mask is not None:
        per_token = mask[:, None] if tokens.uniform else mask[tokens.batch]
        a = (a.unflatten(-1, (mask.shape[-1], -1)) * per_token[..., None]).flatten(-2)
    a = module.norm(module.drop1(module.act(a)))
    return module.drop2(linear(a, w2, module.fc2.bias))
