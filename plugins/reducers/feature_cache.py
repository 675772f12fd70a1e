"""Block feature caches: FORA (reuse) and TaylorSeer (forecast) of every block's attention and MLP output.

- ``fora`` (Selvaraju et al. 2024, "FORA: Fast-Forward Caching in Diffusion Transformer
  Acceleration"): every ``interval``-th evaluation computes in full and stores each block's attention
  and MLP outputs; the evaluations between reuse them.
- ``taylorseer`` (Liu et al. 2025, "From Reusing to Forecasting: Accelerating Diffusion Models with
  TaylorSeers"): the first ``warmup`` evaluations and then every ``interval``-th compute in full; each
  full evaluation extends a table of finite differences of every output (up to ``order``); between,
  the output is forecast as sum_i Delta^i F / i! * k^i, k evaluations after the last full one (the
  original's TaylorSeer-DiT: steps as the unit, ``first_enhance`` = 2 full evaluations to start).

FORA is TaylorSeer with order 0 and one warm-up evaluation. Only the attention and MLP ops are
replaced; the rest of each block (adaLN modulation, norms, gated residual adds) still runs, as in both
originals. A reuse costs nothing; a forecast of order > 0 costs K MACs per cached number (one
weighted sum of the K stored differences, counted as a (1 x K) @ (K x N) product).

Changing tokens (DC-DiT, or token merging listed before the cache): stored outputs keep their grid
positions and are read back through the nearest stored token of the same sample (`layout`); finite
differences are taken after mapping the older table onto the newer full step's tokens. The mapping is
exact where the tokens stay and DC-DiT's nearest plug-back where they do not.

Outside a sampling call (no step cache: training, single forwards) the caches do nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dyncompute.errors import ConfigError
from dyncompute.flops import count_macs
from dyncompute.reducer import BlockContext, Op, Reducer
from dyncompute.registry import REDUCERS

from .layout import Layout, mapped, read_rows


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass
class Table:
    """One op's stored outputs: finite differences (K, T, D) on ``layout``, as of ``evaluation``."""

    factors: torch.Tensor
    layout: Layout
    evaluation: int


def taylor_sum(weights: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """sum_k weights[k] * factors[k]: one (1 x K) @ (K x N) product over the flattened factors."""
    K = factors.shape[0]
    return (weights.view(1, K) @ factors.reshape(K, -1)).view(factors.shape[1:])


class BlockFeatureCache(Reducer):
    """Full evaluations store (or extend the differences of) every block's attention and MLP
    outputs; the others reuse or forecast them."""

    hook_points = ("attention", "mlp")

    def __init__(self, interval: int, order: int, warmup: int, label: str):
        super().__init__()
        self.interval = check_int(f"reducers.{label}.interval", interval, 1)
        self.order = check_int(f"reducers.{label}.order", order, 0)
        self.warmup = check_int(f"reducers.{label}.warmup", warmup, 1)

    def new_cache(self) -> dict:
        return {}  # (block, point) -> Table

    def is_full(self, evaluation: int) -> bool:
        return evaluation < self.warmup or (evaluation - self.warmup + 1) % self.interval == 0

    def attention(self, op: Op, h: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        return self._run("attention", op, h, ctx)

    def mlp(self, op: Op, h: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        return self._run("mlp", op, h, ctx)

    def _run(self, point: str, op: Op, h: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        if ctx.cache is None:
            return op(h, ctx.tokens)
        e, key, layout = ctx.step.evaluation, (ctx.block, point), Layout.of(ctx.tokens)
        table = ctx.cache.get(key)
        full = table is None or self.is_full(e)
        ctx.scratch["full"] = full
        if full:
            out = op(h, ctx.tokens)
            ctx.cache[key] = self._extended(table, out.reshape(-1, out.shape[-1]), layout, e, ctx.scratch)
            return out
        factors = read_rows(table.factors, mapped(table.layout, layout, ctx.scratch), dim=1)
        return self._forecast(factors, e - table.evaluation, ctx).view_as(h)

    def _extended(self, old: Table | None, out: torch.Tensor, layout: Layout, e: int, scratch: dict) -> Table:
        """New table: the output, then each difference order the older table allows."""
        if old is None or self.order == 0:
            return Table(out.detach()[None], layout, e)
        prev = read_rows(old.factors, mapped(old.layout, layout, scratch), dim=1)
        factors, dt = [out.detach()], float(e - old.evaluation)
        for i in range(min(self.order, prev.shape[0])):
            factors.append((factors[i] - prev[i]) / dt)
        return Table(torch.stack(factors), layout, e)

    def _forecast(self, factors: torch.Tensor, k: int, ctx: BlockContext) -> torch.Tensor:
        K = factors.shape[0]
        if K == 1:
            return factors[0]  # plain reuse: no arithmetic
        weights = torch.tensor([k ** i / math.factorial(i) for i in range(K)], dtype=factors.dtype,
                               device=factors.device)
        work = ctx.scratch.setdefault("work", [[] for _ in ctx.tokens.lengths])
        width = factors.shape[-1]
        for row, n in zip(work, ctx.tokens.lengths):
            row.append(("forecast", (K, n * width)))
        return taylor_sum(weights, factors)

    def report(self, cache, scratch: dict) -> dict:
        if "full" not in scratch:
            return {}
        return {"full": scratch["full"], **({"work": scratch["work"]} if "work" in scratch else {})}

    def work_macs(self, model, kind: str, size: tuple) -> int:
        if kind != "forecast":
            return super().work_macs(model, kind, size)
        K, n = size
        return count_macs(taylor_sum, torch.zeros(K), torch.zeros(K, n))


@REDUCERS.register("fora")
class FORA(BlockFeatureCache):
    """Compute every ``interval``-th evaluation; reuse every block's attention and MLP outputs between."""

    def __init__(self, interval: int = 2):
        super().__init__(interval, order=0, warmup=1, label="fora")


@REDUCERS.register("taylorseer")
class TaylorSeer(BlockFeatureCache):
    """Compute the first ``warmup`` evaluations and then every ``interval``-th; forecast between with a
    Taylor expansion of ``order`` from finite differences of the full evaluations."""

    def __init__(self, interval: int = 3, order: int = 3, warmup: int = 2):
        super().__init__(interval, order=order, warmup=warmup, label="taylorseer")
