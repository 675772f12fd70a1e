"""The reducer seam: compute reducers attach at declared hook points, never by patching a model.

Hook points
- ``attention`` and ``mlp`` (token level, inside every `DiTBlock`): the reducer receives the branch's op
  and the block input at that point (the residual stream) and returns the op's output for every input
  token. The op includes the branch's adaLN-modulated norm (`backbone.Branch`), so token merging
  (merge -> op -> unmerge) merges the residual stream, and a feature cache that returns a stored output
  skips the norm as well. The context also carries the block and ``prepare`` (the op's own input).
- ``step`` (step level, around "backbone + back to the grid" in `DiffusionTransformer.forward`): the
  reducer receives a function that runs the backbone and `Tokenizer.to_grid`, and returns grid
  features. Grid features have one row per position of the tokenizer's fixed grid, whatever tokens the
  backbone saw, so a step cache stays valid when the number of tokens changes from step to step. The
  context also offers the two halves apart (``ctx.backbone(tokens)``, ``ctx.to_grid(tokens)``), for a
  cache that reuses the backbone's residual on the tokens (TeaCache).

Per-trajectory state lives in a `StepCache` that the sampling call allocates (`new_step_cache`) and
passes through the model kwargs on every evaluation; two sampling calls never share state. State of
one forward (e.g. a merge plan shared by a block's attention and MLP) lives in the per-forward
``scratch`` dict each hook's context carries; nothing is kept on the reducer module between calls.

Width: a token hook may call its op with ``active=`` (B, G), a per-sample mask over G equal groups of
the op's width (heads; MLP hidden-channel groups, `dyncompute.width`); `BlockRun` records how many ran.
Trained reducers (DyDiT) create their parameters in ``bind`` (sized from the model), return
auxiliary losses from their per-forward ``scratch`` (`Reducer.aux_losses`, added to
``ForwardInfo.aux_losses`` as ``<name>.<loss>``) and may anneal settings per training step (``schedule``).

Reducers report what ran in `ForwardInfo` (`BlockRun`, ``backbone_ran``) and, through ``report``,
their own arithmetic as ``work``: per batch row, a list of ``(kind, size)`` items whose exact MACs
``Reducer.work_macs`` counts (with fvcore, like everything else). The accounting
(:mod:`dyncompute.trajectory`) composes a forward's cost from these reports.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from .errors import UserError
from .tokens import Tokens
from .width import groups_on

TOKEN_HOOKS = ("attention", "mlp")
HOOK_POINTS = (*TOKEN_HOOKS, "step")

Op = Callable[..., torch.Tensor]  # op(h, tokens, **kw) -> output with h's layout


@dataclass
class BlockRun:
    """Tokens per sample that one block's attention and MLP actually processed and, when the op ran
    with a width mask, per sample (groups that ran, groups in all)."""

    attention: tuple[int, ...] = ()
    mlp: tuple[int, ...] = ()
    attention_groups: tuple[tuple[int, int], ...] | None = None
    mlp_groups: tuple[tuple[int, int], ...] | None = None

    def groups(self, point: str, row: int) -> tuple[int, int] | None:
        """(groups that ran, groups) of sample ``row`` at ``point``; None: full width."""
        per_sample = getattr(self, f"{point}_groups")
        return None if per_sample is None else per_sample[row]


@dataclass
class ForwardInfo:
    """What a forward pass reports besides its prediction.

    ``tokens_per_sample``: backbone input length per sample; ``blocks``: what each block processed
    (empty when the backbone did not run); ``backbone_ran``: False when a step reducer reused a cache;
    ``reducers``: each reducer's own report, keyed by its registered name; ``state``: the tokenizer's;
    ``budget``: the budget keywords the tokenizer ran with (per-sample tensors under Lite-CFG).
    """

    tokens_per_sample: list[int]
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    state: Any = None
    backbone_ran: bool = False
    blocks: list[BlockRun] = field(default_factory=list)
    reducers: dict[str, dict] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)

    @property
    def backbone_computed(self) -> bool:
        """True when the backbone computed attention or MLP on some token (a *backbone evaluation*);
        False when a step cache skipped it or every block reused cached outputs."""
        if not self.backbone_ran:
            return False
        return not self.blocks or any(run.attention or run.mlp for run in self.blocks)


@dataclass
class StepCache:
    """State of one sampling trajectory: the evaluation index and each reducer's own cache."""

    states: dict[int, Any]
    num_evaluations: int | None = None  # evaluations the sampler plans (None: adaptive)
    evaluation: int = -1  # index of the current evaluation (advanced by the model's forward)

    def advance(self) -> None:
        self.evaluation += 1

    @property
    def is_last(self) -> bool:
        return self.num_evaluations is not None and self.evaluation >= self.num_evaluations - 1


@dataclass
class BlockContext:
    """What a token-level hook sees: the block, the tokens' layout, conditioning and trajectory state.

    ``module``: the `DiTBlock`; ``prepare(h, tokens)``: the op's input (the adaLN-modulated norm of the
    block input); ``scratch``: this reducer's state for the current forward only.
    """

    block: int
    tokens: Tokens
    c: torch.Tensor
    t: torch.Tensor
    cache: Any  # this reducer's StepCache entry (None outside a sampling call)
    step: StepCache | None
    module: nn.Module | None = None
    prepare: Callable[[torch.Tensor, Tokens], torch.Tensor] | None = None
    scratch: dict = field(default_factory=dict)


@dataclass
class StepContext:
    """What a step-level hook sees: the encoded tokens, the tokenizer state and the trajectory state.

    ``backbone(tokens) -> Tokens`` and ``to_grid(tokens) -> grid features`` are the two halves of the
    ``run`` the hook receives; calling ``run()`` is ``to_grid(backbone(tokens))``.
    """

    tokens: Tokens
    state: Any
    c: torch.Tensor
    t: torch.Tensor
    cache: Any
    step: StepCache | None
    model: nn.Module
    backbone: Callable[[Tokens], Tokens] | None = None
    to_grid: Callable[[Tokens], torch.Tensor] | None = None
    scratch: dict = field(default_factory=dict)


class Reducer(nn.Module):
    """Base class of reducer plugins; subclasses declare ``hook_points`` and override those hooks.

    ``name`` is the registered name (set by the registry's builder or the subclass). Reducers are
    modules so that trained ones (e.g. DyDiT's routers) keep their parameters in the model's state dict.
    """

    hook_points: ClassVar[tuple[str, ...]] = ()
    flop_components: ClassVar[dict[str, str]] = {}  # like `Tokenizer.flop_components`
    flop_ignored_ops: ClassVar[tuple[str, ...]] = ()
    trained: ClassVar[bool] = False  # parameters learnt in training: its settings are training settings
    name: str = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        unknown = set(cls.hook_points) - set(HOOK_POINTS)
        if unknown:
            raise TypeError(f"{cls.__name__} declares unknown hook point(s) {sorted(unknown)}; "
                            f"known: {', '.join(HOOK_POINTS)}")

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError when this reducer cannot apply to ``model`` (e.g. its tokenizer)."""

    def bind(self, model: nn.Module) -> None:
        """Called once by the model after `check_model`: a trained reducer creates its parameters here,
        sized from the model (width, depth, heads)."""

    def new_cache(self) -> Any:
        """Per-trajectory state, allocated once per sampling call."""
        return None

    def attention(self, op: Op, h: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        return op(h, ctx.tokens)

    def mlp(self, op: Op, h: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        return op(h, ctx.tokens)

    def step(self, run: Callable[[], torch.Tensor], ctx: StepContext) -> torch.Tensor:
        return run()

    def report(self, cache: Any, scratch: dict) -> dict:
        """What this reducer did in the last forward (lands in ``ForwardInfo.reducers``).

        ``work`` (optional): per batch row, the ``(kind, size)`` items of this reducer's own arithmetic
        (counted by `work_macs`); ``executed_work``: the same where padding made a row cost more than
        its useful work (default: ``work``).
        """
        return {}

    def work_macs(self, model: nn.Module, kind: str, size: tuple) -> int:
        """Exact MACs of one ``(kind, size)`` work item this reducer reported (see `report`)."""
        raise NotImplementedError(f"{type(self).__name__} reports work {kind!r} but does not count it")

    def aux_losses(self, scratch: dict) -> dict[str, torch.Tensor]:
        """Auxiliary training losses (already weighted) from this forward's ``scratch``."""
        return {}

    def schedule(self, step: int) -> None:
        """Called by the trainer before optimisation step ``step`` (0-based), e.g. for annealed settings."""

    @classmethod
    def calibrate(cls, run_dir: str, out: str | None = None, **settings) -> dict:
        """Fit this reducer's settings to a trained run (``dyncompute calibrate NAME RUN_DIR``)."""
        raise UserError(f"reducer {cls.__name__} has nothing to calibrate")


class Hooks:
    """The reducers of one forward, composed at each hook point (first listed = outermost)."""

    def __init__(self, reducers, step: StepCache | None, t: torch.Tensor, c: torch.Tensor):
        self.reducers, self.step_cache, self.t, self.c = list(reducers), step, t, c
        self.runs: list[BlockRun] = []
        self.scratch: dict[int, dict] = {i: {} for i in range(len(self.reducers))}  # per forward

    def _cache(self, i: int) -> Any:
        return None if self.step_cache is None else self.step_cache.states.get(i)

    def token_op(self, point: str, block: int, op: Op, h: torch.Tensor, tokens: Tokens,
                 module: nn.Module | None = None, prepare: Op | None = None) -> torch.Tensor:
        """Run ``op`` (a `backbone.Branch`: norm, modulation and attention or MLP) on the block input ``h``
        at a token hook point, through every reducer that declares it; ``module`` is the block and
        ``prepare`` the op's input transform (both shown to the reducers)."""
        while len(self.runs) <= block:
            self.runs.append(BlockRun())
        run = self.runs[block]

        def innermost(h_, tokens_, **kw):
            setattr(run, point, tokens_.lengths)  # what the op really processed, for the accounting
            active = kw.get("active")
            if active is not None:
                setattr(run, f"{point}_groups", tuple((n, active.shape[1]) for n in groups_on(active)))
            return op(h_, tokens_, **kw)

        call = innermost
        for i, reducer in reversed(list(enumerate(self.reducers))):
            if point in reducer.hook_points:
                call = self._wrap(reducer, point, call, i, block, module, prepare)
        return call(h, tokens)

    def _wrap(self, reducer: Reducer, point: str, inner: Op, i: int, block: int, module, prepare) -> Op:
        hook = {"attention": reducer.attention, "mlp": reducer.mlp}[point]

        def call(h, tokens, **kw):
            op = functools.partial(inner, **kw) if kw else inner
            ctx = BlockContext(block, tokens, self.c, self.t, self._cache(i), self.step_cache, module, prepare,
                               self.scratch[i])
            return hook(op, h, ctx)

        return call

    def step(self, run: Callable[[], torch.Tensor], tokens: Tokens, state: Any, model: nn.Module,
             backbone: Callable[[Tokens], Tokens] | None = None,
             to_grid: Callable[[Tokens], torch.Tensor] | None = None) -> torch.Tensor:
        """Run "backbone + back to the grid" through every reducer that declares the step hook."""
        call = run
        for i, reducer in reversed(list(enumerate(self.reducers))):
            if "step" in reducer.hook_points:
                ctx = StepContext(tokens, state, self.c, self.t, self._cache(i), self.step_cache, model,
                                  backbone, to_grid, self.scratch[i])
                call = functools.partial(reducer.step, call, ctx)
        return call()

    def reports(self) -> dict[str, dict]:
        return {_name(r): r.report(self._cache(i), self.scratch[i]) for i, r in enumerate(self.reducers)}

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Every reducer's auxiliary losses of this forward, keyed ``<name>.<loss>``."""
        return {f"{_name(r)}.{k}": v for i, r in enumerate(self.reducers)
                for k, v in r.aux_losses(self.scratch[i]).items()}


def _name(reducer: Reducer) -> str:
    return reducer.name or type(reducer).__name__


def new_step_cache(reducers, num_evaluations: int | None = None) -> StepCache:
    """A fresh trajectory state for ``reducers`` (one entry per reducer)."""
    return StepCache({i: r.new_cache() for i, r in enumerate(reducers)}, num_evaluations)
