"""`dyncompute quickstart`: train tiny models on the built-in data, sample them, write a short report.

Each entry of ``MODELS`` is (name, gin file); every run directory resumes if interrupted.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pandas as pd

from .config import scoped
from .engine import train
from .evaluation.router import has_router
from .flops import forward_columns
from .trajectory import TrajectoryRecorder, trajectory_columns
from .report import loss_curves, markdown_table, save_figure, save_table, write_page
from .sampling import generate, save_samples
from .views import write_views

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments" / "quickstart"
MODELS = [
    ("DiT/2", "dit.gin"),
    ("DC-DiT N=4", "dcdit.gin"),
]


def quickstart(out: str | Path = "reports/quickstart", runs: str | Path = "runs/quickstart",
               steps: int | None = None, num_samples: int = 32, sample_steps: int = 100,
               progress: bool = True) -> pd.DataFrame:
    out, runs = Path(out), Path(runs)
    rows, curves, figures, views = [], {}, [], {}
    for name, gin_file in MODELS:
        slug = re.sub(r"[^a-z0-9]+", "", name.lower())
        bindings = [f"train.steps = {steps}"] if steps else []
        bindings.append(f"train.progress = {progress}")
        with scoped([EXPERIMENTS / gin_file], bindings):
            result = train(runs / slug)
        model = result["ema"].eval()
        t0 = time.perf_counter()
        with TrajectoryRecorder(model) as recorder:  # every evaluation's real token counts
            samples = generate(model, num_samples=num_samples, sampler="ddpm", num_steps=sample_steps,
                               batch_size=num_samples, clip_denoised=True, device="cpu")
        sample_s = time.perf_counter() - t0
        trajectory = recorder.count(num_samples)
        files = save_samples(samples.images, out, name=f"samples_{slug}")
        figures.append((name, Path(files["png"]).name))
        if has_router(model):  # data-dependent tokens: show where they go
            views[name] = write_views(model, out / f"views_{slug}", num_samples=8, steps=25)
        metrics = result["metrics"]
        curves[name] = metrics
        rows.append(_summary(name, model, metrics, sample_s, trajectory, num_samples))
    df = pd.DataFrame(rows)
    save_table(df, out / "summary.csv")
    save_figure(loss_curves(curves), out / "loss.png")
    _write_page(out, df, figures, views, sample_steps)
    return df


def _summary(name, model, metrics: pd.DataFrame, sample_s, trajectory, n) -> dict:
    k = max(1, len(metrics) // 10)
    first, last = metrics["loss"].iloc[:k].mean(), metrics["loss"].iloc[-k:].mean()
    grid_tokens = model.input_size ** 2
    return {
        "model": name,
        "train_steps": int(metrics["step"].iloc[-1]),
        "loss_first_10%": first,
        "loss_last_10%": last,
        "loss_drop_%": 100 * (1 - last / first),
        "backbone_tokens_per_sample": metrics["tokens_per_sample"].iloc[-k:].mean(),
        "backbone_tokens_per_pixel": metrics["tokens_per_sample"].iloc[-k:].mean() / grid_tokens,
        "train_wall_s": metrics["seconds"].iloc[-1],  # training time only, summed over restarts
        **forward_columns(model),
        **trajectory_columns(trajectory),
        "sampling_wall_s_per_image": sample_s / n,
    }


def _transpose(df: pd.DataFrame) -> pd.DataFrame:
    """One column per model, one row per (labelled) quantity: easier to read than 17 columns."""
    t = df.set_index("model").T.reset_index().rename(columns={"index": "quantity"})
    t.columns.name = None
    return t


def _write_page(out: Path, df: pd.DataFrame, figures, views: dict, sample_steps: int) -> None:
    sections = [
        ("Summary", markdown_table(_transpose(df)) + "\n\nLoss is the per-sample diffusion loss (MSE + VLB) of the "
         "training batches; first/last 10% are means over the first/last tenth of the logged steps. "
         "Tokens per sample are the backbone's sequence length (training batches, last 10%). MACs are "
         "multiply-accumulates, FLOPs = 2 x MACs; per-forward figures are per image on held-out noised "
         "inputs, useful (valid tokens) or executed (padding included); per-image figures sum every model "
         "evaluation of the sampling trajectory below. At this tiny width DC-DiT's full-resolution conv "
         "encoder and decoder outweigh the tokens it saves in the backbone; `dyncompute flops "
         "experiments/imagenet256/dcdit_b.gin` shows the balance at paper scale."),
        ("Training loss", "![loss](loss.png)"),
        ("Samples", f"EMA weights, DDPM {sample_steps} steps (x0 clipped to the pixel range), no guidance, labels cycle through the classes "
         "(labels 0, 1, ..., 9, 0, ... in reading order).\n\n" + "\n\n".join(f"**{n}**\n\n![{n}]({f})" for n, f in figures)),
    ]
    for name, v in views.items():
        rel = lambda p: Path(p).relative_to(out).as_posix()
        sections.append((f"Where {name} spends its tokens", (
            f"Boundary maps over a DDIM-25 sampling trajectory (rows: samples, columns: timesteps, noisy to "
            f"clean; black = a grid position the backbone processes as a token; last column: the sample) and the fraction of the grid kept per step. "
            f"Mean kept fraction over the trajectory: {v['mean_kept']:.3f} (target 1/N = 0.25).\n\n"
            f"![boundary maps]({rel(v['boundary_maps'])})\n\n![kept vs timestep]({rel(v['kept_vs_timestep'])})")))
    write_page(out / "report.md", "dyncompute quickstart", sections)


def register_cli(sub) -> None:
    p = sub.add_parser("quickstart", help="train tiny models on the built-in data, sample, write a report")
    p.add_argument("--out", default="reports/quickstart")
    p.add_argument("--runs", default="runs/quickstart")
    p.add_argument("--steps", type=int, help="override the training steps of every model")
    p.add_argument("--num-samples", type=int, default=32)
    p.set_defaults(func=lambda a: print(quickstart(a.out, a.runs, a.steps, a.num_samples).to_string(index=False)))
