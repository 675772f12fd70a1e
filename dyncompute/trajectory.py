"""Compute over a sampling trajectory: every model evaluation's real per-sample token counts.

`TrajectoryRecorder` observes a sampling call (`dyncompute.observe`) and records each evaluation's
per-sample backbone lengths, CFG branch, budgets and whether the backbone ran (a step-caching reducer
may skip it), as the model's `ForwardInfo` reports them. `SampleCost` turns a length into per-sample useful
MACs by component (exact counts from :mod:`dyncompute.flops`, interpolated where verified), and
`TrajectoryCount` sums them per image and per step. Units as in :mod:`dyncompute.flops`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import pandas as pd
import torch.nn as nn

from .flops import Row, Trace, backbone_macs, forward_columns, split_rows, stack_rows, trace_forward
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
        rest = dict(trace.components)
        rest["backbone"] = rest.get("backbone", 0) - self.backbone(length)
        if rest["backbone"]:
            self.notes.append(f"backbone counted in the model ({trace.components.get('backbone')}) differs from "
                              f"synthetic tokens ({self.backbone(length)}) at L={length}")
        return rest

    def useful(self, length: int, backbone: bool = True) -> dict[str, float]:
        """MACs by component of one sample with ``length`` backbone tokens (backbone skipped: False)."""
        if self._rest is None:
            self.calibrate()
        if not self._rest.nodes and length not in self._rest.points:
            if length not in self.rows:
                raise ValueError(f"no recorded input has L={length}: the cost is not interpolable, count it exactly")
            self.measure(length)
            self._rest.points[length] = self._rest_of(self.exact[length], length)
        out = self._rest(length)
        out["backbone"] = out.get("backbone", 0) + (self.backbone(length) if backbone else 0)
        return out

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
        trace = trace_forward(self.model, *stack_rows([self.rows[a], self.rows[b]]))
        ua, ub = self.useful(trace.lengths[0]), self.useful(trace.lengths[1])
        return {k: trace.components.get(k, 0) - ua.get(k, 0) - ub.get(k, 0)
                for k in set(trace.components) | set(ua) | set(ub)}

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
                                           [r.budget for r in rows]))

    def count(self, num_images: int | None = None) -> TrajectoryCount:
        return TrajectoryCount.from_evaluations(self.evaluations, self.cost, num_images)


@dataclass
class TrajectoryCount:
    """Per-image MACs over a sampling trajectory: every evaluation, both CFG branches."""

    steps: pd.DataFrame  # one row per evaluation
    per_image_useful_macs: list[float]
    per_image_executed_macs: list[float]
    by_component: dict[str, float]  # useful, mean per image
    nfe: int
    notes: list[str] = field(default_factory=list)

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
            for r, length in enumerate(ev.lengths):
                u = cost.useful(length, backbone=ev.backbone_ran)
                w = cost.waste(length, longest) if len(set(ev.lengths)) > 1 else {}
                mu, mw = sum(u.values()), sum(w.values())
                image = (r % half if ev.cfg else r) % n
                useful[image] += mu
                executed[image] += mu + mw
                ev_useful, ev_exec = ev_useful + mu, ev_exec + mu + mw
                for k, v in u.items():
                    comps[k] = comps.get(k, 0.0) + v / n
            cond = ev.lengths[:half] if ev.cfg else ev.lengths
            records.append({
                "eval": ev.index, "t": ev.t[0], "cfg": ev.cfg, "backbone_ran": ev.backbone_ran,
                "tokens_mean_cond": sum(cond) / len(cond),
                "tokens_mean_uncond": sum(ev.lengths[half:]) / half if ev.cfg else None,
                "useful_GMACs_per_image": ev_useful / n / 1e9, "executed_GMACs_per_image": ev_exec / n / 1e9,
                "useful_GFLOPs_per_image": 2 * ev_useful / n / 1e9,
            })
        return cls(pd.DataFrame(records), useful, executed, comps, len(evaluations), list(dict.fromkeys(cost.notes)))

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
            "nfe": self.nfe, "useful_macs_per_image": self.useful_macs_per_image,
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
    }


def report_columns(model: nn.Module, sampler: str = "ddpm", num_steps: int = 100, cfg_scale: float = 1.0,
                   num_images: int = 2, num_inputs: int = 4, seed: int = 0) -> dict:
    """Labelled compute columns for a report row: per forward, per image (trajectory), NFE, params."""
    traj, _ = count_trajectory(model, num_images, sampler, num_steps, cfg_scale, seed=seed, device="cpu")
    return {**forward_columns(model, num_inputs, seed), **trajectory_columns(traj)}
