"""Upper bounds on two of the benchmark targets, measured from their parts (CPU, issues 8 and 13).

    python benchmarks/ceilings.py cache RUN_DIR [--order 2] [--interval 3]
    python benchmarks/ceilings.py roofline

``cache``: the best ratio "speed-up / MAC reduction" that any eager implementation of a TaylorSeer-style
block cache can reach on a trained patchify DiT, DDIM-50 over 32 images (the `taylorseer_ddim50` bench). It times
the uncached call, splits it into model calls and per-step sampler work, and times a skipped
evaluation stripped to what any implementation must run: patch embedding, the conditioning and every
block's adaLN in one product, per cached op the forecast of ``order`` and the gated residual add, the
final layer; plus the difference update a full evaluation adds. The bound assumes the full evaluations
cost no more than uncached ones and no Python overhead between the parts.

``roofline``: the DiT-S/2 training step (`dit_train_step`) profiled; if everything but its linear layers
and its attention took no time, its GFLOP/s would be at most this share of the oneDNN 2048^2 matmul rate.
It then prints what 85% would leave for the rest of the step (norms, activations, the loss, AdamW) even
with attention at the matmul rate, and the rest's largest kernels.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from dyncompute.bench import median_ms
from dyncompute.errors import DyncomputeError, UserError, one_line
from dyncompute.processes import tune_allocator


def split_sampling(model, call, repeats: int = 5) -> tuple[float, float]:
    """(ms per model call, ms per step outside it) of a 50-step sampling call."""
    inside = []
    pre = model.register_forward_pre_hook(lambda m, a: inside.append(-time.perf_counter()))
    post = model.register_forward_hook(lambda m, a, o: inside.__setitem__(-1, inside[-1] + time.perf_counter()))
    call()
    totals, model_ms = [], []
    for _ in range(repeats):
        inside.clear()
        start = time.perf_counter()
        call()
        totals.append(time.perf_counter() - start)
        model_ms.append(sum(inside))
    pre.remove()
    post.remove()
    steps = len(inside)
    total, in_model = statistics.median(totals) * 1e3, statistics.median(model_ms) * 1e3
    return in_model / steps, (total - in_model) / steps


@torch.no_grad()
def cache_ceiling(run: str, order: int, interval: int, images: int = 32, steps: int = 50) -> None:
    from dyncompute_plugins.reducers.variants import load_variant, sampling_call, trajectory_macs

    model = load_variant(run, [], []).eval()
    if not hasattr(model.tokenizer, "x_embedder"):
        raise UserError(f"{run} is not a patchify DiT (its tokenizer has no x_embedder)")
    cached = load_variant(run, ["taylorseer"], [f"reducers.taylorseer.interval = {interval}",
                                                 f"reducers.taylorseer.order = {order}"])
    mac_ratio = trajectory_macs(cached, images, steps) / trajectory_macs(model, images, steps)
    full, outside = split_sampling(model, sampling_call(model, images, steps))

    g = torch.Generator().manual_seed(0)
    tok, blocks = model.tokenizer, model.backbone.blocks
    x = torch.randn(images, model.in_channels, model.input_size, model.input_size, generator=g)
    t, y = torch.randint(0, 1000, (images,), generator=g), torch.randint(0, model.num_classes, (images,), generator=g)
    layers = [b.adaLN_modulation[-1] for b in blocks] + [tok.final_layer.adaLN_modulation[-1]]
    weight, bias = torch.cat([m.weight for m in layers]), torch.cat([m.bias for m in layers])
    h0 = tok.x_embedder(x.contiguous(memory_format=torch.channels_last)) + tok.pos_embed
    D, ops = h0.shape[-1], 2 * len(blocks)
    values = [torch.randn_like(h0) for _ in range(ops)]
    diffs = [torch.randn(order, *h0.shape) for _ in range(ops)]
    fresh = [torch.randn_like(h0) for _ in range(ops)]

    def skipped():
        h = tok.x_embedder(x.contiguous(memory_format=torch.channels_last)) + tok.pos_embed
        c = model.condition(t, y)
        ada = F.linear(F.silu(c), weight, bias)  # every block's adaLN and the final layer's in one product
        for i in range(ops):
            out = values[i]
            if order:
                out = torch.add(out, diffs[i][0], alpha=0.5)
                for k in range(1, order):
                    out.add_(diffs[i][k], alpha=0.25)
            gate = ada[:, (i // 2) * 6 * D:][:, (2 if i % 2 == 0 else 5) * D:][:, :D]
            h = torch.addcmul(h, gate.unsqueeze(1), out)
        return tok.head(h, None, c)

    def update():  # each order's difference, written into kept storage
        for i in range(ops):
            prev = fresh[i]
            for k in range(order):
                torch.sub(prev, values[i] if k == 0 else diffs[i][k - 1], alpha=0.5, out=diffs[i][k])
                prev = diffs[i][k]

    skip_ms, update_ms = median_ms(skipped, 31, 3), median_ms(update, 31, 3) if order else 0.0
    n_full = sum(1 for e in range(steps) if e < 2 or (e - 1) % interval == 0)
    n_skip = steps - n_full
    uncached = steps * (full + outside)
    best = n_full * (full + outside + update_ms) + n_skip * (skip_ms + outside)
    time_ratio = best / uncached
    print(f"model call {full:.2f} ms, sampler work per step {outside:.2f} ms, stripped skipped evaluation "
          f"{skip_ms:.2f} ms, difference update {update_ms:.2f} ms per full evaluation")
    print(f"{n_full} full + {n_skip} skipped evaluations: at best {best:.0f} vs {uncached:.0f} ms uncached, time "
          f"ratio {time_ratio:.3f}, MAC ratio {mac_ratio:.3f}: speed-up / MAC reduction <= "
          f"{mac_ratio / time_ratio:.3f} (target 0.9)")


# the dense layers' kernels: forward and dX (oneDNN matmul, or MKL where oneDNN does not apply), dW and db
LINEAR_KERNELS = ("mkldnn::_linear_pointwise", "aten::mkldnn_linear_backward_weights", "aten::addmm", "aten::mm")


def roofline_ceiling() -> None:
    from torch.profiler import profile

    from dyncompute.bench import bench_batch, dit_model, matmul_reference, train_macs, train_step

    model = dit_model(384, 12, 6, False)
    x, t, y = bench_batch(model, 8)
    step = train_step(model, x, t, y)
    flops = 2 * train_macs(model, x, t, y)
    step_ms = median_ms(step, repeats=5, warmup=2)
    with profile() as prof:
        for _ in range(3):
            step()
    self_ms = {e.key: e.self_cpu_time_total / 3e3 for e in prof.key_averages()}
    linear = sum(v for k, v in self_ms.items() if k in LINEAR_KERNELS)
    attention = sum(v for k, v in self_ms.items() if "scaled_dot_product" in k)
    reference = matmul_reference()
    ref_ms = median_ms(reference.fn, 9, 3)
    rate = reference.macs * 2 / ref_ms / 1e6
    attention_flops = 2 * attention_macs(model, x)
    rest = {k: v for k, v in self_ms.items() if k not in LINEAR_KERNELS and "scaled_dot_product" not in k}
    print(f"train step {step_ms:.0f} ms ({flops / step_ms / 1e6:.0f} GFLOP/s): linear layers {linear:.0f} ms, "
          f"attention {attention:.0f} ms ({attention_flops / attention / 1e6:.0f} GFLOP/s), the rest "
          f"{sum(rest.values()):.0f} ms (profiled, self time)")
    print(f"{reference.label}: {rate:.0f} GFLOP/s; with everything else free the step would run at "
          f"{flops / (linear + attention) / 1e6:.0f} GFLOP/s = {flops / (linear + attention) / 1e6 / rate:.0%} "
          f"of it (target 85%)")
    at_rate = attention_flops / rate / 1e6
    budget = flops / (0.85 * rate) / 1e6 - linear - at_rate
    print(f"with attention at the matmul rate too ({at_rate:.0f} ms), 85% leaves {budget:.0f} ms for the rest; "
          f"its largest parts:")
    for k, v in sorted(rest.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {v:7.1f} ms  {k}")


def attention_macs(model, x) -> float:
    """Attention's useful MACs per training step of a patchify DiT: QK^T and PV forward (2 L^2 D per block and
    sample), twice that backward (dQ and dK, dP and dV)."""
    cfg, tokens = model.config, model.tokenizer.grid_size ** 2
    return 3.0 * cfg.depth * x.shape[0] * 2 * tokens ** 2 * cfg.hidden_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cache")
    c.add_argument("run")
    c.add_argument("--order", type=int, default=2)
    c.add_argument("--interval", type=int, default=3)
    sub.add_parser("roofline")
    args = p.parse_args()
    tune_allocator()  # as the `dyncompute` command line does
    try:
        if args.what == "cache":
            cache_ceiling(args.run, args.order, args.interval)
        else:
            roofline_ceiling()
    except DyncomputeError as e:
        print(f"ceilings.py {args.what}: error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
