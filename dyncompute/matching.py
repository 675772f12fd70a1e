"""Matched baselines: iso-FLOP and iso-parameter DiT (patchify) configurations, compute-matched steps.

Given any model config, find the DiT of the same width whose *useful* MACs per forward (iso-FLOP) or
parameter count (iso-param) match it, by choosing the depth; if no depth comes within the tolerance,
by choosing the width at that depth (or its neighbour): widths step by 4 (the 2-D sin-cos embedding) and
the heads follow, keeping the head dimension. A data-dependent model's MACs are the mean over real inputs noised at
uniformly drawn timesteps (see `flops.measurement_inputs`).

DiT candidates are counted exactly: MACs and parameters are affine in the depth (identical blocks),
so a width costs two fvcore counts (depth 1 and 2) and every depth follows.

The compute-matched training length for multi-budget training (the DC-DiT paper's rule) is
``S_DC = S_warm + (S_DiT * F_DiT - S_warm * F_0) / F_mean``: S_warm warm-up steps at cost F_0, then
steps at the mean cost over the budget set F_mean, spending what S_DiT steps of a DiT at F_DiT spend.
Per-step costs use forward MACs; the backward's constant factor cancels.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import pandas as pd
import torch

from .config import build_model
from .errors import UserError
from .flops import count_forward, count_parameters, measurement_inputs, split_rows, trace_forward
from .model import ModelConfig
from .runs import load_weights
from .trajectory import SampleCost


@dataclass(frozen=True)
class DiTShape:
    """A DiT (patchify) configuration."""

    hidden_size: int
    depth: int
    num_heads: int
    patch_size: int = 2
    mlp_ratio: float = 4.0
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = True

    @property
    def name(self) -> str:
        return f"DiT(D={self.hidden_size}, depth={self.depth}, heads={self.num_heads})/{self.patch_size}"

    def model_config(self) -> ModelConfig:
        return ModelConfig(input_size=self.input_size, in_channels=self.in_channels, num_classes=self.num_classes,
                           hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
                           mlp_ratio=self.mlp_ratio, learn_sigma=self.learn_sigma, tokenizer="patchify",
                           tokenizer_kwargs={"patch_size": self.patch_size})

    def build(self):
        return self.model_config().build()


@lru_cache(maxsize=256)
def _cost_exact(shape: DiTShape) -> tuple[int, int]:
    torch.manual_seed(0)
    model = shape.build()
    x = torch.zeros(1, shape.in_channels, shape.input_size, shape.input_size)
    return trace_forward(model, x, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)).macs, \
        count_parameters(model)


def dit_cost(shape: DiTShape) -> tuple[int, int]:
    """(MACs per image per forward, parameters) of a DiT, exact (affine in depth: counted at 1 and 2)."""
    m1, p1 = _cost_exact(replace(shape, depth=1))
    m2, p2 = _cost_exact(replace(shape, depth=2))
    return m1 + (shape.depth - 1) * (m2 - m1), p1 + (shape.depth - 1) * (p2 - p1)


@dataclass
class Match:
    shape: DiTShape
    macs: int
    params: int
    target: str  # "macs" or "params"
    target_value: float
    by: str  # "depth" or "width"

    @property
    def error(self) -> float:
        """Relative error of the matched quantity."""
        got = self.macs if self.target == "macs" else self.params
        return got / self.target_value - 1


def _value(shape: DiTShape, target: str) -> int:
    macs, params = dit_cost(shape)
    return macs if target == "macs" else params


def match_depth(base: DiTShape, target: str, value: float, max_depth: int = 256) -> Match:
    """The depth (same width) whose MACs/params are closest to ``value``."""
    v1, v2 = _value(replace(base, depth=1), target), _value(replace(base, depth=2), target)
    guess = 1 + (value - v1) / (v2 - v1)
    depths = {min(max_depth, max(1, d)) for d in (math.floor(guess), math.ceil(guess))}
    best = min(depths, key=lambda d: abs(v1 + (d - 1) * (v2 - v1) - value))
    return _match(replace(base, depth=best), target, value, "depth")


def match_width(base: DiTShape, target: str, value: float, max_width: int | None = None) -> Match:
    """The width (fixed depth; multiples of 4 for the 2-D sin-cos embedding) whose MACs/params are closest.

    Heads follow the width: the divisor of the width closest to keeping the base's head dimension
    (MACs and parameters do not depend on the number of heads).
    """
    head_dim = base.hidden_size / base.num_heads

    def shape(k: int) -> DiTShape:
        return replace(base, hidden_size=4 * k, num_heads=heads_for(4 * k, head_dim))

    lo, hi = 1, max(2, (max_width or 8 * base.hidden_size) // 4)
    while hi - lo > 1:  # MACs and params grow with the width
        mid = (lo + hi) // 2
        if _value(shape(mid), target) < value:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda k: abs(_value(shape(k), target) - value))
    return _match(shape(best), target, value, "width")


def heads_for(width: int, head_dim: float) -> int:
    """The divisor of ``width`` that keeps the head dimension closest to ``head_dim``."""
    return min((h for h in range(1, width + 1) if width % h == 0), key=lambda h: (abs(width / h - head_dim), h))


def _match(shape: DiTShape, target: str, value: float, by: str) -> Match:
    macs, params = dit_cost(shape)
    return Match(shape, macs, params, target, value, by)


def match_dit(base: DiTShape, target: str, value: float, by: str = "auto", tol: float = 0.02) -> Match:
    """``by="depth"``, ``"width"`` (at ``base.depth``) or ``"auto"``: the depth, and when no depth is
    within ``tol``, the closest of the widths at the base depth, at the closest depth and at its
    neighbour on the target's side (small models move ~10% per width step of 4, so one depth may miss)."""
    if target not in ("macs", "params"):
        raise ValueError(f"target must be 'macs' (iso-FLOP) or 'params' (iso-param), got {target!r}")
    if by not in ("depth", "width", "auto"):
        raise ValueError(f"by must be 'depth', 'width' or 'auto', got {by!r}")
    if by == "width":
        return match_width(base, target, value)
    m = match_depth(base, target, value)
    if by == "auto" and abs(m.error) > tol:
        other = max(1, m.shape.depth + (1 if m.error < 0 else -1))
        depths = dict.fromkeys((base.depth, m.shape.depth, other))  # ordered: ties go to the base depth
        tries = [match_width(replace(base, depth=d), target, value) for d in depths]
        m = min([m, *tries], key=lambda c: abs(c.error))
    return m


# --------------------------------------------------------------------------- measuring a source config


@dataclass
class Measured:
    """A configured model's useful MACs per image per forward (mean over inputs) and parameters."""

    macs: float
    params: int
    tokens_per_sample: float
    num_inputs: int
    note: str = ""


def measure(model, num_inputs: int = 8, seed: int = 0, latent_root: str | None = None,
            backbone_tokens: int | None = None, **budget) -> Measured:
    """Mean useful MACs over real inputs; with ``backbone_tokens`` the backbone is counted at that
    length and the rest of the model at the measured lengths (interpolated when they differ)."""
    x, t, y = measurement_inputs(model, num_inputs, seed, latent_root)
    fwd = count_forward(model, x, t, y, **budget)
    tokens = sum(fwd.tokens_per_sample) / len(fwd.tokens_per_sample)
    if backbone_tokens is None:
        return Measured(fwd.useful_macs / len(x), fwd.params, tokens, len(x))
    cost = SampleCost(model)
    cost.observe(split_rows(x, t, y, budget), fwd.tokens_per_sample)
    note = f"backbone counted at L={backbone_tokens} tokens; rest of the model measured at L={sorted(cost.rows)}"
    if cost.extrapolated(backbone_tokens):
        nearest = min(cost.rows, key=lambda n: abs(n - backbone_tokens))
        macs = sum(cost.useful(nearest, backbone=False).values()) + cost.backbone(backbone_tokens)
        note += f" and held at L={nearest} (L-dependent tokenizer work, e.g. de-chunk, is not extrapolated)"
    else:
        macs = sum(cost.useful(backbone_tokens).values())
    return Measured(macs, fwd.params, float(backbone_tokens), len(x), note)


def base_shape(model, patch_size: int = 2) -> DiTShape:
    """The DiT with the model's width, depth, heads, data shape and output as a search start."""
    c = model.config
    return DiTShape(hidden_size=c.hidden_size, depth=c.depth, num_heads=c.num_heads, patch_size=patch_size,
                    mlp_ratio=c.mlp_ratio, input_size=c.input_size, in_channels=c.in_channels,
                    num_classes=c.num_classes, learn_sigma=c.learn_sigma)


def compute_matched_steps(dit_steps: float, dit_cost: float, warm_steps: float, warm_cost: float,
                          mean_cost: float) -> float:
    """S_DC = S_warm + (S_DiT * F_DiT - S_warm * F_0) / F_mean (the DC-DiT paper's multi-budget rule)."""
    if min(dit_cost, warm_cost, mean_cost) <= 0:
        raise ValueError("per-step costs must be positive")
    return warm_steps + (dit_steps * dit_cost - warm_steps * warm_cost) / mean_cost


def budget_costs(model, key: str, values, num_inputs: int = 8, seed: int = 0, latent_root=None) -> dict:
    """{budget value: mean useful MACs per image per forward} over the same real inputs."""
    return {v: measure(model, num_inputs, seed, latent_root, **{key: v}).macs for v in values}


# --------------------------------------------------------------------------- the `dyncompute match` command


def run_match(args) -> dict:
    model, root = build_model(args.config, [*args.bindings, *args.bind])
    if args.checkpoint:
        load_weights(model, args.checkpoint)
    src = measure(model, args.samples, args.seed, root, args.backbone_tokens)
    base = base_shape(model, args.patch_size)
    if args.depth:
        base = replace(base, depth=args.depth)
    iso_flop = match_dit(base, "macs", src.macs, args.by, args.tol)
    iso_param = match_dit(base, "params", src.params, args.by, args.tol)
    out = {"config": args.config, "source": asdict(src), "tol": args.tol,
           "iso_flop": _match_dict(iso_flop, args.tol), "iso_param": _match_dict(iso_param, args.tol)}
    if args.dit_steps:
        out["compute_matched"] = _steps(model, args, root, base)
    return out


def _match_dict(m: Match, tol: float) -> dict:
    return {"shape": asdict(m.shape), "name": m.shape.name, "useful_macs": m.macs, "flops": 2 * m.macs,
            "params": m.params, "matched_on": m.target, "by": m.by, "error": m.error, "within_tol": abs(m.error) <= tol}


def _steps(model, args, root, base: DiTShape) -> dict:
    key = args.budget_key or (model.tokenizer.budget_keys[0] if model.tokenizer.budget_keys else None)
    values = ([float(v) for v in args.budgets.split(",")] if args.budgets
              else [b[key] for b in model.tokenizer.training_budgets()[0] if key in b])
    if key is None or not values:
        raise UserError("compute-matched steps need a budget keyword and a budget set (--budget-key, --budgets)")
    costs = budget_costs(model, key, values, args.samples, args.seed, root)
    reference = base_shape(model, args.patch_size)  # the DiT the config would replace (e.g. DC-DiT-B -> DiT-B/2)
    f_dit = dit_cost(reference)[0]
    f0, f_mean = costs[values[0]], sum(costs.values()) / len(costs)
    return {"reference": reference.name, "F_DiT": f_dit, "F_0": f0, "F_mean": f_mean, "budget_key": key,
            "budget_costs": costs, "S_DiT": args.dit_steps, "S_warm": args.warm_steps,
            "S_DC": compute_matched_steps(args.dit_steps, f_dit, args.warm_steps, f0, f_mean)}


def match_table(out: dict) -> pd.DataFrame:
    src = out["source"]
    rows = [{"model": out["config"], "useful_GMACs": src["macs"] / 1e9, "GFLOPs": 2 * src["macs"] / 1e9,
             "params_M": src["params"] / 1e6, "tokens/sample": src["tokens_per_sample"], "error_%": None}]
    for label in ("iso_flop", "iso_param"):
        m = out[label]
        rows.append({"model": f"{label.replace('_', '-')}: {m['name']}", "useful_GMACs": m["useful_macs"] / 1e9,
                     "GFLOPs": m["flops"] / 1e9, "params_M": m["params"] / 1e6,
                     "tokens/sample": (m["shape"]["input_size"] // m["shape"]["patch_size"]) ** 2,
                     "error_%": 100 * m["error"]})
    return pd.DataFrame(rows)
