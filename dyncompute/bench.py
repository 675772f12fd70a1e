"""Benchmarks: named cases, each timed against its reference, interleaved in one process.

A case builder returns `BenchPair`s. Subject and reference run alternately (after warm-up; each round
in the other order) so both see the same machine state; the table reports medians, MACs, achieved
GFLOP/s (FLOPs = 2 x MACs), kernels launched per call (torch.profiler) and the time ratio subject /
reference (the median of the rounds' ratios, with their range: the noise of this machine) next to the
case's target. A pair may run beside ``load`` busy processes, so that overhead-bound paths (many small
kernels) show as they do on a shared machine. Cases run on CUDA in bfloat16 when a GPU is present
(``--device`` overrides), else on the CPU in float32.
"""
from __future__ import annotations

import ast
import contextlib
import ctypes
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from . import linear
from .errors import UserError
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
    load: int = 0  # busy processes spinning on the CPUs while the pair runs
    extra: dict | None = None  # more measured columns for the row (e.g. a quality difference)


CASES: dict[str, Callable[[], list[BenchPair]]] = {}


def register_case(name: str):
    """Decorator: add a case builder under ``name`` (plugins register their own cases)."""

    def deco(fn):
        CASES[name] = fn
        return fn

    return deco


DEVICE: dict[str, str | None] = {"name": None}  # set by --device; None: CUDA when available


def bench_device() -> torch.device:
    return torch.device(DEVICE["name"] or ("cuda" if torch.cuda.is_available() else "cpu"))


def autocast(device: torch.device):
    """bfloat16 autocast on CUDA (as training runs there); float32 on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# Operators that only describe or allocate memory: no kernel of their own.
NO_KERNEL = frozenset({
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::as_strided", "aten::view", "aten::_unsafe_view",
    "aten::reshape", "aten::_reshape_alias", "aten::transpose", "aten::t", "aten::permute", "aten::expand",
    "aten::slice", "aten::select", "aten::narrow", "aten::split", "aten::split_with_sizes", "aten::unbind",
    "aten::chunk", "aten::unflatten", "aten::flatten", "aten::unsqueeze", "aten::squeeze", "aten::detach",
    "aten::alias", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::view_as",
    "aten::expand_as", "aten::numpy_T", "aten::set_", "aten::resize_", "aten::contiguous", "aten::to",
    "aten::dropout", "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::result_type",
})


def kernel_launches(fn: Callable[[], object]) -> int:
    """Kernels one call launches, from torch.profiler: on CUDA the device kernels (and copies); on the
    CPU each innermost operator that computes (an ATen or oneDNN operator none of whose callees compute, views
    and allocations excluded; a compiled graph's fused kernels once kernel profiling is on)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    _sync()
    with profile(activities=activities) as prof:
        fn()
        _sync()
    events = prof.events()
    on_device = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    if on_device:
        return on_device
    counted: dict[int, bool] = {}

    def counts(e) -> bool:
        if id(e) not in counted:
            below = [counts(c) for c in e.cpu_children]  # visit every callee
            is_op = e.name.startswith(("aten::", "mkldnn::")) and e.name not in NO_KERNEL
            counted[id(e)] = (is_op or "cpp_fused" in e.name) and not any(below)
        return counted[id(e)]

    return sum(counts(e) for e in events)


def _spin(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


@contextlib.contextmanager
def busy(processes: int):
    """``processes`` pure-Python busy loops on other cores while the block runs (a shared machine);
    yields the worker processes."""
    if processes <= 0:
        yield []
        return
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    workers = [ctx.Process(target=_spin, args=(stop,), daemon=True) for _ in range(processes)]
    for w in workers:
        w.start()
    try:
        yield workers
    finally:
        stop.set()
        for w in workers:
            w.join()


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
    kb = lambda key: int(next(ln for ln in status.read_text().splitlines() if ln.startswith(key)).split()[1])
    base = kb("VmRSS:")
    fn()
    return (kb("VmHWM:") - base) / 1024


def _time_once(fn: Callable[[], object]) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def median_ms(fn: Callable[[], object], repeats: int = 5, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` alone (pairs are timed interleaved by `run_pair`)."""
    for _ in range(warmup):
        fn()
    return statistics.median(_time_once(fn) for _ in range(repeats)) * 1e3


def run_pair(pair: BenchPair, warmup: int = 2, repeats: int = 5) -> dict:
    load0 = os.getloadavg()[0]  # the machine's own load (others' jobs on a shared machine), for the record
    with busy(pair.load):
        for _ in range(warmup):
            pair.subject.fn(), pair.reference.fn()
        ts, tr = [], []
        sides = ((ts, pair.subject), (tr, pair.reference))
        for i in range(repeats):  # interleaved, in alternating order: drift and warm caches hit both sides alike
            for times, side in sides[::-1] if i % 2 else sides:
                times.append(_time_once(side.fn))
        # the instrumented passes after the timed calls, so that what they leave behind (a heap returned to the
        # system by malloc_trim, profiler state) cannot reach this pair's timing
        mem_s, mem_r = peak_memory_mb(pair.subject.fn), peak_memory_mb(pair.reference.fn)
        kernels_s, kernels_r = kernel_launches(pair.subject.fn), kernel_launches(pair.reference.fn)
    ms, mr = statistics.median(ts) * 1e3, statistics.median(tr) * 1e3
    rounds = sorted(a / b for a, b in zip(ts, tr))  # per-round ratios: this machine's noise, side by side
    row = {
        "case": pair.case, "subject": pair.subject.label, "reference": pair.reference.label,
        "subject_GMACs": _g(pair.subject.macs), "reference_GMACs": _g(pair.reference.macs),
        "subject_ms": ms, "reference_ms": mr,
        "subject_GFLOP/s": _rate(pair.subject.macs, ms), "reference_GFLOP/s": _rate(pair.reference.macs, mr),
        "subject_kernels": kernels_s, "reference_kernels": kernels_r,
        "subject_peak_MiB": mem_s, "reference_peak_MiB": mem_r,
        "time_ratio": statistics.median(rounds), "time_ratio_min": rounds[0], "time_ratio_max": rounds[-1],
        "load": pair.load, "device": str(bench_device()), "target": pair.target,
        "loadavg_1m": (load0 + os.getloadavg()[0]) / 2,
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
              out: str | Path | None = None, threads: int | None = None, args: dict | None = None) -> pd.DataFrame:
    """Run the named cases (default: all); ``args`` go to every case builder that takes them."""
    import torch._inductor.config

    from .registry import load_plugins

    load_plugins()  # plugins register their own cases on import
    torch._inductor.config.cpp.enable_kernel_profile = True  # compiled CPU kernels show in the profiler
    if threads:
        torch.set_num_threads(threads)
    unknown = sorted(set(names or []) - set(CASES))
    if unknown:
        raise UserError(f"unknown bench case(s) {unknown}; known: {', '.join(sorted(CASES))}")
    rows = []
    for name in names or sorted(CASES):
        for pair in CASES[name](**_case_args(CASES[name], args or {})):
            rows.append(run_pair(pair, warmup, repeats))
            print(format_row(rows[-1]), flush=True)
    df = pd.DataFrame(rows)
    if out:
        atomic_write(out, lambda tmp: df.to_csv(tmp, index=False))
    return df


def _case_args(builder: Callable, args: dict) -> dict:
    import inspect

    accepted = inspect.signature(builder).parameters
    return {k: v for k, v in args.items() if k in accepted}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Frobenius norms, in float32): how far two paths' outputs are apart."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def format_row(r: dict) -> str:
    """One measured row (`run_pair`) as the line `dyncompute bench` prints."""
    s = (f"{r['case']}: {r['subject']} {r['subject_ms']:.1f} ms vs {r['reference']} {r['reference_ms']:.1f} ms"
         f" | time ratio {r['time_ratio']:.3f}")
    if r.get("time_ratio_min") is not None:
        s += f" [{r['time_ratio_min']:.3f}-{r['time_ratio_max']:.3f} over rounds]"
    if r.get("subject_GFLOP/s"):
        s += f" | {r['subject_GFLOP/s']:.1f} vs {r['reference_GFLOP/s'] or float('nan'):.1f} GFLOP/s"
    if r.get("mac_ratio"):
        s += f" | MAC ratio {r['mac_ratio']:.3f}"
    s += f" | kernels {r['subject_kernels']} vs {r['reference_kernels']}"
    if r.get("load"):
        s += f" | beside {r['load']} busy process(es)"
    s += f" | load average {r['loadavg_1m']:.1f}"
    if r.get("out_rel_diff") is not None:
        s += f" | outputs differ by {r['out_rel_diff']:.1e} (relative)"
    if r.get("subject_peak_MiB") is not None:
        s += f" | peak mem +{r['subject_peak_MiB']:.0f} vs +{r['reference_peak_MiB']:.0f} MiB"
    return s + (f" | target {r['target']}: {'met' if r['met'] else 'NOT met'}" if r["target"] else "")


# --------------------------------------------------------------------------- built-in cases


def counted_flops(fn: Callable[[], object]) -> float:
    """FLOPs (2 x MACs) of one call, from torch's own counter (forward and backward). Attention runs
    as its math decomposition while counting: torch's counter has no entry for the CPU fused kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


def matmul_reference(n: int | None = None, kernel: str = "best") -> Timed:
    """The machine's matmul rate: 2048^2 float32 on the CPU, 8192^2 bfloat16 on CUDA.

    On the CPU ``kernel="best"`` times the kernel the models' dense layers use (oneDNN, `dyncompute.linear`,
    which outruns torch's MKL ``@`` on AMD processors) so that no step can exceed its own roofline;
    ``"torch.mm"`` times torch's default ``a @ b``.
    """
    device = bench_device()
    n = n or (8192 if device.type == "cuda" else 2048)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    if kernel == "best" and device.type == "cpu" and linear.ENABLED:
        bt = b.t().contiguous()
        return Timed(f"matmul {n}x{n} float32 (oneDNN)", lambda: linear.linear(a, bt), macs=float(n) ** 3)
    return Timed(f"matmul {n}x{n} {str(dtype).removeprefix('torch.')} (torch.mm)", lambda: a @ b, macs=float(n) ** 3)


def dit_model(hidden_size=384, depth=12, num_heads=6, compile=False, seed=0, **kw):
    """A DiT/2 on 32x32x4 latents (DiT-S/2 by default) on the bench device."""
    from .model import DiffusionTransformer

    torch.manual_seed(seed)
    return DiffusionTransformer(input_size=32, in_channels=4, num_classes=1000, hidden_size=hidden_size, depth=depth,
                                num_heads=num_heads, compile=compile, **kw).to(bench_device())


def bench_batch(model, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed (x, t, y) on the model's device: the same work (and, for DC-DiT, the same lengths) each call."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    dev = next(model.parameters()).device
    return x.to(dev), t.to(dev), y.to(dev)


def train_step(model, x, t, y, lr: float = 1e-6) -> Callable[[], None]:
    """One AdamW step on the diffusion loss at fixed timesteps (bfloat16 autocast on CUDA). Any lr costs
    the same; a tiny one keeps the work fixed across rounds (at 1e-4 a DC-DiT's router, with no ratio loss
    to hold it, drifted from 25% to 53% of the tokens kept within four steps)."""
    from .diffusion import create_diffusion
    from .engine import adamw

    diffusion = create_diffusion("")
    opt = adamw(model.parameters(), lr=lr)
    device = x.device
    noise = train_noise(x)

    def step():
        model.train()
        with autocast(device):
            loss = diffusion.training_losses(model, x, t, {"y": y}, noise=noise)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def forward(model, x, t, y) -> Callable[[], torch.Tensor]:
    def fwd():
        model.eval()
        with torch.no_grad(), autocast(x.device):
            return model(x, t, y)

    return fwd


def forward_macs(model, x, t, y) -> float:
    """MACs one forward of the batch executes, by the project's own count (dyncompute.flops; one trace)."""
    from .flops import trace_forward

    return float(trace_forward(model, x, t, y).macs)


def train_noise(x: torch.Tensor) -> torch.Tensor:
    """The fixed noise a bench training step adds to ``x``: every call (and the MAC count) sees the same x_t."""
    g = torch.Generator().manual_seed(2)
    return torch.randn(x.shape, generator=g).to(x.device)


def train_macs(model, x, t, y) -> float:
    """MACs of a training step: forward + backward = 3 x the forward on the step's noised input x_t."""
    from .diffusion import create_diffusion

    x_t = create_diffusion("").q_sample(x, t, noise=train_noise(x))
    return 3.0 * forward_macs(model, x_t, t, y)


@register_case("dit_train_step")
def dit_train_step_case(hidden_size=384, depth=12, num_heads=6, batch=8, compile=False) -> list[BenchPair]:
    """DiT-S/2-like training step (32x32x4 input, batch 8) against a large matmul: the roofline.
    FLOPs are the project's own count (torch's counter misses the CPU fused-attention kernel)."""
    model = dit_model(hidden_size, depth, num_heads, compile)
    x, t, y = bench_batch(model, batch)
    label = f"DiT train step (D={hidden_size}, depth {depth}, B={batch}{', compiled' if compile else ''})"
    step = Timed(label, train_step(model, x, t, y), train_macs(model, x, t, y))
    pairs = [BenchPair("dit_train_step", step, matmul_reference(), target="GFLOP/s >= 85% of matmul",
                       check=lambda r: r["subject_GFLOP/s"] >= 0.85 * r["reference_GFLOP/s"])]
    if "oneDNN" in pairs[0].reference.label:  # the same step against torch's default matmul, for comparison
        pairs.append(BenchPair("dit_train_step", step, matmul_reference(kernel="torch.mm")))
    return pairs


@register_case("dit_compile")
def dit_compile_case(hidden_size=384, depth=12, num_heads=6, batch=8) -> list[BenchPair]:
    """The compiled path (`DiffusionTransformer.compile = True`, one full graph) against eager: DiT-S/2
    training step and forward, same weights and inputs."""
    eager = dit_model(hidden_size, depth, num_heads)
    compiled = dit_model(hidden_size, depth, num_heads, compile=True)
    compiled.load_state_dict(eager.state_dict())
    return compile_pairs("dit_compile", "DiT-S/2" if hidden_size == 384 else f"DiT/2 D={hidden_size}",
                         compiled, eager, batch)


@torch.no_grad()
def fill_zero_parameters(model, std: float = 0.02, seed: int = 0) -> None:
    """Give every all-zero parameter (adaLN-Zero's modulations, the final layer) small random values, so
    that outputs, and differences between two paths, are not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if not p.count_nonzero():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def compile_pairs(case: str, name: str, compiled, eager, batch: int) -> list[BenchPair]:
    """Compiled against eager: training step and forward (warm-up compiles)."""
    x, t, y = bench_batch(eager, batch)
    macs = train_macs(eager, x, t, y)
    check = lambda r: r["time_ratio"] < 1.0
    fill_zero_parameters(eager)  # adaLN-Zero's zeros make every output 0: nothing to compare
    compiled.load_state_dict(eager.state_dict())
    # compiled vs eager, same weights and inputs (this first call compiles the forward)
    agree = {"out_rel_diff": relative_difference(forward(compiled, x, t, y)(), forward(eager, x, t, y)())}
    return [BenchPair(case, Timed(f"{name} train step compiled (B={batch})", train_step(compiled, x, t, y), macs),
                      Timed(f"{name} train step eager (B={batch})", train_step(eager, x, t, y), macs),
                      target="time ratio < 1", check=check),
            BenchPair(case, Timed(f"{name} fwd compiled (B={batch})", forward(compiled, x, t, y), macs / 3),
                      Timed(f"{name} fwd eager (B={batch})", forward(eager, x, t, y), macs / 3),
                      target="time ratio < 1", check=check, extra=agree)]


@register_case("ignite_overhead")
def ignite_overhead_case(hidden_size=256, depth=4, num_heads=4, batch=8, steps=4) -> list[BenchPair]:
    """`engine.create_trainer` (ignite) against a bare PyTorch loop: same model, data and steps.

    Both run ``steps`` optimisation steps per timed call on one DiT/2 (32x32x4 input); the bare loop is
    the minimal step (diffusion loss, backward, clipping, AdamW, ``loss.item()``). Target: ignite
    costs at most 3% more.
    """
    from .diffusion import create_diffusion
    from .engine import adamw, create_trainer
    from .flops import count_forward
    from .model import DiffusionTransformer

    torch.manual_seed(0)
    model = DiffusionTransformer(input_size=32, in_channels=4, num_classes=1000, hidden_size=hidden_size,
                                 depth=depth, num_heads=num_heads, tokenizer="patchify")
    objective = create_diffusion("")
    opt = adamw(model.parameters(), lr=1e-4)
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


def parse_case_args(items: list[str]) -> dict:
    """``KEY=VALUE`` strings -> {key: python literal (or the plain string)}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"bench --arg expects KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out
