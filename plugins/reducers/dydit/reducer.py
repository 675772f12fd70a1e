"""DyDiT (Zhao et al., ICLR 2025) as a trained reducer on the seam's attention and MLP hook points.

- TDW, timestep-wise dynamic width: per block, a router on the timestep switches attention heads and
  MLP hidden-channel groups on or off (the first of each always on); the ops skip what is off.
- SDT, spatial-wise dynamic tokens: per block, a gate on each token of the residual stream after
  attention decides whether it runs the MLP; tokens that skip it add nothing to the stream.
- Training: hard gate decisions with straight-through gradients (the ops multiply by the 0/1 masks, so
  every part runs and gradients reach the gates) and DyDiT's FLOPs loss on those decisions, pulling the
  share of the blocks' attention + MLP MACs that ran to λ (the target annealed from 1 over
  ``target_warmup_steps``). Logistic (Gumbel) noise on the logits explores early and is annealed to
  zero over ``noise_anneal_steps``, so the last steps train the decisions inference takes. Inference:
  hard decisions (logit > 0), and only the heads, channel groups and tokens that are on are computed,
  so the accounting (`BlockRun` tokens and groups over a trajectory, counted with fvcore) counts those.

Deviations from the paper, on purpose: the routers read the timestep's sinusoidal embedding (a reducer
sees t, not DiT's learned t embedding), and the paper's extra full-width diffusion loss while
fine-tuning is not added.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dyncompute.attention import PackedAttention
from dyncompute.backbone import DiTBlock
from dyncompute.errors import ConfigError
from dyncompute.flops import count_macs
from dyncompute.reducer import BlockContext, Reducer
from dyncompute.registry import REDUCERS

from .gates import TokenGate, WidthRouter
from .losses import check_target, flops_loss, flops_ratio


@REDUCERS.register("dydit")
class DyDiT(Reducer):
    """Timestep-wise dynamic width + spatial-wise dynamic tokens at a FLOPs target λ = ``target``."""

    hook_points = ("attention", "mlp")
    trained = True
    # The gates run inside the blocks; a traced forward may drop a router whose decision changed nothing
    # (all on), so the gates' arithmetic is reported as work (`report`) and counted exactly apart.
    flop_components = {"": "backbone"}

    def __init__(self, target: float = 0.7, loss_weight: float = 2.0, tau: float = 1.0,
                 channel_groups: int | None = None, width_bias_init: float = 2.0, token_bias_init: float = 2.0,
                 target_warmup_steps: int = 0, noise_anneal_steps: int = 0, tdw: bool = True, sdt: bool = True):
        super().__init__()
        check_target(target)
        self.target, self.loss_weight, self.tau = float(target), loss_weight, tau
        self.channel_groups, self.target_warmup_steps = channel_groups, target_warmup_steps
        self.noise_anneal_steps = noise_anneal_steps
        self.width_bias_init, self.token_bias_init, self.tdw, self.sdt = width_bias_init, token_bias_init, tdw, sdt
        self.current_target, self.noise = self.target, 1.0 if noise_anneal_steps else 0.0
        self.name = "dydit"

    # ---- attaching to a model -------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        blocks = getattr(getattr(model, "backbone", None), "blocks", None)
        if not blocks or not all(isinstance(b, DiTBlock) and isinstance(b.attn, PackedAttention) for b in blocks):
            raise ConfigError(f"reducer dydit needs a model with the reducer seam (a DiffusionTransformer whose "
                              f"backbone is DiT blocks with packed attention); got {type(model).__name__}")
        if not isinstance(blocks[0].attn.norm, nn.Identity):
            raise ConfigError("reducer dydit skips heads: the attention must have no norm across heads")
        groups = self.channel_groups or blocks[0].attn.num_heads
        if blocks[0].mlp.fc1.out_features % groups:
            raise ConfigError(f"reducers.dydit.channel_groups = {groups} does not divide the MLP width "
                              f"{blocks[0].mlp.fc1.out_features}")

    def bind(self, model: nn.Module) -> None:
        blocks = model.backbone.blocks
        heads, self.hidden = blocks[0].attn.num_heads, blocks[0].attn.qkv.in_features
        self.mlp_hidden = blocks[0].mlp.fc1.out_features
        groups = self.channel_groups or heads
        self.head_routers = self._routers(heads, len(blocks)) if self.tdw else None
        self.channel_routers = self._routers(groups, len(blocks)) if self.tdw else None
        self.token_gates = (nn.ModuleList(TokenGate(self.hidden, self.token_bias_init) for _ in blocks)
                            if self.sdt else None)

    def _routers(self, groups: int, depth: int) -> nn.ModuleList:
        return nn.ModuleList(WidthRouter(groups, bias_init=self.width_bias_init) for _ in range(depth))

    def schedule(self, step: int) -> None:
        """The target goes linearly from 1 to λ over ``target_warmup_steps`` (DyDiT's warm-up) and the
        decision noise from 1 to 0 over ``noise_anneal_steps``."""
        w, n = self.target_warmup_steps, self.noise_anneal_steps
        self.current_target = self.target if not w else 1 - (1 - self.target) * min(1.0, step / w)
        self.noise = 0.0 if not n else max(0.0, 1 - step / n)

    # ---- hooks ------------------------------------------------------------------------------------
    def _width(self, routers, ctx: BlockContext) -> torch.Tensor | None:
        return None if routers is None else routers[ctx.block](ctx.t, self.tau, self.noise)

    def attention(self, op, h, ctx: BlockContext):
        heads = self._width(self.head_routers, ctx)
        if self.training:
            ctx.scratch.setdefault("blocks", {}).setdefault(ctx.block, {})["heads"] = heads
        return op(h, ctx.tokens) if heads is None else op(h, ctx.tokens, active=heads)

    def mlp(self, op, h, ctx: BlockContext):
        tokens = ctx.tokens
        channels = self._width(self.channel_routers, ctx)
        kw = {} if channels is None else {"active": channels}
        gate = None if self.token_gates is None else self.token_gates[ctx.block](h, self.tau, self.noise)
        ctx.scratch.setdefault("gated", []).append(tokens.lengths)
        if self.training:
            self._record(ctx, channels, gate)
        if gate is None:
            return op(h, tokens, **kw)
        if self.training:  # every token runs; the straight-through gate multiplies its update
            return op(h, tokens, **kw) * gate.unsqueeze(-1)
        return _skip_tokens(op, h, tokens, kw, gate.reshape(-1) > 0.5)

    def _record(self, ctx: BlockContext, channels, gate) -> None:
        """What the FLOPs loss needs of this block: lengths, head / channel decisions, gated token share."""
        tokens, dev = ctx.tokens, ctx.t.device
        lengths = torch.tensor(tokens.lengths, device=dev)
        ones = torch.ones(len(lengths), 1, device=dev)
        if gate is None:
            share = torch.ones(len(lengths), device=dev)
        elif tokens.uniform:
            share = gate.reshape(len(lengths), -1).mean(1)
        else:
            share = torch.zeros(len(lengths), device=dev, dtype=gate.dtype).index_add(0, tokens.batch, gate)
            share = share / lengths.clamp(min=1)
        rec = ctx.scratch.setdefault("blocks", {}).setdefault(ctx.block, {})
        rec.update(lengths=lengths, channels=ones if channels is None else channels, tokens=share)
        if rec.get("heads") is None:
            rec["heads"] = ones

    def aux_losses(self, scratch: dict) -> dict[str, torch.Tensor]:
        records = scratch.get("blocks", {})
        blocks = [records[b] for b in sorted(records) if "tokens" in records[b]]
        if not blocks:
            return {}
        ratio = flops_ratio(blocks, self.hidden, self.mlp_hidden)
        return {"flops": flops_loss(ratio, self.current_target, self.loss_weight)}

    def report(self, cache, scratch: dict) -> dict:
        """The gates' own arithmetic per row: the width routers of every block (one timestep) and each
        block's token gate on the tokens it saw."""
        gated = scratch.get("gated", [])
        if not gated:
            return {}
        routers = [("routers", (1,))] if self.tdw else []
        gates = lambda r: [("token_gate", (n[r],)) for n in gated] if self.sdt else []
        return {"work": [routers + gates(r) for r in range(len(gated[0]))]}

    def work_macs(self, model: nn.Module, kind: str, size: tuple) -> int:
        dev = next(self.parameters()).device
        if kind == "routers":
            t = torch.zeros(size[0], device=dev)
            fn = lambda t_: [r(t_, self.tau, 0.0) for r in [*self.head_routers, *self.channel_routers]]
            return count_macs(fn, t, owner=model)
        if kind == "token_gate":
            return count_macs(lambda h: self.token_gates[0](h, self.tau, 0.0),
                              torch.zeros(1, size[0], self.hidden, device=dev), owner=model)
        return super().work_macs(model, kind, size)

    def extra_repr(self) -> str:
        return f"target={self.target}, tau={self.tau}, tdw={self.tdw}, sdt={self.sdt}"


def _skip_tokens(op, h: torch.Tensor, tokens, kw: dict, keep: torch.Tensor) -> torch.Tensor:
    """The MLP branch on the kept tokens only; skipped tokens get a zero update."""
    if bool(keep.all()):
        return op(h, tokens, **kw)
    if not bool(keep.any()):
        return torch.zeros_like(h)
    sub, rows = tokens.select(keep)
    flat = h.reshape(-1, h.shape[-1])
    out = flat.new_zeros(flat.shape)
    out[rows] = op(sub.batched(flat[rows]), sub, **kw).reshape(-1, h.shape[-1]).to(out.dtype)
    return out.view(h.shape)
