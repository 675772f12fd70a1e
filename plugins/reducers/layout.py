"""Carrying per-token state from one sampling step to another whose tokens differ.

Step caches (FORA, TaylorSeer, TeaCache) store per-token tensors at one evaluation and use them at a
later one. Under a static tokenizer the tokens are the same grid positions every step; under DC-DiT
the kept tokens change from step to step (and token merging changes them from block to block). A
stored tensor is therefore kept with its `Layout` (each token's grid position and sample) and read
back through `row_map`: every current token takes the stored row of the *nearest* stored token of the
same sample on the grid (Euclidean; ties go to the earlier token). This is DC-DiT's own nearest
plug-back, so identical layouts map to themselves and the mapping is exact wherever a position was
computed. The distance search is comparisons and index arithmetic: 0 MACs by the accounting's
convention (dyncompute.flops).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dyncompute.tokens import Tokens


@dataclass(frozen=True)
class Layout:
    """Where the rows of a packed per-token tensor sit: grid positions (T, 2) and per-sample lengths."""

    pos: torch.Tensor
    lengths: tuple[int, ...]

    @classmethod
    def of(cls, tokens: Tokens) -> Layout:
        return cls(tokens.pos, tuple(tokens.lengths))

    def same_as(self, other: Layout) -> bool:
        return self.lengths == other.lengths and (self.pos is other.pos or torch.equal(self.pos, other.pos))


def row_map(stored: Layout, current: Layout) -> torch.Tensor | None:
    """(T_current,) index into the stored rows (nearest stored token of the same sample), or None when
    the layouts are equal (read the stored rows as they are)."""
    if len(stored.lengths) != len(current.lengths):
        raise ValueError(f"a step cache holds {len(stored.lengths)} samples but this evaluation has "
                         f"{len(current.lengths)}: a cache belongs to one sampling call of one batch")
    if stored.same_as(current):
        return None
    out, offset = [], 0
    for s_pos, c_pos, n in zip(torch.split(stored.pos, list(stored.lengths)),
                               torch.split(current.pos, list(current.lengths)), stored.lengths):
        if n == 0:
            raise ValueError("a cached sample has no tokens to map from")
        d2 = ((c_pos[:, None, :] - s_pos[None, :, :]) ** 2).sum(-1)
        out.append(d2.argmin(dim=1) + offset)
        offset += n
    return torch.cat(out)


def read_rows(values: torch.Tensor, index: torch.Tensor | None, dim: int = 0) -> torch.Tensor:
    """``values`` with its token dimension ``dim`` read through a `row_map` index."""
    return values if index is None else values.index_select(dim, index)


def mapped(stored: Layout, current: Layout, scratch: dict) -> torch.Tensor | None:
    """`row_map`, computed once per pair of layouts within one forward (``scratch`` is per forward)."""
    key = ("row_map", id(stored.pos), id(current.pos), stored.lengths, current.lengths)
    if key not in scratch:
        scratch[key] = row_map(stored, current)
    return scratch[key]
