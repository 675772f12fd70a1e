"""Compute accounting: exact, labelled MACs and FLOPs per forward, per component and per image.

Units (always in the names): **MACs** are multiply-accumulates, fvcore's and DiT's unit (DiT's
Table 4 "Gflops" are GMACs); **FLOPs = 2 x MACs**, the DC-DiT paper's unit. Per-image figures over a
sampling trajectory sum every model evaluation the image took part in, both CFG branches included.

How the count is made
- `fvcore.nn.FlopCountAnalysis` traces one forward. We add handles for what it misses: fused
  ``scaled_dot_product_attention`` (Q Kᵀ and A V: B·H·L_q·L_k·(d + d_v) MACs), RMSNorm (fvcore's norm
  convention), ``baddbmm``, cosine similarity and vector norms. Elementwise work (activations,
  residual adds, adaLN modulation, softmax), reductions, indexing and RNG are zero by the same
  convention as DiT's numbers: they are on the explicit list :data:`IGNORED_OPS`. Any other operator
  without a handle is *reported* (``unsupported_ops``), never silently zero. A tokenizer or reducer
  lists its own zero-MAC custom ops (e.g. a straight-through ``prim::PythonOp``) in ``flop_ignored_ops``.
- Packed variable-length attention is counted on the real lengths: while counting, the per-sample
  SDPA path of :mod:`dyncompute.attention` is used (flash-attn's varlen kernel is switched off; it
  does the same H · Σ_b L_b² · d work per Q Kᵀ and per A V), so each sample's attention is traced at
  its own length.
- *Executed* MACs are what ran for the batch, padding included. *Useful* MACs count valid tokens
  only: each sample counted alone, where nothing is padded. Padding only arises between samples of
  unequal length, so equal-length batches (static patchify) have useful == executed.
- Per component: fvcore's per-module counts are mapped to components by module name. The model
  maps its own parts (embedders, backbone); the tokenizer and each reducer declare theirs
  (``flop_components = {submodule prefix: component}``, ``""`` being the plugin itself).
- Over a trajectory (:mod:`dyncompute.trajectory`), `TrajectoryRecorder` observes every evaluation's
  real per-sample backbone lengths (and CFG branch, budgets, skipped backbones) as the model reports
  them. A sample's cost is a function of its backbone length L: the backbone part is counted exactly at
  any L on synthetic tokens, the rest is counted exactly on recorded inputs at a few lengths and interpolated (a
  quadratic in L, verified on a held-out length; if the check fails every length is counted).
"""
from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from math import prod

import pandas as pd
import torch
import torch.nn as nn

with warnings.catch_warnings():  # fvcore's import touches the deprecated torch.jit.script
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape, norm_flop_counter

from . import attention
from .compile import plain_modules
from .observe import Infos, Observed
from .tokens import Tokens

# --------------------------------------------------------------------------- operator handles


def sdpa_macs(inputs, outputs) -> int:
    """``scaled_dot_product_attention(q, k, v, ...)``: Q Kᵀ plus A V, B·H·L_q·L_k·(d + d_v) MACs."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def baddbmm_macs(inputs, outputs) -> int:
    """``baddbmm(input, b1, b2)``: the batched product b·n·m·p (the add is elementwise)."""
    b1, b2 = get_shape(inputs[1]), get_shape(inputs[2])
    return prod(b1) * b2[-1]


def cosine_similarity_macs(inputs, outputs) -> int:
    """x·y, |x|² and |y|² over the broadcast inputs: 3 MACs per element."""
    return 3 * max(prod(get_shape(inputs[0])), prod(get_shape(inputs[1])))


def vector_norm_macs(inputs, outputs) -> int:
    return prod(get_shape(inputs[0]))


OP_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_macs,
    "aten::rms_norm": norm_flop_counter(2),  # fvcore's norm convention (like layer_norm)
    "aten::baddbmm": baddbmm_macs,
    "aten::cosine_similarity": cosine_similarity_macs,
    "aten::linalg_vector_norm": vector_norm_macs,
    "aten::norm": vector_norm_macs,
}

# Zero MACs by convention (fvcore/DiT count multiply-accumulate operators and norms only). fvcore's
# own list (shape, copy and integer ops) is kept as well.
IGNORED_OPS = frozenset({
    # elementwise arithmetic and adaLN modulation
    "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::rsub", "aten::mul", "aten::mul_",
    "aten::div", "aten::div_", "aten::neg", "aten::abs", "aten::reciprocal", "aten::addcmul",
    "aten::addcmul_", "aten::addcdiv", "aten::lerp", "aten::square", "aten::pow", "aten::sqrt", "aten::diff",
    "aten::rsqrt", "aten::exp", "aten::exp_", "aten::threshold", "aten::log", "aten::log1p", "aten::sin",
    "aten::cos", "aten::sign", "aten::round", "aten::trunc", "aten::clamp_min", "aten::clamp_max",
    "aten::maximum", "aten::minimum",
    # activations and softmax
    "aten::silu", "aten::silu_", "aten::gelu", "aten::gelu_", "aten::sigmoid", "aten::tanh",
    "aten::softmax", "aten::log_softmax", "aten::softplus", "aten::leaky_relu", "aten::hardtanh",
    # comparisons, logic, selection
    "aten::lt", "aten::le", "aten::ne", "aten::where", "aten::logical_and", "aten::logical_or",
    "aten::logical_not", "aten::__or__", "aten::__xor__", "aten::isnan", "aten::masked_fill_",
    "aten::masked_select", "aten::masked_scatter", "aten::bitwise_and", "aten::bitwise_or",
    # reductions, scans, sorting
    "aten::sum", "aten::mean", "aten::amax", "aten::amin", "aten::min", "aten::argmax", "aten::argmin",
    "aten::cumsum", "aten::cumprod", "aten::sort", "aten::argsort", "aten::topk", "aten::any", "aten::all",
    # indexing and data movement
    "aten::embedding", "aten::index_select", "aten::index_add", "aten::index_add_", "aten::scatter",
    "aten::scatter_", "aten::scatter_add", "aten::scatter_add_", "aten::take_along_dim", "aten::repeat",
    "aten::repeat_interleave", "aten::expand_as", "aten::view_as", "aten::flip", "aten::unfold",
    "aten::pad", "aten::clone", "aten::alias", "aten::lift_fresh", "aten::numpy_T", "aten::movedim",
    "aten::unflatten", "aten::unique_dim", "aten::isin", "aten::bincount",
    "aten::tensor_split", "aten::tile", "aten::broadcast_tensors", "aten::_unsafe_view",
    "aten::resolve_conj", "aten::resolve_neg", "aten::detach_", "aten::item", "aten::_local_scalar_dense",
    # creation and random draws
    "aten::ones_like", "aten::empty_like", "aten::new_ones", "aten::fill_", "aten::zero_", "aten::tensor",
    "aten::scalar_tensor", "aten::linspace", "aten::meshgrid", "aten::rand", "aten::randn", "aten::randint",
    "aten::rand_like", "aten::randn_like", "aten::bernoulli", "aten::bernoulli_", "aten::normal",
    "aten::uniform_", "aten::dropout_",
})

# --------------------------------------------------------------------------- components

MODEL_COMPONENTS = {"t_embedder": "embeddings", "y_embedder": "embeddings", "backbone": "backbone", "": "other"}


def component_map(model: nn.Module) -> dict[str, str]:
    """{module-name prefix: component} for a `DiffusionTransformer` (longest prefix wins).

    The model names its own parts; the tokenizer and each reducer declare theirs (``flop_components``);
    what a plugin leaves undeclared is counted under "tokenizer" or "reducer:<name>".
    """
    cmap = dict(MODEL_COMPONENTS)
    cmap["tokenizer"] = "tokenizer"
    cmap.update({_join("tokenizer", k): v for k, v in model.tokenizer.flop_components.items()})
    for i, reducer in enumerate(model.reducers):
        cmap[f"reducers.{i}"] = f"reducer:{reducer.name or type(reducer).__name__}"
        cmap.update({_join(f"reducers.{i}", k): v for k, v in reducer.flop_components.items()})
    return cmap


def component_names(model: nn.Module) -> list[str]:
    """Components in data-flow order (the tokenizer's ``flop_order``, else DiT's: embeddings, its own
    parts, backbone, final layer)."""
    declared = list(dict.fromkeys(model.tokenizer.flop_components.values()))
    order = list(model.tokenizer.flop_order) or ["embeddings", *declared, "backbone", "final layer"]
    return list(dict.fromkeys([*order, *declared]))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _component_of(name: str, cmap: dict[str, str]) -> str:
    while name not in cmap:
        name = name.rpartition(".")[0]
    return cmap[name]


def components_from_modules(model: nn.Module, module_counts: dict[str, int]) -> dict[str, int]:
    """Sum each module's *own* count (its total minus its children's) into its component."""
    cmap = component_map(model)
    out = {c: 0 for c in component_names(model)}
    for name, module in model.named_modules():
        own = module_counts.get(name, 0) - sum(module_counts.get(_join(name, c), 0) for c, _ in module.named_children())
        if own:
            comp = _component_of(name, cmap)
            out[comp] = out.get(comp, 0) + own
    return out


def params_by_component(model: nn.Module) -> dict[str, int]:
    cmap = component_map(model)
    out = {c: 0 for c in component_names(model)}
    for name, p in model.named_parameters():
        comp = _component_of(name.rpartition(".")[0], cmap)
        out[comp] = out.get(comp, 0) + p.numel()
    return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- one traced forward


@dataclass
class Trace:
    """One exactly counted forward: MACs of the whole call, by component, the backbone lengths seen."""

    macs: int
    components: dict[str, int]
    lengths: list[int]
    unsupported: Counter


class _Call(nn.Module):
    """fvcore traces positional tensors only: this binds the budget keywords; the evaluation is
    observed like any other (`dyncompute.observe`) to read the backbone lengths it reports."""

    def __init__(self, model: nn.Module, budget: dict):
        super().__init__()
        self.model, self.budget, self.infos = model, budget, Infos()

    def forward(self, x, t, y):
        return Observed(self.model, [self.infos])(x, t, y=y, **self.budget)

    @property
    def lengths(self) -> list[int]:
        return list(self.infos.infos[-1].tokens_per_sample) if self.infos.infos else []


class _CallBackbone(nn.Module):
    def __init__(self, backbone: nn.Module, tokens: Tokens):
        super().__init__()
        self.backbone, self.tokens = backbone, tokens

    def forward(self, x, c):
        return self.backbone(self.tokens.with_x(x), c).x


@contextlib.contextmanager
def counting(model: nn.Module):
    """Eval mode, no grad, eager (a compiled model is traced as written), and the per-sample
    attention path (counted on real lengths)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings(), plain_modules(model), attention.varlen_kernel("grouped"):
            warnings.simplefilter("ignore")
            yield
    finally:
        model.train(was_training)


def _analysis(module: nn.Module, inputs: tuple, owner: nn.Module) -> FlopCountAnalysis:
    fa = FlopCountAnalysis(module, inputs).set_op_handle(**OP_HANDLES)
    ignored = set(IGNORED_OPS) | {op for m in owner.modules() for op in getattr(m, "flop_ignored_ops", ())}
    # fvcore names an autograd.Function "prim::PythonOp.<name>" but ignores bare kinds only: a zero handle
    fa.set_op_handle(**{op: _zero if op.startswith("prim::PythonOp.") else None for op in ignored})
    return fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")


def _zero(inputs, outputs) -> int:
    return 0


def trace_forward(model: nn.Module, x, t, y, budget: dict | None = None) -> Trace:
    """Exact MACs of ``model(x, t, y, **budget)`` as it runs (padding included)."""
    call = _Call(model, dict(budget or {}))
    dev = _device(model)
    with counting(model):
        fa = _analysis(call, (x.to(dev), t.to(dev), y.to(dev)), model)
        counts = fa.by_module()
    module_counts = {k[len("model."):] if k.startswith("model.") else "": v
                     for k, v in counts.items() if k == "model" or k.startswith("model.")}
    return Trace(int(counts[""]), components_from_modules(model, module_counts), call.lengths,
                 Counter(fa.unsupported_ops()))


def backbone_macs(model: nn.Module, length: int) -> int:
    """Exact MACs of ``model.backbone`` on one sample of ``length`` synthetic tokens."""
    width = cond = model.config.hidden_size
    tokens = Tokens.from_lengths(torch.zeros(length, width), [length], torch.zeros(length, 2, dtype=torch.long))
    dev = _device(model)
    tokens = Tokens(tokens.x.to(dev), tokens.cu_seqlens.to(dev), tokens.pos.to(dev), tokens.batch.to(dev),
                    tokens.lengths)
    with counting(model):
        fa = _analysis(_CallBackbone(model.backbone, tokens), (tokens.x, torch.zeros(1, cond, device=dev)), model)
        return int(fa.total())


class _SkipOps:
    """Stands in for the reducer hooks of one block: the attention and MLP branches are not run (their
    output is zero), so a trace counts only the rest of the block (the adaLN projection)."""

    @staticmethod
    def token_op(point, block, op, h, *args):
        return torch.zeros_like(h)


class _Fn(nn.Module):
    """A function as a module for fvcore; ``owner`` (the model whose weights ``fn`` uses) is registered
    so that the tracer sees its parameters as parameters, not constants."""

    def __init__(self, fn, owner: nn.Module | None = None):
        super().__init__()
        self.fn, self.owner = fn, owner

    def forward(self, *args):
        return self.fn(*args)


BLOCK_PARTS = ("base", "attention", "mlp")


def block_part_macs(model: nn.Module, part: str, length: int, groups: tuple[int, int] | None = None) -> int:
    """Exact MACs of one DiT block's ``part`` on one sample of ``length`` tokens.

    "attention" and "mlp" are the branch ops a token hook wraps, each with its adaLN-modulated norm
    (run on however many tokens a reducer hands them), at full width or, given ``groups`` = (k, G), with
    the first k of G heads / hidden-channel groups on (`dyncompute.width`: the others are not computed);
    "base" is the rest of the block (the adaLN projection of the conditioning). Every block has the same
    shapes, so block 0 stands for all.
    """
    from .backbone import Branch

    if part not in BLOCK_PARTS:
        raise ValueError(f"unknown block part {part!r}; known: {', '.join(BLOCK_PARTS)}")
    if length == 0 and part != "base":
        return 0
    block, width = model.backbone.blocks[0], model.config.hidden_size
    dev = _device(model)
    tokens = Tokens.from_lengths(torch.zeros(length, width, device=dev), [length],
                                 torch.zeros(length, 2, dtype=torch.long, device=dev))
    x, c = torch.zeros(1, length, width, device=dev), torch.zeros(1, width, device=dev)
    kw = {}
    if groups is not None:
        on, total = groups
        kw["active"] = (torch.arange(total, device=dev) < on).float()[None]

    def branch(norm, op, v):  # shift = 1 + scale = v
        return Branch(norm, op, v, v)

    fns = {"attention": lambda h, v: branch(block.norm1, block.attn, v)(h, tokens, **kw),
           "mlp": lambda h, v: branch(block.norm2, block.run_mlp, v)(h, tokens, **kw),
           "base": lambda h, v: block(h, v, tokens, _SkipOps())}
    return count_macs(fns[part], x, c, owner=model)


def count_macs(fn, *inputs, owner: nn.Module | None = None) -> int:
    """Exact MACs of ``fn(*inputs)`` by the conventions of this module (reducers count their own
    arithmetic with it); an operator without a handle is an error here, never a silent zero."""
    module = _Fn(fn, owner)
    with torch.no_grad(), warnings.catch_warnings(), plain_modules(owner or module), attention.varlen_kernel("grouped"):
        warnings.simplefilter("ignore")
        fa = _analysis(module, inputs, module)
        total, unsupported = int(fa.total()), fa.unsupported_ops()
    if unsupported:
        raise ValueError(f"operators without a MAC handle in a counted function: {dict(unsupported)}")
    return total


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# --------------------------------------------------------------------------- per-sample inputs


@dataclass
class Row:
    """One sample's model input: x (C, H, W), scalar t and y, and its own budget values."""

    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    budget: dict[str, float] = field(default_factory=dict)


def split_rows(x, t, y, budget: dict | None = None) -> list[Row]:
    budget = budget or {}
    rows = []
    for b in range(len(x)):
        own = {k: _row_value(v, b, len(x)) for k, v in budget.items()}
        rows.append(Row(x[b].detach().cpu(), t.reshape(-1)[b].detach().cpu(), y.reshape(-1)[b].detach().cpu(), own))
    return rows


def _row_value(v, b: int, n: int) -> float:
    if torch.is_tensor(v):
        return float(v.reshape(-1)[b]) if v.numel() == n else float(v.reshape(-1)[0])
    return float(v)


def stack_rows(rows: list[Row]):
    """(x, t, y, budget) of a batch of rows; a budget value shared by every row stays a float."""
    budget = {}
    for k in rows[0].budget:
        values = [r.budget[k] for r in rows]
        budget[k] = values[0] if len(set(values)) == 1 else torch.tensor(values, dtype=torch.float32)
    return torch.stack([r.x for r in rows]), torch.stack([r.t for r in rows]), torch.stack([r.y for r in rows]), budget


# --------------------------------------------------------------------------- per forward


@dataclass
class ForwardCount:
    """MACs of one forward over a batch (totals); ``to_dict()`` gives them per image."""

    useful_macs: int  # valid tokens only: each sample counted alone
    executed_macs: int  # what ran for the batch, padding included
    params: int
    batch_size: int
    tokens_per_sample: list[int]
    per_sample_useful_macs: list[int]
    by_component: dict[str, int]  # useful
    by_component_executed: dict[str, int]
    params_by_component: dict[str, int]
    unsupported_ops: dict[str, int]
    wall_ms: float | None = None  # median wall-clock of the batch forward, same run

    @property
    def flops(self) -> int:
        return 2 * self.useful_macs

    @property
    def executed_flops(self) -> int:
        return 2 * self.executed_macs

    def to_dict(self, per_image: bool = True) -> dict:
        """JSON-ready; ``per_image`` divides batch totals by the batch size (per image per forward)."""
        n = self.batch_size if per_image else 1
        d = {
            "units": {"macs": "multiply-accumulates" + (" per image per forward" if per_image
                                                        else " per batch forward"),
                      "flops": "2 x MACs"},
            "useful_macs": self.useful_macs / n, "executed_macs": self.executed_macs / n,
            "flops": self.flops / n, "executed_flops": self.executed_flops / n, "params": self.params,
            "by_component": {k: v / n for k, v in self.by_component.items()},
            "by_component_executed": {k: v / n for k, v in self.by_component_executed.items()},
            "params_by_component": self.params_by_component, "batch_size": self.batch_size,
            "tokens_per_sample": self.tokens_per_sample, "per_sample_useful_macs": self.per_sample_useful_macs,
            "unsupported_ops": self.unsupported_ops,
        }
        if self.wall_ms is not None:
            d["wall_ms_per_forward"] = self.wall_ms / n
        return d

    def table(self) -> pd.DataFrame:
        """Per-image component table (GMACs, GFLOPs, share, parameters)."""
        n = self.batch_size
        comps = list(dict.fromkeys([*self.by_component, *self.by_component_executed, *self.params_by_component]))
        df = pd.DataFrame({
            "component": comps,
            "useful_GMACs": [self.by_component.get(c, 0) / n / 1e9 for c in comps],
            "executed_GMACs": [self.by_component_executed.get(c, 0) / n / 1e9 for c in comps],
            "useful_GFLOPs": [2 * self.by_component.get(c, 0) / n / 1e9 for c in comps],
            "params_M": [self.params_by_component.get(c, 0) / 1e6 for c in comps],
        })
        total = {"component": "total", "useful_GMACs": self.useful_macs / n / 1e9,
                 "executed_GMACs": self.executed_macs / n / 1e9, "useful_GFLOPs": self.flops / n / 1e9,
                 "params_M": self.params / 1e6}
        df = pd.concat([df, pd.DataFrame([total])], ignore_index=True)
        df["share_%"] = 100 * df["useful_GMACs"] / max(total["useful_GMACs"], 1e-30)
        return df


def count_forward(model: nn.Module, x, t, y, time_repeats: int = 0, **budget) -> ForwardCount:
    """Exact useful and executed MACs of ``model(x, t, y, **budget)``, by component."""
    executed = trace_forward(model, x, t, y, budget)
    if len(set(executed.lengths)) <= 1:  # no padding between equal-length samples
        singles = [_per_sample_share(executed, len(x))] * len(x)
    else:
        cache: dict[int, Trace] = {}
        singles = []
        for row, length in zip(split_rows(x, t, y, budget), executed.lengths):
            if length not in cache:
                cache[length] = trace_forward(model, *stack_rows([row]))
            singles.append(cache[length])
    useful = _sum_components(s.components for s in singles)
    return ForwardCount(
        useful_macs=sum(s.macs for s in singles), executed_macs=executed.macs, params=count_parameters(model),
        batch_size=len(x), tokens_per_sample=executed.lengths, per_sample_useful_macs=[s.macs for s in singles],
        by_component=useful, by_component_executed=executed.components,
        params_by_component=params_by_component(model),
        unsupported_ops=dict(executed.unsupported + sum((s.unsupported for s in singles), Counter())),
        wall_ms=time_forward(model, x, t, y, time_repeats, **budget) if time_repeats else None,
    )


def _per_sample_share(trace: Trace, n: int) -> Trace:
    return Trace(trace.macs // n, {k: v // n for k, v in trace.components.items()}, trace.lengths[:1], Counter())


def _sum_components(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0) + v
    return out


def time_forward(model: nn.Module, x, t, y, repeats: int = 3, warmup: int = 1, **budget) -> float:
    """Median wall-clock milliseconds of one no-grad forward of the batch."""
    dev = _device(model)
    x, t, y = x.to(dev), t.to(dev), y.to(dev)
    times, was_training = [], model.training
    model.eval()
    with torch.no_grad():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            model(x, t, y, **budget)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    model.train(was_training)
    return statistics.median(times)


# --------------------------------------------------------------------------- measurement inputs


def measurement_inputs(model: nn.Module, n: int = 8, seed: int = 0, latent_root: str | None = None):
    """(x_t, t, y): real images noised at uniformly drawn timesteps, the inputs a training step sees.

    Images are ImageNet latents from ``latent_root`` (fast-DiT's layout, `latent_folder`) when that
    folder exists, else the built-in procedural dataset at the model's channels and size as a stand-in.
    """
    from pathlib import Path

    from .data.latents import LatentFolder
    from .data.procedural import ProceduralShapes
    from .diffusion import create_diffusion

    if latent_root and Path(latent_root).is_dir():
        data = LatentFolder(latent_root, num_classes=model.num_classes)
    else:
        data = ProceduralShapes(size=model.input_size, channels=model.in_channels, seed=seed)
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data), generator=g)[:n].tolist()
    x0 = torch.stack([data[i]["x"] for i in index])
    t = torch.randint(0, 1000, (len(x0),), generator=g)
    y = torch.randint(0, model.num_classes, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return create_diffusion("").q_sample(x0, t, noise), t, y


# --------------------------------------------------------------------------- report columns


def forward_columns(model: nn.Module, num_inputs: int = 4, seed: int = 0) -> dict:
    """Labelled per-forward columns (per image, useful and executed) and parameters."""
    fwd = count_forward(model, *measurement_inputs(model, num_inputs, seed), time_repeats=3)
    return {
        "per_forward_GMACs": fwd.useful_macs / fwd.batch_size / 1e9,
        "per_forward_GFLOPs": fwd.flops / fwd.batch_size / 1e9,
        "per_forward_executed_GMACs": fwd.executed_macs / fwd.batch_size / 1e9,
        "per_forward_wall_ms_per_image": fwd.wall_ms / fwd.batch_size,
        "params": fwd.params,
    }
