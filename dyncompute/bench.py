"""Benchmarks: named cases, each timed against its reference, interleaved in one process.

A case builder returns `BenchPair`s. Subject and reference run alternately (after warm-up) so both
see the same machine state; the table reports medians, MACs, achieved GFLOP/s (FLOPs = 2 x MACs)
and the time ratio subject / reference next to the case's target.
"""
from __future__ import annotations

import ctypes
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from .io import atomic_write


@dataclass
class Timed:
    label: str
    fn: Callable[[], object]
    macs: float | None = None  # multiply-accumulates per call (None: not counted)


@dataclass
class BenchPair:
    case: str
    subject: Timed
    reference: Timed
    target: str = ""  # e.g. "ratio <= 1.15" or "GFLOP/s >= 60% of reference"
    check: Callable[[dict], bool] | None = None  # judges the measured row
    extra: dict | None = None  # more measured columns for the row (e.g. a quality difference)


CASES: dict[str, Callable[[], list[BenchPair]]] = {}


def register_case(name: str):
    """Decorator: add a case builder under ``name`` (plugins register their own cases)."""

    def deco(fn):
        CASES[name] = fn
        return fn

    return deco


def peak_memory_mb(fn: Callable[[], object]) -> float | None:
    """Peak memory one call adds, in MiB: CUDA's allocator peak, or on Linux CPU the growth of the
    process's peak resident set after returning cached heap pages (malloc_trim) and resetting it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    status = Path("/proc/self/status")
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS watermark
    except OSError:
        return None
    kb = lambda key: int(next(l for l in status.read_text().splitlines() if l.startswith(key)).split()[1])
    base = kb("VmRSS:")
    fn()
    return (kb("VmHWM:") - base) / 1024


def _time_once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_pair(pair: BenchPair, warmup: int = 2, repeats: int = 5) -> dict:
    for _ in range(warmup):
        pair.subject.fn(), pair.reference.fn()
    mem_s, mem_r = peak_memory_mb(pair.subject.fn), peak_memory_mb(pair.reference.fn)
    ts, tr = [], []
    for _ in range(repeats):  # interleaved: drift hits both sides alike
        ts.append(_time_once(pair.subject.fn))
        tr.append(_time_once(pair.reference.fn))
    ms, mr = statistics.median(ts) * 1e3, statistics.median(tr) * 1e3
    row = {
        "case": pair.case, "subject": pair.subject.label, "reference": pair.reference.label,
        "subject_GMACs": _g(pair.subject.macs), "reference_GMACs": _g(pair.reference.macs),
        "subject_ms": ms, "reference_ms": mr,
        "subject_GFLOP/s": _rate(pair.subject.macs, ms), "reference_GFLOP/s": _rate(pair.reference.macs, mr),
        "subject_peak_MiB": mem_s, "reference_peak_MiB": mem_r,
        "time_ratio": ms / mr, "target": pair.target,
    }
    if pair.subject.macs and pair.reference.macs:
        row["mac_ratio"] = pair.subject.macs / pair.reference.macs
    row.update(pair.extra or {})
    row["met"] = pair.check(row) if pair.check else None
    return row


def _g(macs):
    return None if macs is None else macs / 1e9


def _rate(macs, ms):
    return None if not macs else 2 * macs / (ms / 1e3) / 1e9


def run_cases(names: list[str] | None = None, warmup: int = 2, repeats: int = 5,
              out: str | Path | None = None, threads: int | None = None) -> pd.DataFrame:
    from .registry import load_plugins

    load_plugins()  # plugins register their own cases on import
    if threads:
        torch.set_num_threads(threads)
    unknown = sorted(set(names or []) - set(CASES))
    if unknown:
        raise ValueError(f"unknown bench case(s) {unknown}; known: {', '.join(sorted(CASES))}")
    rows = []
    for name in names or sorted(CASES):
        for pair in CASES[name]():
            rows.append(run_pair(pair, warmup, repeats))
            print(_fmt(rows[-1]), flush=True)
    df = pd.DataFrame(rows)
    if out:
        atomic_write(out, lambda tmp: df.to_csv(tmp, index=False))
    return df


def _fmt(r: dict) -> str:
    s = (f"{r['case']}: {r['subject']} {r['subject_ms']:.1f} ms vs {r['reference']} {r['reference_ms']:.1f} ms"
         f" | time ratio {r['time_ratio']:.3f}")
    if r.get("subject_GFLOP/s"):
        s += f" | {r['subject_GFLOP/s']:.1f} vs {r['reference_GFLOP/s'] or float('nan'):.1f} GFLOP/s"
    if r.get("mac_ratio"):
        s += f" | MAC ratio {r['mac_ratio']:.3f}"
    if r.get("subject_peak_MiB") is not None:
        s += f" | peak mem +{r['subject_peak_MiB']:.0f} vs +{r['reference_peak_MiB']:.0f} MiB"
    return s + (f" | target {r['target']}: {'met' if r['met'] else 'NOT met'}" if r["target"] else "")


# --------------------------------------------------------------------------- built-in cases


def counted_flops(fn: Callable[[], object]) -> float:
    """FLOPs (2 x MACs) of one call, from torch's own counter (forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_reference(n: int = 2048) -> Timed:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return Timed(f"matmul {n}x{n}", lambda: a @ b, macs=float(n) ** 3)


@register_case("dit_train_step")
def dit_train_step_case(hidden_size=384, depth=12, num_heads=6, batch=8) -> list[BenchPair]:
    """DiT-S/2-like training step (32x32x4 input, batch 8) against a large fp32 matmul: the roofline."""
    from .diffusion import create_diffusion
    from .model import DiffusionTransformer

    torch.manual_seed(0)
    model = DiffusionTransformer(input_size=32, in_channels=4, num_classes=1000, hidden_size=hidden_size,
                                 depth=depth, num_heads=num_heads, tokenizer="patchify")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diffusion = create_diffusion("")
    x, y = torch.randn(batch, 4, 32, 32), torch.randint(0, 1000, (batch,))

    def step():
        t = diffusion.sample_timesteps(batch)
        loss = diffusion.training_losses(model, x, t, {"y": y})["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    macs = counted_flops(step) / 2
    return [BenchPair("dit_train_step", Timed(f"DiT train step (D={hidden_size}, depth {depth}, B={batch})",
                                              step, macs),
                      matmul_reference(), target="GFLOP/s >= 60% of matmul",
                      check=lambda r: r["subject_GFLOP/s"] >= 0.6 * r["reference_GFLOP/s"])]


@register_case("ignite_overhead")
def ignite_overhead_case(hidden_size=256, depth=4, num_heads=4, batch=8, steps=4) -> list[BenchPair]:
    """`engine.create_trainer` (ignite) against a bare PyTorch loop: same model, data and steps.

    Both run ``steps`` optimisation steps per timed call on one DiT/2 (32x32x4 input); the bare loop is
    the minimal step (diffusion loss, backward, clipping, AdamW, ``loss.item()``). Target: ignite
    costs at most 3% more.
    """
    from .diffusion import create_diffusion
    from .engine import create_trainer
    from .flops import count_forward
    from .model import DiffusionTransformer

    torch.manual_seed(0)
    model = DiffusionTransformer(input_size=32, in_channels=4, num_classes=1000, hidden_size=hidden_size,
                                 depth=depth, num_heads=num_heads, tokenizer="patchify")
    objective = create_diffusion("")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = [{"x": torch.randn(batch, 4, 32, 32), "y": torch.randint(0, 1000, (batch,))} for _ in range(steps)]
    trainer = create_trainer(model, objective, opt, grad_clip=1.0, device="cpu")

    def bare_loop():
        model.train()
        for b in data:
            t = objective.sample_timesteps(batch)
            loss = objective.training_losses(model, b["x"], t, {"y": b["y"]})["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss.item()

    def ignite_run():
        trainer.run(data, max_epochs=1)

    fwd = count_forward(model, data[0]["x"], torch.zeros(batch, dtype=torch.long), data[0]["y"])
    macs = 3 * fwd.useful_macs * steps  # forward + backward (2x forward)
    label = f"{steps} steps, DiT/2 D={hidden_size} depth {depth} B={batch}"
    return [BenchPair("ignite_overhead", Timed(f"ignite trainer ({label})", ignite_run, macs),
                      Timed(f"bare PyTorch loop ({label})", bare_loop, macs), target="time ratio <= 1.03",
                      check=lambda r: r["time_ratio"] <= 1.03)]
