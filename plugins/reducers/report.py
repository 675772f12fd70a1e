"""Quality vs compute of every reducer on the trained quickstart DiT/2 and DC-DiT (``reports/reducers/``).

    python -m dyncompute_plugins.reducers.report --runs runs/quickstart --out reports/reducers

For each model: TeaCache is calibrated on the model's own uncached DDIM-50 trajectories first
(`TeaCache.calibrate`); then every variant samples the same images (same labels, same noise) with
DDIM-50, recorded for per-image compute (`TrajectoryRecorder`) and timed separately. Until the
evaluation issue's metrics exist, quality is the difference to the uncached DDIM-50 samples (MSE and
PSNR, pixels in [-1, 1]); DDIM with fewer steps is the naive way to spend less, and DDIM-100 shows how
far the uncached sampler itself moves when its discretisation changes.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torchvision.utils import make_grid

from dyncompute.report import markdown_table, save_figure, save_table, write_page

from .teacache import TeaCache
from .variants import load_variant, recorded, sampling_call, timed

STEPS = 50
MODELS = [("DiT/2", "dit2"), ("DC-DiT N=4", "dcditn4")]


def variants(teacache_gin: Path, thresholds: tuple[float, float]) -> list[tuple[str, list, list, int]]:
    """(label, reducers, gin bindings, DDIM steps)."""
    tea = [f"include '{teacache_gin}'"]
    return [
        ("none", [], [], STEPS),
        ("ToMe r=0.25", ["token_merging"], ["reducers.token_merging.ratio = 0.25"], STEPS),
        ("ToMe r=0.5", ["token_merging"], ["reducers.token_merging.ratio = 0.5"], STEPS),
        ("FORA N=2", ["fora"], ["reducers.fora.interval = 2"], STEPS),
        ("FORA N=3", ["fora"], ["reducers.fora.interval = 3"], STEPS),
        *[(f"TeaCache {t:g}", ["teacache"], [*tea, f"reducers.teacache.threshold = {t}"], STEPS) for t in thresholds],
        *[(f"TaylorSeer N={n} O={o}", ["taylorseer"],
           [f"reducers.taylorseer.interval = {n}", f"reducers.taylorseer.order = {o}"], STEPS)
          for n, o in ((3, 1), (3, 2), (4, 1), (4, 2))],
        ("DDIM-25", [], [], 25),
        ("DDIM-17", [], [], 17),
        ("DDIM-100", [], [], 100),
    ]


def measure(run: Path, label: str, reducers, bindings, steps: int, images: int, reference, repeats: int) -> dict:
    model = load_variant(run, reducers, bindings)
    count, samples = recorded(model, images, steps)
    seconds = timed(sampling_call(model, images, steps), repeats) if repeats else float("nan")
    mse = float(((samples - reference) ** 2).mean()) if reference is not None else 0.0
    return {
        "variant": label, "DDIM_steps": steps,
        "per_image_TFLOPs": 2 * count.useful_macs_per_image / 1e12,
        "per_image_backbone_GMACs": count.by_component.get("backbone", 0.0) / 1e9,
        "model_calls": count.nfe, "backbone_evaluations": count.backbone_evaluations,
        "wall_ms_per_image": 1e3 * seconds / images,
        "mse_to_uncached": mse, "psnr_to_uncached_dB": 10 * math.log10(4 / mse) if mse > 0 else math.inf,
        "_samples": samples,
    }


def model_table(run: Path, images: int, repeats: int, thresholds: tuple[float, float], out: Path) -> pd.DataFrame:
    gin = out / f"teacache_{run.name}.gin"
    TeaCache.calibrate(str(run), out=str(gin), sampler="ddim", num_steps=STEPS, num_samples=images,
                       clip_denoised=True)
    rows, reference = [], None
    for label, reducers, bindings, steps in variants(gin, thresholds):
        row = measure(run, label, reducers, bindings, steps, images, reference, repeats)
        reference = row["_samples"] if reference is None else reference
        rows.append(row)
        print(f"{run.name} {label}: {row['per_image_TFLOPs']:.4g} TFLOPs/image, {row['backbone_evaluations']} "
              f"backbone evaluations, PSNR {row['psnr_to_uncached_dB']:.3g} dB", flush=True)
    df = pd.DataFrame(rows)
    none = df.iloc[0]
    df.insert(3, "backbone_MAC_reduction_x", none["per_image_backbone_GMACs"] / df["per_image_backbone_GMACs"])
    df.insert(3, "MAC_reduction_x", none["per_image_TFLOPs"] / df["per_image_TFLOPs"])
    df.insert(len(df.columns) - 3, "speed_up_x", none["wall_ms_per_image"] / df["wall_ms_per_image"])
    return df


def quality_figure(tables: dict[str, pd.DataFrame]):
    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.2))
    for ax, (name, df) in zip(axes, tables.items()):
        base = df[df["variant"].str.startswith("DDIM")]
        cached = df[~df["variant"].str.startswith("DDIM") & (df["variant"] != "none")]
        x = "backbone_MAC_reduction_x"
        ax.plot(base[x], base["psnr_to_uncached_dB"], "k--o", label="uncached, fewer/more DDIM steps")
        for family, marker in (("ToMe", "s"), ("FORA", "^"), ("TeaCache", "D"), ("TaylorSeer", "o")):
            part = cached[cached["variant"].str.startswith(family)]
            ax.scatter(part[x], part["psnr_to_uncached_dB"], marker=marker, s=45, label=family)
        for _, r in pd.concat([base, cached]).iterrows():
            ax.annotate(r["variant"].replace("TaylorSeer ", "TS ").replace("TeaCache ", "TC "),
                        (r[x], r["psnr_to_uncached_dB"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("backbone MACs per image: reduction vs uncached DDIM-50 (x)")
        ax.set_ylabel("PSNR to uncached DDIM-50 samples (dB)")
        ax.set_title(f"{name}: quality vs compute (DDIM-50, same noise)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def samples_figure(df: pd.DataFrame, labels: list[str], per_row: int = 8):
    rows = [df.loc[df["variant"] == v, "_samples"].iloc[0][:per_row] for v in labels]
    grid = make_grid(((torch.cat(rows) + 1) / 2).clamp(0, 1), nrow=per_row, padding=1, pad_value=1)
    fig, ax = plt.subplots(figsize=(per_row * 0.9, len(labels) * 0.95))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_yticks([(i + 0.5) * grid.shape[1] / len(labels) for i in range(len(labels))], labels, fontsize=8)
    ax.set_xticks([])
    return fig


def write_report(runs: Path, out: Path, images: int = 16, repeats: int = 3,
                 thresholds: tuple[float, float] = (0.1, 0.3)) -> dict[str, pd.DataFrame]:
    torch.set_num_threads(int(os.environ.get("DYNCOMPUTE_REPORT_THREADS", "1")))
    tables = {name: model_table(runs / slug, images, repeats, thresholds, out) for name, slug in MODELS
              if (runs / slug / "checkpoints").is_dir()}
    shown = ["none", "ToMe r=0.5", "FORA N=3", f"TeaCache {thresholds[1]:g}", "TaylorSeer N=4 O=2", "DDIM-17"]
    sections = [("How this was measured", __doc__.split("\n\n", 2)[2].strip() + (
        f"\n\n{images} images per variant (labels cycle through the classes), one batch, x0 clipped to the pixel "
        f"range, EMA weights. MACs are multiply-accumulates and FLOPs = 2 x MACs, useful (valid tokens) and per "
        f"image over the whole trajectory, composed exactly from what each forward reported (tokens per block "
        f"after merging, skipped backbones, the reducers' own matching, indicators and forecasts). Wall-clock is "
        f"the median of {repeats} sampling calls after the recorded one, on {torch.get_num_threads()} CPU thread(s) "
        f"of a shared 2-core machine (other jobs ran beside it: treat it as indicative). Model calls count "
        f"evaluations (one per step); backbone evaluations count those whose attention/MLP computed."))]
    for name, df in tables.items():
        slug = dict(MODELS)[name]
        save_table(df.drop(columns="_samples"), out / f"summary_{slug}.csv")
        save_figure(samples_figure(df, shown), out / f"samples_{slug}.png")
        sections.append((name, markdown_table(df.drop(columns="_samples"), ".3g")
                         + f"\n\n![samples {name}](samples_{slug}.png)\n\nRows: {', '.join(shown)}."))
    save_figure(quality_figure(tables), out / "quality_vs_compute.png")
    sections.insert(1, ("Quality vs compute", "![quality vs compute](quality_vs_compute.png)"))
    write_page(out / "report.md", "Compute reducers on the quickstart models", sections)
    return tables


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/quickstart")
    p.add_argument("--out", default="reports/reducers")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--thresholds", type=float, nargs=2, default=(0.1, 0.3))
    a = p.parse_args(argv)
    write_report(Path(a.runs), Path(a.out), a.images, a.repeats, tuple(a.thresholds))


if __name__ == "__main__":
    main()
