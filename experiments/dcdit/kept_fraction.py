"""Kept-fraction study: train a tiny DC-DiT for N = 4 and N = 16 and report the fraction of grid
tokens the backbone keeps, against the target 1/N (acceptance: within +-30%).

    python experiments/dcdit/kept_fraction.py [--steps 300] [--out runs/dcdit_kept]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dyncompute import config, engine

HERE = Path(__file__).resolve().parent


def run(N: float, steps: int, out: Path) -> dict:
    with config.scoped([HERE / "kept_fraction.gin"],
                       [f"tokenizers.dynamic_chunking.target_ratio = {N}", f"train.steps = {steps}"]):
        result = engine.train(out / f"N{int(N)}", progress=False)
        grid = result["model"].input_size ** 2
        tail = result["metrics"].tail(max(1, steps // 6))
        train_frac = float(tail["tokens_per_sample"].mean()) / grid
        eval_frac = held_out_fraction(result["model"])
    return {"N": N, "target": 1 / N, "train_kept": train_frac, "eval_kept": eval_frac,
            "ok": all(abs(f * N - 1) <= 0.3 for f in (train_frac, eval_frac))}


@torch.no_grad()
def held_out_fraction(model, n: int = 64) -> float:
    """Kept fraction on held-out images at uniformly drawn timesteps (the model in eval mode)."""
    from dyncompute.registry import DATASETS

    data = DATASETS.build("procedural", length=20_000, seed=123)
    x = torch.stack([data[i]["x"] for i in range(n)])
    y = torch.tensor([int(data[i]["y"]) for i in range(n)])
    t = torch.linspace(0, 999, n).long()
    noise = torch.randn_like(x)
    from dyncompute.diffusion import create_diffusion
    x_t = create_diffusion(learn_sigma=model.learn_sigma).q_sample(x, t, noise)
    model.eval()
    _, info = model(x_t, t, y, return_info=True)
    return float(info.state.mask.float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("runs/dcdit_kept"))
    ap.add_argument("--ratios", type=float, nargs="+", default=[4.0, 16.0])
    args = ap.parse_args()
    for N in args.ratios:
        r = run(N, args.steps, args.out)
        print(f"N={N:g}: target 1/N={r['target']:.4f}  kept (train, last steps)={r['train_kept']:.4f} "
              f"({r['train_kept'] * N:.2f}x target)  kept (held-out, eval)={r['eval_kept']:.4f} "
              f"({r['eval_kept'] * N:.2f}x target)  within +-30%: {r['ok']}", flush=True)


if __name__ == "__main__":
    main()
