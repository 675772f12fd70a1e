"""Observing model evaluations: the one mechanism samplers, the trainer and the accounting share.

An `Observed` model function is what a sampler or a training objective calls: every call is one
*evaluation* (both halves of a classifier-free-guidance batch together), and every observer sees it
as an `Evaluation` with the model's `ForwardInfo`. Counting NFE, recording token maps, recording
the trajectory for the accounting and collecting the tokenizer's auxiliary losses are observers.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .reducer import ForwardInfo

Observer = Callable[["Evaluation"], None]


@dataclass
class Evaluation:
    """One model evaluation: its inputs, model kwargs and what the forward reported."""

    index: int
    x: torch.Tensor
    t: torch.Tensor
    kwargs: dict[str, Any]
    info: ForwardInfo | None
    cfg: bool  # rows [0, n) conditional, [n, 2n) unconditional


class Observed:
    """``fn(x, t, **kwargs)`` shown to observers; ``fn`` is a model (asked for its info), a model's
    ``forward_with_cfg`` (``cfg=True``), or any plain function (``with_info=False``)."""

    def __init__(self, fn: Callable, observers: tuple[Observer, ...] | list[Observer] = (), with_info: bool = True,
                 cfg: bool = False):
        self.fn, self.observers, self.with_info, self.cfg = fn, list(observers), with_info, cfg
        self.count = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.with_info:
            out, info = self.fn(x, t, return_info=True, **kwargs)
        else:
            out, info = self.fn(x, t, **kwargs), None
        evaluation = Evaluation(self.count, x, t, kwargs, info, self.cfg)
        self.count += 1
        for observe in self.observers:
            observe(evaluation)
        return out


class Timesteps:
    """Observer: the timestep of every evaluation (first row)."""

    def __init__(self):
        self.seen: list[float] = []

    def __call__(self, ev: Evaluation) -> None:
        self.seen.append(ev.t.reshape(-1)[0].item())


class Infos:
    """Observer: every evaluation's `ForwardInfo`."""

    def __init__(self):
        self.infos: list[ForwardInfo] = []

    def __call__(self, ev: Evaluation) -> None:
        self.infos.append(ev.info)
