"""DC-DiT benchmarks, registered as `dyncompute bench` cases (run interleaved, medians):

- ``dcdit_packed_backbone``: the backbone over packed variable-length tokens vs the same backbone over
  one fixed-length batch with the same total token count (target: time ratio <= 1.15).
- ``dcdit_vs_dit``: a whole DC-DiT forward (N = 4) vs a DiT/2 of the same width and depth
  (target: time ratio <= 1.15 x MAC ratio).
The harness reports both sides' peak memory (dyncompute.bench.peak_memory_mb).

    dyncompute bench dcdit_packed_backbone dcdit_vs_dit
    python -m dyncompute_plugins.tokenizers.dynamic_chunking.bench
"""
from __future__ import annotations

import torch

from dyncompute.backbone import Backbone
from dyncompute.bench import BenchPair, Timed, counted_flops, register_case, run_cases
from dyncompute.layers import grid_positions
from dyncompute.model import DiffusionTransformer
from dyncompute.tokens import Tokens

from .tokenizer import DynamicChunking

SIZE = dict(hidden_size=384, depth=12, num_heads=6)  # DiT-S
BATCH = 8


@register_case("dcdit_packed_backbone")
def packed_backbone_case(batch: int = BATCH, mean_len: int = 256, spread: float = 0.5) -> list[BenchPair]:
    torch.manual_seed(0)
    backbone = Backbone(SIZE["hidden_size"], SIZE["depth"], SIZE["num_heads"]).eval()
    g = torch.Generator().manual_seed(0)
    lengths = (mean_len * (1 + spread * (2 * torch.rand(batch, generator=g) - 1))).long()
    lengths[-1] += batch * mean_len - lengths.sum()  # same total token count as the fixed batch
    D = SIZE["hidden_size"]
    c = torch.randn(batch, D)
    pos = torch.cat([grid_positions(32)[:n] for n in lengths.tolist()])
    packed = Tokens.from_lengths(torch.randn(int(lengths.sum()), D), lengths.tolist(), pos)
    fixed = Tokens.from_batched(torch.randn(batch, mean_len, D), grid_positions(32)[:mean_len])

    def run(tokens):
        with torch.no_grad():
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


@register_case("dcdit_vs_dit")
def dcdit_vs_dit_case(batch: int = BATCH, N: float = 4.0) -> list[BenchPair]:
    torch.manual_seed(0)
    common = dict(input_size=32, in_channels=4, num_classes=1000, **SIZE)
    dit = DiffusionTransformer(tokenizer="patchify", **common).eval()
    tok = DynamicChunking(hidden_size=SIZE["hidden_size"], in_channels=4, out_channels=8, input_size=32,
                          target_ratio=N)
    dcdit = DiffusionTransformer(tokenizer=tok, **common).eval()
    x, t, y = torch.randn(batch, 4, 32, 32), torch.randint(0, 1000, (batch,)), torch.randint(0, 1000, (batch,))
    calibrate_router(dcdit, x, t, y, 1 / N)
    with torch.no_grad():
        kept = dcdit(x, t, y, return_info=True)[1].mask.float().mean().item()

    def fwd(model):
        with torch.no_grad():
            return model(x, t, y)

    subject, reference = (lambda: fwd(dcdit)), (lambda: fwd(dit))
    return [BenchPair(
        "dcdit_vs_dit",
        Timed(f"DC-DiT N={N:g} fwd (kept {kept:.3f}, B={batch})", subject,
              counted_flops(subject) / 2),
        Timed(f"DiT/2 fwd (D={SIZE['hidden_size']}, depth {SIZE['depth']})", reference,
              counted_flops(reference) / 2),
        target="time ratio <= 1.15 x MAC ratio", check=lambda r: r["time_ratio"] <= 1.15 * r["mac_ratio"])]


def main(repeats: int = 5) -> None:
    run_cases(["dcdit_packed_backbone", "dcdit_vs_dit"], repeats=repeats)


if __name__ == "__main__":
    main()
