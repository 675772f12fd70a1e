"""`dyncompute report DIR`: a sweep's results.csv, report.md, report.html and figures, from its files alone.

Inputs are what cells wrote: ``cells/*/result.json`` (and error.json), the training runs'
``metrics.csv``, the cells' sample grids and boundary maps, and ``sweep.json`` for the grid's order.
Every metric a cell reports with a goal ("min"/"max") gets a quality-vs-compute panel with its Pareto
front; configurations are aggregated over their replicates (mean ± std): cells whose configs differ
only in their seeds (training seed ``train.seed``, sampling seed ``CellSettings.seed``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..io import atomic_write
from ..report import Figure, loss_curves, save_figure, save_table, write_pages
from .cell import CELLS, ERROR, RESULT
from .spec import SEED_AXIS, identity

COMPUTE = "per_image_TFLOPs"
SUMMARY_COMPUTE = [COMPUTE, "NFE", "backbone_evaluations", "backbone_tokens_per_step", "sampling_wall_ms_per_image",
                   "sampling_cpu_ms_per_image", "params_M"]
MAX_LINES = 12
SEED_BINDINGS = ("train.seed", "CellSettings.seed")  # replicates differ in these alone


# --------------------------------------------------------------------------- reading


def load_results(root: str | Path) -> tuple[pd.DataFrame, dict, list[dict], list[dict]]:
    """(one row per finished cell, metric goals, raw results, failures) in the grid's order."""
    root = Path(root)
    order = _manifest_order(root)
    results = [json.loads(p.read_text()) for p in sorted((root / CELLS).glob(f"*/{RESULT}"))]
    results.sort(key=lambda r: order.get(r["cell_id"], len(order)))
    for r in results:
        r["replicate"] = replicate_key(root / CELLS / r["cell_id"], r)
    failures = [json.loads(p.read_text()) for p in sorted((root / CELLS).glob(f"*/{ERROR}"))
                if not (p.parent / RESULT).is_file()]
    goals: dict[str, str] = {}
    for r in results:
        goals.update(r.get("metric_goals", {}))
    return pd.DataFrame([flatten(r) for r in results]), goals, results, failures


def replicate_key(cdir: Path, r: dict) -> str:
    """One key for the cells whose resolved configs (and references) differ only in their seeds."""
    path = cdir / "config.gin"
    if not path.is_file():
        return r["cell_id"]
    lines = [line for line in path.read_text().splitlines() if not line.startswith(SEED_BINDINGS)]
    return identity(*lines, *r.get("bindings", {}).get("reference", []))


def _manifest_order(root: Path) -> dict[str, int]:
    path = root / "sweep.json"
    if not path.is_file():
        return {}
    return {c["cell_id"]: i for i, c in enumerate(json.loads(path.read_text())["cells"])}


def flatten(r: dict) -> dict:
    """One results.csv row: labels, metrics, compute (units in the names), training, identities."""
    labels = dict(r["labels"])
    config = " · ".join(str(v) for k, v in labels.items() if k != SEED_AXIS)
    t = r.get("training", {})
    training = {"train_steps": t.get("steps"), "train_wall_s": t.get("train_wall_s"),
                "train_loss_last_10%": t.get("train_loss_last_10%"),
                "train_tokens_per_sample": t.get("train_tokens_per_sample"),
                "reused_checkpoint": t.get("reused")}
    return {"cell": r["label"], "config": config, **labels, **r.get("metrics", {}), **r.get("compute", {}),
            **training, "cell_wall_s": r.get("cell_wall_s"), "cell_cpu_s": r.get("cell_cpu_s"),
            "cell_id": r["cell_id"], "train_id": r["train_id"], "replicate": r.get("replicate", r["cell_id"])}


def aggregate(df: pd.DataFrame, columns: list[str], labels: list[str]) -> pd.DataFrame:
    """Mean and std over each configuration's replicates (its seeds): columns ``X`` (mean), ``X_std``, ``seeds``
    (replicates), ``config`` (the first replicate's) and the labels."""
    cols = [c for c in columns if c in df]
    g = df.groupby("replicate" if "replicate" in df else "config", sort=False)
    parts = [g[["config", *[c for c in labels if c in df]]].first(), g[cols].mean(),
             g[cols].std(ddof=1).add_suffix("_std")]
    out = pd.concat(parts, axis=1)
    out.insert(0, "seeds", g.size())
    return out.reset_index(drop=True)


# --------------------------------------------------------------------------- figures


def pareto_front(x: np.ndarray, y: np.ndarray, goal: str) -> np.ndarray:
    """Indices of points no other point beats in both compute (lower) and quality (per goal), by compute."""
    sign = 1.0 if goal == "min" else -1.0
    idx = sorted(range(len(x)), key=lambda i: (x[i], sign * y[i]))
    front, best = [], np.inf
    for i in idx:
        if np.isfinite(y[i]) and sign * y[i] < best:
            front.append(i)
            best = sign * y[i]
    return np.array(front, dtype=int)


def plot_quality_vs_compute(agg: pd.DataFrame, goals: dict, axes_names: list[str], rows_by: str | None = None):
    """One panel per metric; with ``rows_by``, one row of panels (and Pareto fronts) per value of that axis."""
    metrics = [m for m in goals if m in agg]
    if rows_by:  # one row of panels (and Pareto fronts) per value of that axis
        rows = list(dict.fromkeys(agg[rows_by].astype(str)))
        grid = [[(row, metric) for metric in metrics] for row in rows]
    else:  # one panel per metric, three to a row
        grid = [[(None, metric) for metric in metrics[i:i + 3]] for i in range(0, len(metrics), 3)]
    cols = max(len(line) for line in grid)
    fig, axs = plt.subplots(len(grid), cols, figsize=(4.8 * cols, 3.9 * len(grid)), squeeze=False)
    styled = [a for a in axes_names if a != rows_by] or ["config"]
    colour_axis, marker_axis = styled[0], styled[1] if len(styled) > 1 else None
    colours = {v: f"C{i % 10}" for i, v in enumerate(dict.fromkeys(agg[colour_axis].astype(str)))}
    markers = {v: m for v, m in zip(dict.fromkeys(agg[marker_axis].astype(str)), "os^Dv<>pPX*h")} if marker_axis else {}
    for r, line in enumerate(grid):
        for c in range(cols):
            if c >= len(line):
                axs[r][c].set_visible(False)
                continue
            row, metric = line[c]
            part = agg if row is None else agg[agg[rows_by].astype(str) == row].reset_index(drop=True)
            _panel(axs[r][c], part, metric, goals[metric], colours, colour_axis, markers, marker_axis)
            if row is not None:
                axs[r][c].set_title(f"{row}: {metric}", fontsize=10)
    handles = [plt.Line2D([], [], color=c, marker="o", ls="none", label=v) for v, c in colours.items()]
    handles += [plt.Line2D([], [], color="grey", marker=m, ls="none", label=v) for v, m in markers.items()]
    handles.append(plt.Line2D([], [], color="k", ls="--", marker="o", mfc="none", ms=10, label="Pareto front"))
    if any(f"{m}_real" in agg for m in metrics):
        handles.append(plt.Line2D([], [], color="grey", ls=":", label="real data (held-out images)"))
    per_line = 6 if cols < 4 else 10
    lines = (len(handles) - 1) // per_line + 1
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), per_line), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.035 * lines * 2 / len(grid), 1, 1))
    return fig


def _panel(ax, agg: pd.DataFrame, metric: str, goal: str, colours: dict, colour_axis: str, markers: dict,
           marker_axis: str | None) -> None:
    x, y = agg[COMPUTE].to_numpy(float), agg[metric].to_numpy(float)
    unit = "GFLOPs" if np.nanmax(x) < 0.1 else "TFLOPs"  # small models: readable ticks, the unit says which
    x = x * (1e3 if unit == "GFLOPs" else 1.0)
    yerr = agg.get(f"{metric}_std")
    shown = np.isfinite(x) & np.isfinite(y)  # e.g. PSNR of the reference configuration itself (identical: inf)
    if f"{metric}_real" in agg:  # the metric on real data: what a perfect model would score
        ax.axhline(float(agg[f"{metric}_real"].mean()), color="grey", ls=":", lw=1.2)
    for i, row in agg.iterrows():
        if shown[i]:
            ax.errorbar(x[i], y[i], yerr=None if yerr is None or np.isnan(yerr[i]) else yerr[i], ls="none",
                        marker=markers.get(str(row[marker_axis]), "o") if marker_axis else "o", ms=7,
                        color=colours[str(row[colour_axis])], capsize=3, alpha=0.9)
    front = pareto_front(x, y, goal)
    if len(front):
        ax.plot(x[front], y[front], color="k", lw=1, ls="--", drawstyle="steps-post", zorder=0)
        ax.scatter(x[front], y[front], s=190, facecolors="none", edgecolors="k", lw=1.2)
    ax.set_xlabel(f"per-image {unit} over the sampling trajectory (FLOPs = 2 x MACs)", fontsize=8)
    ax.xaxis.set_major_locator(plt.MaxNLocator(5))
    ax.set_ylabel(f"{metric} ({'lower' if goal == 'min' else 'higher'} is better)")
    if shown.any() and x[shown].max() > 20 * x[shown].min() > 0:  # decades apart: log; else readable linear ticks
        ax.set_xscale("log")
    ax.grid(alpha=0.3)


def plot_tokens_vs_timestep(results: list[dict]):
    """Backbone tokens per image at every sampling step (counted images, conditional branch)."""
    lines: dict[tuple, list[str]] = {}  # one line per distinct trajectory: identical ones share it
    for r in results:
        d = r.get("compute_details", {})
        if d.get("timesteps"):
            lines.setdefault((tuple(d["timesteps"]), tuple(d["tokens_per_step"])), []).append(flatten(r)["config"])
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, ((t, tokens), labels) in enumerate(list(lines.items())[:MAX_LINES]):
        label = labels[0] + (f" (and {len(labels) - 1} more, identical)" if len(labels) > 1 else "")
        ax.plot(t, tokens, marker=".", ms=3, color=f"C{i % 10}", ls="-" if i < 10 else "--", label=label)
    ax.set_xlabel("model timestep input (sampling runs right to left: noisy -> clean)")
    ax.set_ylabel("backbone tokens per image")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _first_seed(results: list[dict]) -> list[dict]:
    seeds = [r["labels"].get(SEED_AXIS) for r in results]
    first = min((s for s in seeds if s is not None), default=None)
    return [r for r in results if r["labels"].get(SEED_AXIS) == first]


def _run_label(results: list[dict], train_id: str) -> str:
    """The labels every cell of a training run shares (its training axes)."""
    cells = [r["labels"] for r in results if r["train_id"] == train_id]
    shared = {k: v for k, v in cells[0].items() if all(c.get(k) == v for c in cells)}
    return " · ".join(f"seed {v}" if k == SEED_AXIS else str(v) for k, v in shared.items()) or train_id


# --------------------------------------------------------------------------- the report


def write_report(root: str | Path, to: str | Path | None = None, figures: bool = True) -> Path:
    """Write results.csv (+ report.md, report.html and figures/ when ``figures``) into ``to`` (default root)."""
    root = Path(root)
    if not (root / "sweep.json").is_file() and not (root / CELLS).is_dir():
        raise FileNotFoundError(f"{root} is not a sweep folder (no sweep.json, no cells/)")
    out = Path(to) if to else root
    df, goals, results, failures = load_results(root)
    save_table(df, out / "results.csv")
    if not figures:
        return out / "results.csv"
    manifest = json.loads((root / "sweep.json").read_text()) if (root / "sweep.json").is_file() else {}
    axes_names = [a for a in manifest.get("axes", {}) if a in df]
    sections = [("Status", [_status(manifest, results, failures), _reproduce(manifest, root, out)])]
    if manifest.get("axes"):
        sections.append(("Grid", [_grid_table(manifest)]))
    if results:
        sections += _result_sections(root, out, df, goals, results, axes_names, manifest.get("panels_by"))
    if failures:
        sections.append(("Failed cells", [pd.DataFrame([{"cell": f["label"], "cell_id": f["cell_id"],
                                                         "stage": f["stage"], "error": f["error"][:300]}
                                                        for f in failures])]))
    title = f"sweep {manifest.get('name', root.name)}"
    return write_pages(out, title, sections)["md"]


def _status(manifest: dict, results: list, failures: list) -> str:
    total = len(manifest.get("cells", [])) or len(results) + len(failures)
    pending = total - len(results) - len(failures)
    return (f"{len(results)} of {total} cells finished, {len(failures)} failed, {pending} not run yet. "
            f"Sweep file: `{manifest.get('source', '?')}`; base configs: "
            f"{', '.join(f'`{b}`' for b in manifest.get('base', [])) or 'none'}. Every table and figure below is "
            "rebuilt from the cells' result files by `dyncompute report DIR`; results.csv has every column of "
            "every cell.")


def _reproduce(manifest: dict, root: Path, out: Path) -> str:
    """The commands that rebuild this report from nothing (training included)."""
    to = "" if out.resolve() == root.resolve() else f" --to {shown_path(out)}"
    return (f"Reproduce: `dyncompute sweep {manifest.get('source', 'SWEEP.gin')} --out {shown_path(root)} --jobs 2` "
            "(trains, samples and evaluates every cell; rerun to resume), then "
            f"`dyncompute report {shown_path(root)}{to}`.")


def shown_path(path: Path) -> str:
    """A path as a reader of the report should see it: relative to the project when inside it."""
    from ..config import PROJECT_ROOT

    try:
        return Path(path).resolve().relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return str(path)


def _grid_table(manifest: dict) -> pd.DataFrame:
    """Every axis value and the gin bindings it adds, then what every cell adds (sweep.bindings)."""
    rows = [{"axis": axis, "value": label, "bindings": "; ".join(bindings) or "(base config)"}
            for axis, values in manifest["axes"].items() for label, bindings in values.items()]
    if manifest.get("bindings"):
        rows.append({"axis": "(every cell)", "value": "", "bindings": "; ".join(manifest["bindings"])})
    return pd.DataFrame(rows)


def _result_sections(root: Path, out: Path, df: pd.DataFrame, goals: dict, results: list, axes_names: list,
                     panels_by: str | None = None):
    figdir = out / "figures"
    metrics = [m for m in goals if m in df]
    labels = list(dict.fromkeys(k for r in results for k in r["labels"] if k != SEED_AXIS))
    floors = [f"{m}_real" for m in metrics if f"{m}_real" in df]  # real-data references of the metrics
    agg = aggregate(df, metrics + floors + [c for c in SUMMARY_COMPUTE if c in df], labels)
    sections = [("Results (mean ± std over replicates: training and sampling seeds)",
                 [_summary_table(agg, metrics), _units_note()])]
    if metrics and COMPUTE in agg:
        save_figure(plot_quality_vs_compute(agg, goals, axes_names, panels_by), figdir / "quality_vs_compute.png")
        figure = Figure("figures/quality_vs_compute.png", "quality vs per-image FLOPs, one point per configuration "
                        "(mean over its replicates, bars: ± std over training and sampling seeds); circled: the "
                        "Pareto front")
        budgets = ("Best configuration per compute budget (the Pareto front as a table: for every compute "
                   "level present, the best configuration that costs no more):")
        sections.append(("Quality vs compute", [figure, _metric_notes(results, metrics), budgets,
                                                *[_best_per_budget(agg, m, goals[m]) for m in metrics]]))
    sections.append(("Training curves", _training_curves(root, figdir, results)))
    sections.append(("Tokens kept vs timestep", _tokens(figdir, results)))
    sections.append(("Where the tokens go", _copied(root, figdir, results, "boundary_maps", "boundary",
                                                     "boundary maps of the trained tokenizer along a DDIM trajectory "
                                                     "at the cell's budget (black: positions the backbone processes; "
                                                     "rows: samples; columns: noisy -> clean; last: the sample)")))
    sections.append(("Samples", _samples(root, figdir, results)))
    return sections


def _samples(root: Path, figdir: Path, results: list, per_row: int = 8) -> list:
    """The first samples of every configuration side by side (first seed): cells share noise and labels."""
    rows = [(flatten(r)["config"], np.load(root / r["files"]["npz"])["arr_0"][:per_row]) for r in _first_seed(results)
            if r.get("files", {}).get("npz") and (root / r["files"]["npz"]).is_file()]
    if not rows:
        return ["no cell wrote samples"]
    fig, axs = plt.subplots(len(rows), 1, figsize=(per_row * 0.75 + 2.5, 0.8 * len(rows)), squeeze=False)
    for ax, (label, images) in zip(axs[:, 0], rows):
        ax.imshow(np.concatenate(list(np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=255)), 1),
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout(h_pad=0.2)
    save_figure(fig, figdir / "samples.png")
    return [Figure("figures/samples.png", f"the first {per_row} samples of every configuration (first seed); the "
                   "cells sample from the same noise and labels (per seed), so columns compare like with like")]


def _summary_table(agg: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    show = pd.DataFrame({"configuration": agg["config"], "replicates": agg["seeds"]})
    for c in metrics + [c for c in SUMMARY_COMPUTE if c in agg]:
        std = agg.get(f"{c}_std")
        show[c] = [_pm(m, s, n) for m, s, n in zip(agg[c], std if std is not None else [np.nan] * len(agg),
                                                   agg["seeds"])]
    return show


def _pm(mean: float, std: float, n: int) -> str:
    if pd.isna(mean):
        return ""
    return f"{mean:.4g} ± {std:.2g}" if n > 1 and not pd.isna(std) else f"{mean:.4g}"


def _units_note() -> str:
    return ("Compute is per image over the whole sampling trajectory (every step, both CFG branches): "
            "TFLOPs = 2 x MACs, useful (valid tokens only). NFE: model evaluations (calls) per image; backbone "
            "evaluations: those whose backbone computed (not skipped or served from a step cache). Backbone tokens: "
            "mean per step (conditional branch). Wall-clock: ms per image sampling one batch of the cell's samples "
            "on the cell's device (shared CPUs make it noisy); CPU: the cell process's CPU ms per image meanwhile "
            "(all its threads; less sensitive to other jobs). Params in millions.")


def _metric_notes(results: list, metrics: list[str]) -> str:
    described: dict[str, str] = {}
    for r in results:
        described.update(r.get("metric_descriptions", {}))
    return "\n\n".join(f"`{m}`: {described[m]}." for m in metrics if m in described)


def _best_per_budget(agg: pd.DataFrame, metric: str, goal: str) -> pd.DataFrame:
    """For every compute level present: the best configuration that costs no more."""
    rows = []
    for level in sorted(agg[COMPUTE].unique()):
        under = agg[agg[COMPUTE] <= level * (1 + 1e-9)]
        best = under.loc[under[metric].idxmin() if goal == "min" else under[metric].idxmax()]
        if rows and rows[-1]["best configuration"] == best["config"]:
            continue
        rows.append({"budget: per-image TFLOPs <=": level, "best configuration": best["config"], metric: best[metric],
                     "its per-image TFLOPs": best[COMPUTE]})
    return pd.DataFrame(rows)


def _training_curves(root: Path, figdir: Path, results: list) -> list:
    curves = {}
    for r in results:
        csv = r.get("training", {}).get("metrics_csv")
        label = _run_label(results, r["train_id"])
        if csv and (root / csv).is_file() and label not in curves:
            curves[label] = pd.read_csv(root / csv)
    if not curves:
        return ["no training metrics found"]
    smooth = max(1, min(20, min(len(c) for c in curves.values()) // 5))
    save_figure(loss_curves(curves, smooth=smooth), figdir / "training_curves.png")
    return [Figure("figures/training_curves.png", "training loss per training run: the training batches' "
                   "diffusion loss (MSE + VLB) plus the tokenizer's auxiliary losses (DC-DiT's ratio loss); "
                   "faint: logged values, solid: rolling mean")]


def _tokens(figdir: Path, results: list) -> list:
    firsts = _first_seed(results)
    if not any(r.get("compute_details", {}).get("timesteps") for r in firsts):
        return ["no cell recorded its trajectory"]
    save_figure(plot_tokens_vs_timestep(firsts), figdir / "tokens_vs_timestep.png")
    return [Figure("figures/tokens_vs_timestep.png", "backbone tokens per image at every step of each cell's "
                   "own sampling trajectory (mean over the images whose compute was counted; first seed; static "
                   "tokenizers are flat)")]


def _copied(root: Path, figdir: Path, results: list, key: str, prefix: str, caption: str) -> list:
    """Copy one figure per configuration (first seed; a figure cells share is shown once) beside the report."""
    blocks, seen = [], set()
    for r in _first_seed(results):
        src = r.get("files", {}).get(key)
        if not src or src in seen or not (root / src).is_file() or len(seen) >= MAX_LINES:
            continue
        seen.add(src)
        name = f"{prefix}_{r['cell_id']}.png"
        atomic_write(figdir / name, lambda tmp, s=root / src: shutil.copyfile(s, tmp))
        sharing = [o["label"] for o in results if o.get("files", {}).get(key) == src]
        blocks.append(Figure(f"figures/{name}", f"{' = '.join(sharing)}: {caption}"))
    return blocks or [f"no cell wrote {key.replace('_', ' ')}"]
