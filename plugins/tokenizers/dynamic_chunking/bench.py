"""DC-DiT benchmarks, registered as `dyncompute bench` cases (run interleaved, medians; CUDA + bfloat16
when a GPU is present, with flash-attn's varlen kernel where it is installed):

- ``dcdit_packed_backbone``: the backbone over packed variable-length tokens vs the same backbone over
  one fixed-length batch with the same total token count (target: time ratio <= 1.15).
- ``dcdit_vs_dit``: a whole DC-DiT-S forward (N = 4, ~1/N of the tokens kept) vs DiT-S/2 of the same
  width and depth (target: time ratio <= 1.0 x MAC ratio).
- ``dcdit_backbone_vs_dit``: the backbones alone (DC-DiT-S on the packed tokens it keeps): where the time
  per MAC goes.
- ``dcdit_vs_dit_busy``: the same beside one busy process, where every extra kernel pays a wait.
- ``dcdit_vs_dit_train``: training steps, DC-DiT-S vs DiT-S/2: throughput per MAC >= 0.95 of DiT's.
- ``dcdit_compile``: the compiled path (dynamic shapes) vs eager, DC-DiT-S training step and forward.
- ``dcdit_varlen_kernel``: on CUDA, the FlashAttention varlen kernel vs nested-tensor SDPA, DC-DiT-S
  training step and forward, one model.
The harness reports both sides' kernels per call and peak memory.

    dyncompute bench dcdit_packed_backbone dcdit_vs_dit dcdit_vs_dit_busy
    dyncompute bench dcdit_vs_dit_train dcdit_compile --arg batch=64      # e.g. on a GPU
"""
from __future__ import annotations

import torch

from dyncompute import attention
from dyncompute.backbone import Backbone
from dyncompute.bench import (
    BenchPair,
    Timed,
    autocast,
    bench_batch,
    bench_device,
    compile_pairs,
    counted_flops,
    dit_model,
    fill_zero_parameters,
    forward,
    forward_macs,
    register_case,
    run_cases,
    train_macs,
    train_step,
)
from dyncompute.layers import grid_positions
from dyncompute.linear import adopt
from dyncompute.model import DiffusionTransformer
from dyncompute.tokens import Tokens

from .tokenizer import DynamicChunking

SIZE = {"hidden_size": 384, "depth": 12, "num_heads": 6}  # DiT-S
BATCH = 8


@register_case("dcdit_packed_backbone")
def packed_backbone_case(batch: int = BATCH, mean_len: int = 256, spread: float = 0.5) -> list[BenchPair]:
    torch.manual_seed(0)
    device = bench_device()
    # adopt: the dense layers on oneDNN, as inside a DiffusionTransformer (timm's qkv would run MKL's sgemm)
    backbone = adopt(Backbone(SIZE["hidden_size"], SIZE["depth"], SIZE["num_heads"])).eval().to(device)
    g = torch.Generator().manual_seed(0)
    lengths = (mean_len * (1 + spread * (2 * torch.rand(batch, generator=g) - 1))).long()
    lengths[-1] += batch * mean_len - lengths.sum()  # same total token count as the fixed batch
    D = SIZE["hidden_size"]
    c = torch.randn(batch, D, device=device)
    pos = torch.cat([grid_positions(32)[:n] for n in lengths.tolist()]).to(device)
    packed = Tokens.from_lengths(torch.randn(int(lengths.sum()), D, device=device), lengths.tolist(), pos)
    fixed = Tokens.from_batched(torch.randn(batch, mean_len, D, device=device),
                                grid_positions(32)[:mean_len].to(device))

    def run(tokens):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return backbone(tokens, c)

    subject = lambda: run(packed)
    reference = lambda: run(fixed)
    return [BenchPair(
        "dcdit_packed_backbone",
        Timed(f"backbone on packed lengths {min(lengths.tolist())}..{max(lengths.tolist())}",
              subject, counted_flops(subject) / 2),
        Timed(f"backbone on fixed {batch}x{mean_len}", reference, counted_flops(reference) / 2),
        target="time ratio <= 1.15", check=lambda r: r["time_ratio"] <= 1.15)]


def calibrate_router(model: DiffusionTransformer, x, t, y, fraction: float) -> None:
    """Shift the predictability router's bias so that ``fraction`` of the grid is kept on this batch
    (an untrained router keeps almost nothing; a trained one keeps ~1/N)."""
    scorer = model.tokenizer.router.residual_scorer[-1]
    with torch.no_grad():
        c = model.condition(t, y)
        h = model.tokenizer.encoder(model.tokenizer.stem(x), c)
        logits = torch.logit(model.tokenizer.router(h, tuple(x.shape[-2:])).clamp(1e-6, 1 - 1e-6))
        scorer.bias -= torch.quantile(logits.flatten(), 1 - fraction)


def dcdit_model(N: float = 4.0, batch: int = BATCH, compile: bool = False) -> DiffusionTransformer:
    """DC-DiT-S on 32x32x4 latents, its router calibrated to keep ~1/N of the tokens of `bench_batch`."""
    torch.manual_seed(0)
    tok = DynamicChunking(hidden_size=SIZE["hidden_size"], in_channels=4, out_channels=8, input_size=32,
                          target_ratio=N)
    model = DiffusionTransformer(tokenizer=tok, input_size=32, in_channels=4, num_classes=1000, compile=compile,
                                 **SIZE).to(bench_device())
    fill_zero_parameters(model)  # as after training: no adaLN-Zero gate or output layer left at exactly 0
    calibrate_router(model, *bench_batch(model, batch), 1 / N)
    return model


def kept(model, x, t, y) -> float:
    with torch.no_grad():
        return model(x, t, y, return_info=True)[1].state.mask.float().mean().item()


@register_case("dcdit_vs_dit")
def dcdit_vs_dit_case(batch: int = BATCH, N: float = 4.0, load: int = 0, compile: bool = False) -> list[BenchPair]:
    dcdit, dit = dcdit_model(N, batch, compile), dit_model(compile=compile, **SIZE)
    x, t, y = bench_batch(dit, batch)
    subject, reference = forward(dcdit, x, t, y), forward(dit, x, t, y)
    busy = f", beside {load} busy process(es)" if load else ""
    return [BenchPair(
        "dcdit_vs_dit_busy" if load else "dcdit_vs_dit",
        Timed(f"DC-DiT-S N={N:g} fwd (kept {kept(dcdit, x, t, y):.3f}, B={batch}{busy})", subject,
              forward_macs(dcdit, x, t, y)),
        Timed(f"DiT-S/2 fwd (B={batch})", reference, forward_macs(dit, x, t, y)),
        target="time ratio <= 1.0 x MAC ratio", check=lambda r: r["time_ratio"] <= r["mac_ratio"], load=load)]


@register_case("dcdit_backbone_vs_dit")
def dcdit_backbone_vs_dit_case(batch: int = BATCH, N: float = 4.0) -> list[BenchPair]:
    """Where `dcdit_vs_dit`'s time per MAC goes: DC-DiT-S's backbone on the packed tokens its tokenizer keeps
    against DiT-S/2's backbone on its patches (the same blocks; target as for the whole forward)."""
    dcdit, dit = dcdit_model(N, batch), dit_model(**SIZE)
    x, t, y = bench_batch(dit, batch)

    def backbone(model):
        with torch.no_grad(), autocast(x.device):
            c = model.condition(t, y)
            tokens = model.tokenizer.encode(x, c)[0]

        def run():
            with torch.no_grad(), autocast(x.device):  # as `forward`: bfloat16 on CUDA
                return model.backbone(tokens, c)
        return run, tokens

    (subject, packed), (reference, _) = backbone(dcdit), backbone(dit)
    return [BenchPair(
        "dcdit_backbone_vs_dit",
        Timed(f"DC-DiT-S backbone, packed lengths {min(packed.lengths)}..{max(packed.lengths)} (B={batch})",
              subject, counted_flops(subject) / 2),
        Timed(f"DiT-S/2 backbone (B={batch})", reference, counted_flops(reference) / 2),
        target="time ratio <= 1.0 x MAC ratio", check=lambda r: r["time_ratio"] <= r["mac_ratio"])]


@register_case("dcdit_vs_dit_busy")
def dcdit_vs_dit_busy_case(batch: int = BATCH, N: float = 4.0, load: int = 1) -> list[BenchPair]:
    """`dcdit_vs_dit` beside busy processes: overhead-bound paths (many small kernels) show here."""
    return dcdit_vs_dit_case(batch, N, load)


@register_case("dcdit_vs_dit_train")
def dcdit_vs_dit_train_case(batch: int = BATCH, N: float = 4.0, compile: bool = False) -> list[BenchPair]:
    """Training throughput at equal MACs: DC-DiT-S's MACs/s must reach 0.95 of DiT-S/2's."""
    dcdit, dit = dcdit_model(N, batch, compile), dit_model(compile=compile, **SIZE)
    x, t, y = bench_batch(dit, batch)
    tag = f"B={batch}{', compiled' if compile else ''}"
    return [BenchPair(
        "dcdit_vs_dit_train",
        Timed(f"DC-DiT-S N={N:g} train step (kept {kept(dcdit, x, t, y):.3f}, {tag})", train_step(dcdit, x, t, y),
              train_macs(dcdit, x, t, y)),
        Timed(f"DiT-S/2 train step ({tag})", train_step(dit, x, t, y), train_macs(dit, x, t, y)),
        target="MACs/s >= 0.95 x DiT's", check=lambda r: r["time_ratio"] <= r["mac_ratio"] / 0.95)]


@register_case("dcdit_compile")
def dcdit_compile_case(batch: int = BATCH, N: float = 4.0) -> list[BenchPair]:
    eager = dcdit_model(N, batch)
    compiled = dcdit_model(N, batch, compile=True)
    compiled.load_state_dict(eager.state_dict())
    return compile_pairs("dcdit_compile", f"DC-DiT-S N={N:g}", compiled, eager, batch)


@register_case("dcdit_varlen_kernel")
def dcdit_varlen_kernel_case(batch: int = BATCH, N: float = 4.0) -> list[BenchPair]:
    """The CUDA varlen kernel in use (`attention.VARLEN`) against nested-tensor SDPA on one DC-DiT-S."""
    kernel = attention.VARLEN["kernel"]
    if not callable(kernel) or bench_device().type != "cuda":
        return []  # nothing to compare: no varlen kernel, or on the CPU (grouped SDPA either way)
    model = dcdit_model(N, batch)
    x, t, y = bench_batch(model, batch)
    macs = train_macs(model, x, t, y)

    def using(k, fn):
        def run():
            with attention.varlen_kernel(k):
                return fn()
        return run

    name = f"{kernel.__module__}.{kernel.__name__}"
    pairs = []
    cases = (("train step", train_step(model, x, t, y), macs), ("fwd", forward(model, x, t, y), macs / 3))
    for what, fn, m in cases:
        pairs.append(BenchPair("dcdit_varlen_kernel",
                               Timed(f"DC-DiT-S {what} {name} (B={batch})", using(kernel, fn), m),
                               Timed(f"DC-DiT-S {what} nested SDPA (B={batch})", using("nested", fn), m)))
    return pairs


def main(repeats: int = 5) -> None:
    run_cases(["dcdit_packed_backbone", "dcdit_vs_dit"], repeats=repeats)


if __name__ == "__main__":
    main()
