"""``token_merging``: ToMe (Bolya et al. 2023) and ToMe for Stable Diffusion (Bolya & Hoffman 2023).

Around a block's attention (default) and optionally its MLP: merge -> op -> unmerge.

- **Destinations.** ``split = 'alternate'``: ToMe's bipartite split, every second token of a sample
  (in its packed order) is a destination. ``split = 'random_cell'``: ToMeSD's, one random
  destination per ``cell`` x ``cell`` cell of the token grid. Cells are taken over the tokens' grid
  positions (``Tokens.pos``), so DC-DiT's irregular kept tokens work too: each occupied cell gets one
  destination among the tokens it holds (the highest of a random priority field over the grid).
- **Matching.** Bipartite soft matching by cosine similarity, within each sample only: every source
  token finds its most similar destination; the ``floor(ratio * L)`` sources with the best matches
  merge into theirs (at most all sources, so ``ratio <= 1 - 1/cell^2`` for cells, ``<= 1/2`` for the
  alternating split). The metric is the block's input (``metric = 'input'``, ToMeSD's choice) or the
  head-averaged keys of the attention's input (``'keys'``, ToMe's; costs the norm and one D x D
  projection per token). One merge plan per block serves its attention and its MLP.
- **Merging.** Size-weighted averages of the block input (the residual stream, as ToMe merges it);
  the branch's adaLN-modulated norm then runs on the merged tokens. With ``proportional_attention``
  every merged key's logit gets + log(size) (ToMe's proportional attention, `PackedAttention`'s
  ``log_size``).
- **Unmerge** gives every original token its group's output, so every sample gets back exactly its
  tokens, in order.
- **Randomness** (the cell destinations) comes from a generator seeded per call with (``seed``,
  evaluation index, block): never the global RNG, and a sample's destinations do not depend on the rest
  of its batch.

Accounting: the metric (norms, keys) and the similarity products are reported as work per sample; the
padded similarity product of a mixed-length batch is reported as executed work. Merging, unmerging
and argsorts are additions and indexing (0 MACs by convention).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dyncompute.errors import ConfigError
from dyncompute.flops import count_macs
from dyncompute.linear import linear
from dyncompute.reducer import BlockContext, Op, Reducer
from dyncompute.registry import REDUCERS
from dyncompute.tokens import Tokens

SPLITS = ("alternate", "random_cell")
METRICS = ("input", "keys")


@dataclass
class MergePlan:
    """Which merged token every token belongs to, and the merged layout.

    Merging gathers the surviving tokens (destinations and unmerged sources) and adds the merged
    sources into their destinations; unmerging gathers every token's group: about three passes over
    the tokens, all 1-D index operations on the packed rows.
    """

    group: torch.Tensor  # (T,) index of each token's merged token
    survivors: torch.Tensor  # (T',) token index of each merged token (its destination or itself)
    merged_src: torch.Tensor  # (r,) tokens merged away
    merged_into: torch.Tensor  # (r,) their merged token
    size: torch.Tensor  # (T', 1) tokens per merged token
    lengths: tuple[int, ...]  # merged tokens per sample
    pos: torch.Tensor  # (T', 2) grid position of each merged token
    work: list  # per sample: [(kind, size), ...] useful
    executed_work: list  # per sample, with the padding of the batched similarity product
    tokens: Tokens | None = None  # the merged layout, built at the first merge

    def merge(self, x: torch.Tensor) -> Tokens:
        """Size-weighted average of each group (x: (T, D) packed)."""
        kept = x.index_select(0, self.survivors)
        if len(self.merged_src):  # scatter_add with a row index: ~10x faster than index_add_ on CPU
            index = self.merged_into[:, None].expand(-1, x.shape[1])
            kept.scatter_add_(0, index, x.index_select(0, self.merged_src))
        kept = kept / self.size.to(x.dtype)
        if self.tokens is None:
            self.tokens = Tokens.from_lengths(kept, self.lengths, self.pos)
        return self.tokens.with_x(kept)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        return y.index_select(0, self.group)


def destinations(tokens: Tokens, split: str, cell: int, priority: torch.Tensor | None) -> torch.Tensor:
    """(T,) bool: the destination set of the bipartite split, per sample."""
    local = torch.arange(len(tokens.batch), device=tokens.batch.device) - tokens.cu_seqlens[tokens.batch]
    if split == "alternate":
        return local % 2 == 1
    rows, cols = priority.shape
    per_row = -(-cols // cell)
    cells = -(-rows // cell) * per_row
    key = tokens.batch * cells + (tokens.pos[:, 0] // cell) * per_row + tokens.pos[:, 1] // cell
    prio = priority[tokens.pos[:, 0], tokens.pos[:, 1]]
    best = torch.full((tokens.num_samples * cells,), -1, dtype=prio.dtype, device=prio.device)
    best = best.scatter_reduce(0, key, prio, reduce="amax")
    return prio == best[key]


def _grouped(ids: torch.Tensor, batch: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids grouped by sample -> (B, max count) ids and validity mask (None when no padding)."""
    B, M = len(counts), max(counts)
    if len(set(counts)) == 1:
        return ids.view(B, M), None
    n = torch.tensor(counts, device=ids.device)
    start = torch.cumsum(n, 0) - n
    rank = torch.arange(len(ids), device=ids.device) - start[batch[ids]]
    out = torch.zeros(B, M, dtype=torch.long, device=ids.device)
    valid = torch.zeros(B, M, dtype=torch.bool, device=ids.device)
    out[batch[ids], rank] = ids
    valid[batch[ids], rank] = True
    return out, valid


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of unit rows: every row of a (B, S, C) with every row of b (B, N, C)."""
    return a @ b.transpose(1, 2)


def bipartite_plan(metric: torch.Tensor, tokens: Tokens, is_dst: torch.Tensor, ratio: float) -> MergePlan | None:
    """ToMe's bipartite soft matching on a unit-norm ``metric`` (T, C), within each sample; None when no
    sample merges anything."""
    T, B, dev = len(is_dst), tokens.num_samples, is_dst.device
    n_dst = torch.zeros(B, dtype=torch.long, device=dev).index_add_(0, tokens.batch, is_dst.long()).tolist()
    n_src = [n - d for n, d in zip(tokens.lengths, n_dst)]
    r = [min(math.floor(ratio * n), s) if d else 0 for n, s, d in zip(tokens.lengths, n_src, n_dst)]
    if not any(r):
        return None
    src, src_ok = _grouped((~is_dst).nonzero().squeeze(1), tokens.batch, n_src)
    dst, dst_ok = _grouped(is_dst.nonzero().squeeze(1), tokens.batch, n_dst)
    (S, N), C = (src.shape[1], dst.shape[1]), metric.shape[1]
    scores = similarity(metric.index_select(0, src.reshape(-1)).view(B, S, C),
                        metric.index_select(0, dst.reshape(-1)).view(B, N, C))
    if dst_ok is not None:
        scores = scores.masked_fill(~dst_ok[:, None, :], -math.inf)
    best, match = scores.max(dim=-1)
    if src_ok is not None:
        best = best.masked_fill(~src_ok, -math.inf)
    order = best.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(S, device=dev).expand(B, S))
    merged = rank < torch.tensor(r, device=dev)[:, None]
    if src_ok is not None:
        merged &= src_ok
    merged_src, merged_dst = src[merged], dst.gather(1, match)[merged]
    rep = torch.arange(T, device=dev)
    rep[merged_src] = merged_dst
    survivor = rep == torch.arange(T, device=dev)
    index_of = torch.cumsum(survivor.long(), 0) - 1
    survivors = survivor.nonzero().squeeze(1)
    merged_into = index_of[merged_dst]
    size = torch.ones(len(survivors), device=dev).index_add_(0, merged_into, torch.ones(len(merged_into), device=dev))
    work = [[("metric", (n,)), ("similarity", (s, d))] for n, s, d in zip(tokens.lengths, n_src, n_dst)]
    executed = [[("metric", (n,)), ("similarity", (S, N))] for n in tokens.lengths]
    return MergePlan(index_of[rep], survivors, merged_src, merged_into, size[:, None],
                     tuple(n - k for n, k in zip(tokens.lengths, r)), tokens.pos.index_select(0, survivors),
                     work, executed)


@REDUCERS.register("token_merging")
class TokenMerging(Reducer):
    """Merge ``ratio`` of each sample's tokens before attention (and the MLP), unmerge after."""

    hook_points = ("attention", "mlp")
    flop_ignored_ops = ("aten::scatter_reduce",)  # the cells' destination draw: a max, 0 MACs

    def __init__(self, ratio: float = 0.5, split: str = "random_cell", cell: int = 2, metric: str = "input",
                 attention: bool = True, mlp: bool = False, proportional_attention: bool = True,
                 blocks: Sequence[int] | None = None, seed: int = 0):
        super().__init__()
        if split not in SPLITS:
            raise ConfigError(f"reducers.token_merging.split must be one of {', '.join(SPLITS)}, got {split!r}")
        if metric not in METRICS:
            raise ConfigError(f"reducers.token_merging.metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if isinstance(cell, bool) or not isinstance(cell, int) or cell < 1:
            raise ConfigError(f"reducers.token_merging.cell must be an integer >= 1, got {cell!r}")
        most = 1 - 1 / cell ** 2 if split == "random_cell" else 0.5
        if not 0 <= ratio <= most:
            bound = f"1 - 1/cell^2 = {most:g}" if split == "random_cell" else "1/2 (alternating split)"
            raise ConfigError(f"reducers.token_merging.ratio must lie in [0, {bound}], got {ratio!r}")
        if not (attention or mlp):
            raise ConfigError("reducers.token_merging merges around neither attention nor mlp: enable one")
        if metric == "keys" and not attention:
            raise ConfigError("reducers.token_merging.metric = 'keys' needs attention = True "
                              "(keys are the attention's)")
        self.ratio, self.split, self.cell, self.metric = float(ratio), split, cell, metric
        self.merge_attention, self.merge_mlp, self.proportional_attention = attention, mlp, proportional_attention
        self.blocks, self.seed = (None if blocks is None else tuple(blocks)), seed
        self.grid: tuple[int, int] | None = None  # the tokenizer's grid (set by check_model; configuration)

    def check_model(self, model) -> None:
        depth = len(model.backbone.blocks)
        if self.blocks is not None and any(not 0 <= b < depth for b in self.blocks):
            raise ConfigError(f"reducers.token_merging.blocks {list(self.blocks)} outside the model's 0..{depth - 1}")
        self.grid = model.tokenizer.token_grid()
        if self.split == "random_cell" and self.grid is None:
            raise ConfigError(f"token_merging with split 'random_cell' needs a tokenizer that declares its token "
                             f"grid (Tokenizer.token_grid); {type(model.tokenizer).__name__} does not: "
                             f"use split = 'alternate'")

    # -- hooks
    def attention(self, op: Op, h: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        if not self.merge_attention or not self._active(ctx.block):
            return op(h, ctx.tokens)
        return self._around(op, h, ctx, self._plan(ctx, h), attention=True)

    def mlp(self, op: Op, h: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        if not self.merge_mlp or not self._active(ctx.block):
            return op(h, ctx.tokens)
        plans = ctx.scratch.get("plans", {})
        plan = plans[ctx.block] if ctx.block in plans else self._plan(ctx, h)
        return self._around(op, h, ctx, plan, attention=False)

    def _active(self, block: int) -> bool:
        return self.ratio > 0 and (self.blocks is None or block in self.blocks)

    def _around(self, op: Op, h: torch.Tensor, ctx: BlockContext, plan: MergePlan | None, attention: bool):
        if plan is None:
            return op(h, ctx.tokens)
        merged = plan.merge(h.reshape(-1, h.shape[-1]))
        kw = {"log_size": plan.size.log().squeeze(1)} if attention and self.proportional_attention else {}
        y = op(merged.batched(), merged, **kw)
        return plan.unmerge(y.reshape(-1, y.shape[-1])).view_as(h)

    # -- the merge plan of one block (shared by its attention and MLP)
    def _plan(self, ctx: BlockContext, h: torch.Tensor) -> MergePlan | None:
        """Matching on the block input ``h`` (or the keys of its modulated norm)."""
        tokens = ctx.tokens
        x = h if self.metric == "input" else ctx.prepare(h, tokens)
        metric = self._metric(x, ctx.module)
        priority = self._priority(ctx) if self.split == "random_cell" else None
        plan = bipartite_plan(metric, tokens, destinations(tokens, self.split, self.cell, priority), self.ratio)
        ctx.scratch.setdefault("plans", {})[ctx.block] = plan
        if plan is not None:
            self._record(ctx.scratch, plan)
        return plan

    def _metric(self, x: torch.Tensor, block) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1])
        return F.normalize(x if self.metric == "input" else head_mean_keys(x, block.attn), dim=-1)

    def _priority(self, ctx: BlockContext) -> torch.Tensor:
        """A random priority field over the grid (a permutation): seeded per (seed, evaluation, block)."""
        evaluation = ctx.step.evaluation if ctx.step is not None else 0
        g = torch.Generator().manual_seed(hash((self.seed, evaluation, ctx.block)) & 0x7FFF_FFFF_FFFF_FFFF)
        rows, cols = self.grid
        return torch.randperm(rows * cols, generator=g).view(rows, cols).to(ctx.tokens.pos.device)

    @staticmethod
    def _record(scratch: dict, plan: MergePlan) -> None:
        for key, items in (("work", plan.work), ("executed_work", plan.executed_work)):
            rows = scratch.setdefault(key, [[] for _ in items])
            for row, extra in zip(rows, items):
                row.extend(extra)

    def report(self, cache, scratch: dict) -> dict:
        if "work" not in scratch:
            return {}
        out = {"work": scratch["work"]}
        if scratch["executed_work"] != scratch["work"]:
            out["executed_work"] = scratch["executed_work"]
        return out

    # -- accounting
    def work_macs(self, model, kind: str, size: tuple) -> int:
        block, width = model.backbone.blocks[0], model.config.hidden_size
        if kind == "metric":  # 'keys': the norm (modulation is elementwise), the keys, their normalisation
            fn = (lambda x: self._metric(x, block)) if self.metric == "input" else \
                (lambda x: self._metric(block.norm1(x), block))
            return count_macs(fn, torch.zeros(size[0], width), owner=model)
        if kind == "similarity":
            dim = width if self.metric == "input" else block.attn.head_dim
            s, n = size
            return count_macs(similarity, torch.zeros(1, s, dim), torch.zeros(1, n, dim))
        return super().work_macs(model, kind, size)


def head_mean_keys(x: torch.Tensor, attn) -> torch.Tensor:
    """ToMe's metric: the attention's keys of x (T, D), averaged over heads -> (T, head_dim)."""
    D = attn.qkv.in_features
    bias = None if attn.qkv.bias is None else attn.qkv.bias[D:2 * D]
    k = linear(x, attn.qkv.weight[D:2 * D], bias)
    return k.view(len(x), attn.num_heads, attn.head_dim).mean(1)
