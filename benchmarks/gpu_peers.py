"""Issue 13 on a GPU: dyncompute against the original DiT and DC-DiT code, bfloat16 autocast, same
weights and inputs, timed interleaved by `dyncompute.bench` (medians, kernels per call, peak memory).

    python benchmarks/gpu_peers.py PEERS [--batch 8 64] [--repeats 20] [--out results.csv]
    python benchmarks/gpu_peers.py PEERS --device cpu --batch 8 --load 1   # fp32 on the CPU, beside a busy process

PEERS is the folder that ``../shared/peer-bench/setup_peers.sh`` lays out (the original ``models.py``
of facebookresearch/DiT, the official DC-DiT code, their model builders in ``common.py``), with
``benchmarks/peer_stub/flash_attn.py`` copied over ``PEERS/stub/flash_attn/__init__.py`` where flash-attn
is not installed (``gpu_check.sh`` does this). Pairs per batch size:
- DiT-S/2 forward and training step (fwd + MSE + bwd + AdamW, the same for both sides): ours eager, and
  the training step of ours compiled (`DiffusionTransformer.compile`), against the original;
- DC-DiT-S (N = 4, router bias set so ~25% of the tokens are kept) forward and training step against the
  official code, after checking that both chunk identically and agree in output.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dyncompute import bench
from dyncompute.bench import BenchPair, Timed, format_row, forward_macs, relative_difference, run_pair
from dyncompute.compile import compile_model
from dyncompute.io import atomic_write

DEVICE = {"name": "cuda"}  # --device cpu checks the plumbing (float32) on a machine without a GPU


def amp():
    return torch.autocast(DEVICE["name"], dtype=torch.bfloat16, enabled=DEVICE["name"] == "cuda")


def peers(folder: str):
    sys.path.insert(0, str(Path(folder).resolve()))
    import common  # noqa: PLC0415  (the peer-bench harness, importable only once the folder is known)

    return common


def forward(model, x, t, y, tuple_out=False):
    def fwd():
        model.eval()
        with torch.no_grad(), amp():
            out = model(x, t, y)
        return out[0] if tuple_out else out

    return fwd


def train_step(model, x, t, y, target, tuple_out=False):
    """fwd + MSE + bwd + AdamW under bf16 autocast; lr 1e-6 keeps DC-DiT's masks fixed across rounds."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        with amp():
            out = model(x, t, y)
            out = out[0] if tuple_out else out
            loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()

    return step


def tag(batch: int) -> str:
    return f"B={batch}, {'bf16' if DEVICE['name'] == 'cuda' else 'fp32'}"


def mse_target(batch: int) -> torch.Tensor:
    """The fixed regression target of both sides' training steps (8 output channels: learn_sigma)."""
    return torch.randn(batch, 8, 32, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE["name"])


def dit_pairs(common, batch: int) -> list[BenchPair]:
    orig, ours = (m.to(DEVICE['name']) for m in common.build_dit_pair("S"))
    x, t, y = (v.to(DEVICE['name']) for v in common.dit_inputs(batch))
    macs = forward_macs(ours, x, t, y)
    print(f"DiT-S/2 B={batch}: |ours - original| / |original| = "
          f"{relative_difference(forward(ours, x, t, y)(), forward(orig, x, t, y)()):.2e}", flush=True)
    target, label = mse_target(batch), tag(batch)
    compiled = compile_model(common.build_dit_pair("S")[1].to(DEVICE['name']))
    return [
        BenchPair("peer_dit_fwd", Timed(f"ours DiT-S/2 fwd ({label})", forward(ours, x, t, y), macs),
                  Timed(f"original DiT-S/2 fwd ({label})", forward(orig, x, t, y), macs)),
        BenchPair("peer_dit_train", Timed(f"ours DiT-S/2 train ({label})", train_step(ours, x, t, y, target), 3 * macs),
                  Timed(f"original DiT-S/2 train ({label})", train_step(orig, x, t, y, target), 3 * macs)),
        BenchPair("peer_dit_train_compiled",
                  Timed(f"ours DiT-S/2 train compiled ({label})", train_step(compiled, x, t, y, target), 3 * macs),
                  Timed(f"original DiT-S/2 train ({label})", train_step(orig, x, t, y, target), 3 * macs),
                  target="time ratio <= 0.85", check=lambda r: r["time_ratio"] <= 0.85),
    ]


def dcdit_pairs(common, batch: int) -> list[BenchPair]:
    x, t, y = common.dit_inputs(batch)
    official, ours, _ = common.build_dcdit_pair(x, t, y, kept=0.25)
    official, ours = official.to(DEVICE['name']), ours.to(DEVICE['name'])
    x, t, y = x.to(DEVICE['name']), t.to(DEVICE['name']), y.to(DEVICE['name'])
    with torch.no_grad(), amp():
        a = official.eval()(x, t, y)[0]
        mask = common.official_dcdit_mask(official)
        b, info = ours.eval()(x, t, y, return_info=True)
    same = bool((mask == info.state.mask).all())
    print(f"DC-DiT-S B={batch}: kept {info.state.mask.float().mean():.3f}, masks equal {same}, "
          f"|ours - official| / |official| = {relative_difference(b, a):.2e} ", flush=True)
    macs = forward_macs(ours, x, t, y)
    target, label = mse_target(batch), tag(batch)
    return [
        BenchPair("peer_dcdit_fwd", Timed(f"ours DC-DiT-S fwd ({label})", forward(ours, x, t, y), macs),
                  Timed(f"official DC-DiT-S fwd ({label})", forward(official, x, t, y, True), macs),
                  target="time ratio <= 0.8", check=lambda r: r["time_ratio"] <= 0.8),
        BenchPair("peer_dcdit_train",
                  Timed(f"ours DC-DiT-S train ({label})", train_step(ours, x, t, y, target), 3 * macs),
                  Timed(f"official DC-DiT-S train ({label})",
                        train_step(official, x, t, y, target, tuple_out=True), 3 * macs),
                  target="time ratio <= 0.8", check=lambda r: r["time_ratio"] <= 0.8),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("peers")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", nargs="+", default=["dit", "dcdit"])
    ap.add_argument("--out")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--load", type=int, default=0, help="busy processes spinning beside every pair (CPU contention)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on the CPU (the comparisons' 2)")
    args = ap.parse_args()
    DEVICE["name"] = bench.DEVICE["name"] = args.device
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_peers.py: no CUDA device")
    common = peers(args.peers)
    torch.set_num_threads(8 if args.device == "cuda" else args.threads)  # on CUDA the CPU only builds models
    import pandas as pd

    rows = []
    for batch in args.batch:
        for kind, build in (("dit", dit_pairs), ("dcdit", dcdit_pairs)):
            if kind not in args.only:
                continue
            for pair in build(common, batch):
                pair.load = args.load
                rows.append(run_pair(pair, args.warmup, args.repeats))
                print(format_row(rows[-1]), flush=True)
    if args.out:
        atomic_write(args.out, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))


if __name__ == "__main__":
    main()
