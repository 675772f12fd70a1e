"""Compute over a sampling trajectory: every model evaluation's real per-sample token counts.

`TrajectoryRecorder` observes a sampling call (`dyncompute.observe`) and records each evaluation's
per-sample backbone lengths, CFG branch, budgets and whether the backbone ran (a step-caching reducer
may skip it), as the model's `ForwardInfo` reports them. `SampleCost` turns a length into per-sample useful
MACs by component (exact counts from :mod:`dyncompute.flops`, interpolated where verified), and
`TrajectoryCount` sums them per image and per step. Units as in :mod:`dyncompute.flops`.

With reducers, a row's cost is composed from what the forward reported (its `RowSignature`): the model
outside the backbone at the row's length L (as above); per block, the block's base (adaLN, norms) at L
plus its attention and MLP at the token counts they really processed (after merging; 0 when a cache
answered), each counted exactly with fvcore on synthetic tokens; nothing of the backbone when a step
cache skipped it; and each reducer's own reported work (matching, forecasts, change indicators),
counted by the reducer with fvcore. Each distinct signature is counted once.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

import pandas as pd
import torch.nn as nn

from .flops import Row, Trace, backbone_macs, block_part_macs, forward_columns, split_rows, stack_rows, trace_forward
from .observe import Evaluation
from .sampling import generate

# --------------------------------------------------------------------------- per-sample cost model


class _Quadratic:
    """Exact (rational) Lagrange interpolation of per-component values through up to 3 lengths."""

    def __init__(self, points: dict[int, dict[str, int]]):
        self.points = dict(sorted(points.items()))
        keys = list(self.points)
        self.nodes = keys if len(keys) <= 3 else [keys[0], keys[len(keys) // 2], keys[-1]]

    def __call__(self, length: int) -> dict[str, float]:
        if length in self.points:
            return dict(self.points[length])
        comps = set().union(*(self.points[n] for n in self.nodes))
        out = {}
        for c in comps:
            total = Fraction(0)
            for i, a in enumerate(self.nodes):
                w = Fraction(1)
                for j, b in enumerate(self.nodes):
                    if i != j:
                        w *= Fraction(length - b, a - b)
                total += w * self.points[a].get(c, 0)
            out[c] = float(total)
        return out

    def verified(self, rtol: float = 1e-9) -> bool | None:
        """True/False when a length outside the nodes checks the fit; None when nothing can check it."""
        held_out = [n for n in self.points if n not in self.nodes]
        if not held_out:
            return None
        fit = _Quadratic({n: self.points[n] for n in self.nodes})
        return all(_close(fit(n), self.points[n], rtol) for n in held_out)


def _close(a: dict, b: dict, rtol: float) -> bool:
    scale = max(1.0, sum(abs(v) for v in b.values()))
    return all(abs(a.get(k, 0) - b.get(k, 0)) <= rtol * scale for k in set(a) | set(b))


def _size_fit(count, dims: int):
    """A function of the size equal to ``count`` where verified: a quadratic through 1, 2, 3 checked at
    4 (one dimension), a * b * count(1, 1) checked at (2, 3) and (3, 2) (two); None otherwise."""
    if dims == 1:
        fit = _Quadratic({n: {"m": count((n,))} for n in (1, 2, 3, 4)})
        return (lambda size: round(fit(size[0])["m"])) if fit.verified() else None
    if dims == 2:
        unit = count((1, 1))
        if count((2, 3)) == 6 * unit and count((3, 2)) == 6 * unit:
            return lambda size: unit * size[0] * size[1]
    return None


@dataclass(frozen=True)
class RowSignature:
    """What one batch row of one forward computed, as its `ForwardInfo` reported it.

    ``blocks``: per block, (attention tokens, MLP tokens, attention groups, MLP groups) the ops processed,
    groups (ran, of) or None at full width; None when the model has no reducers (every block processed
    all L tokens at full width). ``work``: (reducer index, kind, size) items of the
    reducers' own arithmetic; ``executed_work``: the same with padding, when it differs.
    """

    length: int
    backbone_ran: bool = True
    blocks: tuple | None = None
    work: tuple = ()
    executed_work: tuple | None = None


class SampleCost:
    """Per-sample useful MACs by component as a function of the backbone length L.

    ``backbone``: exact at any L (synthetic tokens; a quadratic through L = 1, 2, 3 checked at 4,
    else traced per L). The rest of the model: exact counts of recorded inputs (one per length),
    interpolated between measured lengths by a quadratic in L that a held-out length must confirm.
    ``waste(L, M)``: MACs spent on padding a sample of length L to the batch's longest, M.
    """

    def __init__(self, model: nn.Module, max_fit_points: int = 4):
        self.model, self.max_fit_points = model, max_fit_points
        self.rows: dict[int, Row] = {}  # one recorded input per backbone length
        self.exact: dict[int, Trace] = {}
        self._backbone: dict[int, int] = {}
        self._backbone_fit: _Quadratic | None = None
        self._rest: _Quadratic | None = None
        self._waste: _Quadratic | None = None
        self._fits: dict[tuple, object] = {}
        self._work: dict[tuple, int] = {}
        self._signatures: dict[RowSignature, tuple[dict[str, float], float]] = {}
        self.token_reducers = any({"attention", "mlp"} & set(r.hook_points) for r in model.reducers)
        self.notes: list[str] = []

    # -- inputs
    def observe(self, rows: list[Row], lengths: list[int]) -> None:
        for row, n in zip(rows, lengths):
            self.rows.setdefault(int(n), row)
        self._rest = None

    # -- backbone
    def backbone(self, length: int) -> int:
        if length not in self._backbone:
            if self._backbone_fit is None:
                pts = {n: {"backbone": backbone_macs(self.model, n)} for n in (1, 2, 3, 4)}
                self._backbone.update({n: p["backbone"] for n, p in pts.items()})
                fit = _Quadratic(pts)
                self._backbone_fit = fit if fit.verified() else False
            if length not in self._backbone:
                self._backbone[length] = (round(self._backbone_fit(length)["backbone"]) if self._backbone_fit
                                          else backbone_macs(self.model, length))
        return self._backbone[length]

    # -- the rest of the model
    def measure(self, length: int) -> Trace:
        if length not in self.exact:
            trace = trace_forward(self.model, *stack_rows([self.rows[length]]))
            got = trace.lengths[0]
            if got != length:
                self.notes.append(f"a sample recorded at L={length} gave L={got} when counted alone")
            self.exact[got] = trace
            self.exact.setdefault(length, trace)
        return self.exact[length]

    def calibrate(self) -> None:
        lengths = sorted(self.rows)
        if len(lengths) > self.max_fit_points:
            k = self.max_fit_points
            lengths = sorted({lengths[round(i * (len(lengths) - 1) / (k - 1))] for i in range(k)})
        for n in lengths:
            self.measure(n)
        self._rest = _Quadratic({n: self._rest_of(self.exact[n], n) for n in self.exact})
        if self._rest.verified() is False:
            self.notes.append("per-sample cost is not quadratic in L: every length is counted exactly")
            for n in self.rows:
                self.measure(n)
            self._rest = _Quadratic({n: self._rest_of(self.exact[n], n) for n in self.exact})
            self._rest.nodes = []  # exact points only

    def _rest_of(self, trace: Trace, length: int) -> dict[str, int]:
        """Everything outside the backbone (token-level reducers run inside it and are counted apart)."""
        rest = {k: v for k, v in trace.components.items() if k != "backbone"}
        traced = trace.components.get("backbone", 0)
        if not self.token_reducers and traced != self.backbone(length):
            self.notes.append(f"backbone counted in the model ({traced}) differs from "
                              f"synthetic tokens ({self.backbone(length)}) at L={length}")
        return rest

    def rest(self, length: int) -> dict[str, float]:
        """MACs by component of one sample with ``length`` backbone tokens, the backbone excluded."""
        if self._rest is None:
            self.calibrate()
        if not self._rest.nodes and length not in self._rest.points:
            if length not in self.rows:
                raise ValueError(f"no recorded input has L={length}: the cost is not interpolable, count it exactly")
            self.measure(length)
            self._rest.points[length] = self._rest_of(self.exact[length], length)
        out = self._rest(length)
        out.pop("backbone", None)
        return out

    def useful(self, length: int, backbone: bool = True) -> dict[str, float]:
        """MACs by component of one sample with ``length`` backbone tokens (backbone skipped: False)."""
        return self.row(RowSignature(length, backbone))[0]

    # -- rows of forwards with reducers
    def block_part(self, part: str, length: int, groups: tuple[int, int] | None = None) -> int:
        if length == 0 and part != "base":
            return 0
        return self._fitted(("part", part, groups), (length,),
                            lambda size: block_part_macs(self.model, part, size[0], groups))

    def work(self, reducer: int, kind: str, size: tuple) -> int:
        count = lambda z: self.model.reducers[reducer].work_macs(self.model, kind, z)
        return self._fitted(("work", reducer, kind), tuple(size), count)

    def _fitted(self, key: tuple, size: tuple, count) -> int:
        """Exact ``count(size)`` through a verified polynomial of the size (quadratic in one dimension,
        bilinear in two), so that hundreds of distinct sizes cost a few counts; else counted per size."""
        if key not in self._fits:
            self._fits[key] = _size_fit(count, len(size))
        fit = self._fits[key]
        if fit is not None:
            return fit(size)
        if (key, size) not in self._work:
            self._work[key, size] = count(size)
        return self._work[key, size]

    def row(self, sig: RowSignature) -> tuple[dict[str, float], float]:
        """(useful MACs by component, executed MACs beyond them) of one row; each signature counted once."""
        if sig not in self._signatures:
            out = self.rest(sig.length)
            out["backbone"] = self._backbone_of(sig)
            for i, kind, size in sig.work:
                comp = f"reducer:{self.model.reducers[i].name or type(self.model.reducers[i]).__name__}"
                out[comp] = out.get(comp, 0) + self.work(i, kind, size)
            padded = 0.0
            if sig.executed_work is not None:
                padded = (sum(self.work(i, k, z) for i, k, z in sig.executed_work)
                          - sum(self.work(i, k, z) for i, k, z in sig.work))
            self._signatures[sig] = (out, padded)
        out, padded = self._signatures[sig]
        return dict(out), padded

    def _backbone_of(self, sig: RowSignature) -> int:
        if not sig.backbone_ran:
            return 0
        if sig.blocks is None:
            return self.backbone(sig.length)
        base = self.block_part("base", sig.length)
        return sum(base + self.block_part("attention", a, ga) + self.block_part("mlp", m, gm)
                   for a, m, ga, gm in sig.blocks)

    def extrapolated(self, length: int) -> bool:
        """True when ``length`` lies outside the measured lengths (the rest is extrapolated)."""
        if self._rest is None:
            self.calibrate()
        pts = list(self._rest.points)
        if not self._rest.nodes:  # exact points only
            return length not in pts
        return length not in pts and not (min(pts) <= length <= max(pts) and len(pts) >= 3)

    # -- padding between samples of unequal length
    def waste(self, length: int, longest: int) -> dict[str, float]:
        if length >= longest:
            return {}
        if self._waste is None:
            self._calibrate_waste()
        g_long, g_short = self._waste(longest), self._waste(length)
        return {k: g_long.get(k, 0) - g_short.get(k, 0) for k in set(g_long) | set(g_short)}

    def _pair_waste(self, a: int, b: int) -> dict[str, float]:
        """Padding outside the backbone (the backbone runs on packed tokens: nothing padded there)."""
        trace = trace_forward(self.model, *stack_rows([self.rows[a], self.rows[b]]))
        ua, ub = self.rest(trace.lengths[0]), self.rest(trace.lengths[1])
        comps = {k: v for k, v in trace.components.items() if k != "backbone"}
        return {k: comps.get(k, 0) - ua.get(k, 0) - ub.get(k, 0) for k in set(comps) | set(ua) | set(ub)}

    def _calibrate_waste(self) -> None:
        """g(L) with waste(L, M) = g(M) - g(L): g(L_max) = 0, g(L) = -waste(L, L_max) at two more lengths,
        checked on the pair of those two."""
        lengths = sorted(self.rows)
        top = lengths[-1]
        picks = [lengths[0]] + ([lengths[len(lengths) // 2]] if len(lengths) > 2 else [])
        points = {top: {}}
        for n in picks:
            points[n] = {k: -v for k, v in self._pair_waste(n, top).items()}
        self._waste = _Quadratic(points)
        if len(picks) == 2:
            lo, mid = picks
            expected = self._pair_waste(lo, mid)
            predicted = {k: self._waste(mid).get(k, 0) - self._waste(lo).get(k, 0) for k in expected}
            if not _close(predicted, expected, 1e-6):
                self.notes.append("padding waste is not quadratic in the lengths: executed MACs are approximate")


# --------------------------------------------------------------------------- trajectories


@dataclass
class RecordedEvaluation:
    """One model evaluation inside a sampler (one call, both CFG halves together)."""

    index: int
    t: list[float]
    lengths: list[int]  # per row: backbone tokens
    cfg: bool  # rows [0, n) conditional, [n, 2n) unconditional
    backbone_ran: bool
    budget: list[dict[str, float]]
    rows: list[RowSignature] = field(default_factory=list)
    backbone_computed: bool = True  # a backbone evaluation: attention/MLP computed (not cached)


class TrajectoryRecorder:
    """Observer (`dyncompute.observe`) of a sampling call: records every evaluation's real per-sample
    backbone lengths, CFG branch, budgets and whether the backbone ran, as the model reported them.

        rec = TrajectoryRecorder(model)
        generate(model, ..., observers=[rec])
        count = rec.count(num_images)
    """

    def __init__(self, model: nn.Module, cost: SampleCost | None = None):
        self.model, self.cost = model, cost or SampleCost(model)
        self.evaluations: list[RecordedEvaluation] = []

    def __call__(self, ev: Evaluation) -> None:
        info = ev.info
        rows = split_rows(ev.x, ev.t, ev.kwargs["y"], info.budget)
        self.cost.observe(rows, info.tokens_per_sample)
        self.evaluations.append(RecordedEvaluation(len(self.evaluations), [float(v) for v in ev.t.reshape(-1)],
                                           [int(n) for n in info.tokens_per_sample], ev.cfg, info.backbone_ran,
                                           [r.budget for r in rows], row_signatures(self.model, info),
                                           info.backbone_computed))

    def count(self, num_images: int | None = None) -> TrajectoryCount:
        return TrajectoryCount.from_evaluations(self.evaluations, self.cost, num_images)


def row_signatures(model: nn.Module, info) -> list[RowSignature]:
    """Each batch row's `RowSignature` from a forward's `ForwardInfo`."""
    n = len(info.tokens_per_sample)
    hooks = len(model.reducers) > 0
    work, executed = [[] for _ in range(n)], [[] for _ in range(n)]
    padded = False
    for i, reducer in enumerate(model.reducers):
        report = info.reducers.get(reducer.name or type(reducer).__name__, {})
        items = report.get("work") or [()] * n
        padded_items = report.get("executed_work")
        padded = padded or padded_items is not None
        for r in range(n):
            work[r] += [(i, kind, tuple(size)) for kind, size in items[r]]
            executed[r] += [(i, kind, tuple(size)) for kind, size in (padded_items or items)[r]]
    sigs = []
    for r, length in enumerate(info.tokens_per_sample):
        blocks = None
        if hooks and info.backbone_ran:
            blocks = tuple((run.attention[r] if run.attention else 0, run.mlp[r] if run.mlp else 0,
                            run.groups("attention", r), run.groups("mlp", r)) for run in info.blocks)
        sigs.append(RowSignature(int(length), info.backbone_ran, blocks, tuple(work[r]),
                                 tuple(executed[r]) if padded else None))
    return sigs


@dataclass
class TrajectoryCount:
    """Per-image MACs over a sampling trajectory: every evaluation, both CFG branches."""

    steps: pd.DataFrame  # one row per evaluation
    per_image_useful_macs: list[float]
    per_image_executed_macs: list[float]
    by_component: dict[str, float]  # useful, mean per image
    nfe: int  # model calls (one per evaluation, both CFG halves together)
    notes: list[str] = field(default_factory=list)
    backbone_evaluations: int | None = None  # evaluations whose backbone computed (not skipped or cached)

    @classmethod
    def from_evaluations(cls, evaluations: list[RecordedEvaluation], cost: SampleCost, num_images: int | None = None):
        if not evaluations:
            raise ValueError("no model evaluation was recorded")
        rows0 = len(evaluations[0].lengths)
        n = num_images or (rows0 // 2 if evaluations[0].cfg else rows0)
        useful, executed = [0.0] * n, [0.0] * n
        comps: dict[str, float] = {}
        records = []
        for ev in evaluations:
            longest = max(ev.lengths)
            half = len(ev.lengths) // 2
            ev_useful = ev_exec = 0.0
            sigs = ev.rows or [RowSignature(n_, ev.backbone_ran) for n_ in ev.lengths]
            for r, length in enumerate(ev.lengths):
                u, padded = cost.row(replace(sigs[r], length=length))
                w = cost.waste(length, longest) if len(set(ev.lengths)) > 1 else {}
                mu, mw = sum(u.values()), sum(w.values()) + padded
                image = (r % half if ev.cfg else r) % n
                useful[image] += mu
                executed[image] += mu + mw
                ev_useful, ev_exec = ev_useful + mu, ev_exec + mu + mw
                for k, v in u.items():
                    comps[k] = comps.get(k, 0.0) + v / n
            cond = ev.lengths[:half] if ev.cfg else ev.lengths
            records.append({
                "eval": ev.index, "t": ev.t[0], "cfg": ev.cfg, "backbone_ran": ev.backbone_ran,
                "backbone_computed": ev.backbone_computed,
                "tokens_mean_cond": sum(cond) / len(cond),
                "tokens_mean_uncond": sum(ev.lengths[half:]) / half if ev.cfg else None,
                "useful_GMACs_per_image": ev_useful / n / 1e9, "executed_GMACs_per_image": ev_exec / n / 1e9,
                "useful_GFLOPs_per_image": 2 * ev_useful / n / 1e9,
            })
        return cls(pd.DataFrame(records), useful, executed, comps, len(evaluations), list(dict.fromkeys(cost.notes)),
                   sum(ev.backbone_computed for ev in evaluations))

    @property
    def useful_macs_per_image(self) -> float:
        return sum(self.per_image_useful_macs) / len(self.per_image_useful_macs)

    @property
    def executed_macs_per_image(self) -> float:
        return sum(self.per_image_executed_macs) / len(self.per_image_executed_macs)

    @property
    def flops_per_image(self) -> float:
        return 2 * self.useful_macs_per_image

    def to_dict(self) -> dict:
        return {
            "units": {"macs": "multiply-accumulates per image over the whole trajectory", "flops": "2 x MACs"},
            "nfe": self.nfe, "model_calls": self.nfe, "backbone_evaluations": self.backbone_evaluations,
            "useful_macs_per_image": self.useful_macs_per_image,
            "executed_macs_per_image": self.executed_macs_per_image, "flops_per_image": self.flops_per_image,
            "by_component_per_image": self.by_component, "per_image_useful_macs": self.per_image_useful_macs,
            "tokens_mean_per_step": self.steps["tokens_mean_cond"].tolist(),
            "useful_GMACs_per_image_per_step": self.steps["useful_GMACs_per_image"].tolist(),
            "notes": self.notes,
        }


def count_trajectory(model: nn.Module, num_samples: int = 2, sampler: str = "ddpm", num_steps: int = 250,
                     cfg_scale: float = 1.0, seed: int = 0, **generate_kwargs) -> tuple[TrajectoryCount, Any]:
    """Sample ``num_samples`` images in one batch while recording; returns (count, `SampleResult`)."""
    rec = TrajectoryRecorder(model)
    result = generate(model, num_samples=num_samples, sampler=sampler, num_steps=num_steps, cfg_scale=cfg_scale,
                      seed=seed, batch_size=num_samples, observers=[rec], **generate_kwargs)
    count = rec.count(num_samples)
    if count.nfe != result.nfe:
        count.notes.append(f"recorded {count.nfe} evaluations but the sampler counted {result.nfe}")
    return count, result


# --------------------------------------------------------------------------- report columns


def trajectory_columns(traj: TrajectoryCount) -> dict:
    """Labelled per-image columns of a recorded sampling trajectory."""
    return {
        "per_image_GMACs_(trajectory)": traj.useful_macs_per_image / 1e9,
        "per_image_GFLOPs_(trajectory)": traj.flops_per_image / 1e9,
        "NFE_per_image": traj.nfe,
        "backbone_evaluations_per_image": traj.backbone_evaluations,
        "per_image_backbone_GMACs_(trajectory)": traj.by_component.get("backbone", 0.0) / 1e9,
    }


def report_columns(model: nn.Module, sampler: str = "ddpm", num_steps: int = 100, cfg_scale: float = 1.0,
                   num_images: int = 2, num_inputs: int = 4, seed: int = 0) -> dict:
    """Labelled compute columns for a report row: per forward, per image (trajectory), NFE, params."""
    traj, _ = count_trajectory(model, num_images, sampler, num_steps, cfg_scale, seed=seed, device="cpu")
    return {**forward_columns(model, num_inputs, seed), **trajectory_columns(traj)}
