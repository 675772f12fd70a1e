"""Reports of the fine-tuning studies (see finetune_study.py): reports/upcycling/ and reports/dydit/.

Quality is the held-out denoising loss: the mean over the evaluator's timesteps (0 ... 999) of the
ε-prediction MSE on 64 held-out images of the built-in data (`dyncompute.evaluation.heldout`, EMA
weights; the same images and noise for every run and step); lower is better, never called FID.
Compute is per-image MACs over a whole DDPM-250 sampling trajectory without guidance, counted with
fvcore on what ran (`dyncompute.trajectory`); FLOPs = 2 x MACs.
"""
from __future__ import annotations

import ast
import json
import textwrap
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from dyncompute.config import RUN_CONFIGURABLES, bindings_of, scoped  # noqa: E402
from dyncompute.diffusion import make_objective  # noqa: E402
from dyncompute.evaluation.heldout import (  # noqa: E402
    create_heldout_evaluator,
    evaluate_heldout,
    heldout_dataset,
    heldout_loader,
)
from dyncompute.io import atomic_write, atomic_write_text  # noqa: E402
from dyncompute.runs import CONFIG_FILE, METRICS_FILE, latest_checkpoint, load_run  # noqa: E402
from dyncompute.sampling import generate  # noqa: E402
from dyncompute.trajectory import RowSignature, TrajectoryCount, TrajectoryRecorder  # noqa: E402

SAMPLER, STEPS, HELDOUT_IMAGES = "ddpm", 250, 64
UP, DY = "runs/upcycling", "runs/dydit"


def heldout_curve(run: Path) -> pd.DataFrame:
    """(step, heldout_loss) of every evaluation during training (``train.eval_every``)."""
    metrics = pd.read_csv(run / METRICS_FILE)
    cols = [c for c in metrics if c.startswith("denoising_mse_t")]
    if not cols:
        raise FileNotFoundError(f"{run / METRICS_FILE} has no held-out evaluation: train with train.eval_every")
    rows = metrics.dropna(subset=cols)
    return pd.DataFrame({"step": rows.step.astype(int), "heldout_loss": rows[cols].mean(axis=1)})


def heldout_loss(model, run: Path) -> float:
    """The same held-out denoising loss as the training curves, for a model built from ``run``."""
    with scoped([run / CONFIG_FILE], skip_unknown=RUN_CONFIGURABLES):
        data = heldout_dataset("procedural", HELDOUT_IMAGES)
    evaluator = create_heldout_evaluator(model, make_objective("gaussian", learn_sigma=model.learn_sigma))
    metrics = evaluate_heldout(evaluator, model, heldout_loader(data, 32))
    values = [v for k, v in metrics.items() if k.startswith("denoising_mse_t")]
    return sum(values) / len(values)


def _table(df: pd.DataFrame, cols: list[str]) -> str:
    """Markdown table of ``cols``: yes/no checks, empty cells where a value does not apply."""
    t = df[[c for c in cols if c in df]].round(4).astype(object)
    for c in t:
        if "within_5pct" in c:
            t[c] = t[c].map({True: "yes", False: "no"})
    return t.where(t.notna(), "").to_markdown(index=False)


def _csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- upcycling

UPCYCLED = {  # run -> figure label; each run's recipe is read from its config (`run_recipe`)
    "upcycled": "paper recipe: + distillation, blocks at 0.1 lr",
    "upcycled_no_distill": "paper recipe: no distillation, blocks at 0.1 lr",
    "upcycled_no_distill_block_lr1": "paper recipe: no distillation, blocks at full lr",
    "upcycled_block_lr1_distill_w0.1": "paper recipe: + distillation x0.1, blocks at full lr",
    "upcycled_pos": "+ DiT position code: + distillation, blocks at 0.1 lr",
    "upcycled_pos_no_distill": "+ DiT position code: no distillation, full lr",
    "upcycled_bridge": "DiT bridge, patch-grid prior kept",
    "upcycled_bridge_anneal": "DiT bridge, prior annealed over 100 steps",
    "upcycled_bridge_anneal150": "DiT bridge, prior annealed over 150 steps",
    "upcycled_bridge_anneal_distill": "DiT bridge, prior annealed + distillation",
    "upcycled_bridge_all_anneal": "DiT bridge from every pixel kept, prior annealed",
    "upcycled_bridge_thin": "thins (N=5)",
    "upcycled_bridge_thin_distill": "thins (N=5) + distillation",
    "upcycled_bridge_thin_anneal50": "thins (N=5), prior over 50 steps",
    "upcycled_bridge_thin_n4.4": "thins (N=4.4)",
    "upcycled_bridge_thin_n4.4_distill": "thins (N=4.4) + distillation",
    "upcycled_bridge_thin_distill200": "thins (N=5) + distillation all 200 steps",
    "upcycled_bridge_thin_n4.4_distill200": "thins (N=4.4) + distillation all 200 steps",
    "upcycled_bridge_thin_n4.4_count": "thins (N=4.4), faded by count",
    "upcycled_bridge_thin_n4.4_count_distill": "thins (N=4.4), faded by count + distillation",
    "upcycled_bridge_thin_n4.4_count_scaffold": "thins (N=4.4), faded by count, scaffold fills dropped",
    "upcycled_bridge_thin_n4.4_count_distill_keep500": "thins (N=4.4) below t=500 only, by count + distillation",
    "upcycled_bridge_thin_n4.4_count_distill_400": "thins (N=4.4), by count + distillation, 400 steps",
    "upcycled_bridge_thin_n4.4_count_distill_800": "thins (N=4.4), by count + distillation, 800 steps",
    "upcycled_bridge_thin_n4.4_count_400": "thins (N=4.4), faded by count, 400 steps",
    "upcycled_bridge_thin_n4.4_count_800": "thins (N=4.4), faded by count, 800 steps",
}


def kept_fractions(run: Path) -> dict[str, float]:
    """The router's kept fraction at the last evaluation, at the lowest and highest evaluated timestep, and
    its spread over every evaluated timestep (a router on the patch grid keeps 0.25 at each)."""
    metrics = pd.read_csv(run / METRICS_FILE)
    cols = [c for c in metrics if c.startswith("kept_fraction_t")]
    if not cols:
        return {}
    last = metrics.dropna(subset=cols).iloc[-1]
    lo, hi = min(cols, key=lambda c: int(c[15:])), max(cols, key=lambda c: int(c[15:]))
    return {"kept_fraction_low_t": float(last[lo]), "kept_fraction_high_t": float(last[hi]),
            "kept_fraction_min": float(last[cols].min()), "kept_fraction_max": float(last[cols].max())}


RECIPE = ("distillation_weight", "block_lr_scale", "pos_scale", "dit_bridge", "bridge_start", "prior_steps",
          "bridge_places", "target_ratio")  # the recipe columns first in results.csv; the rest of run_recipe last


def run_recipe(run: Path) -> dict:
    """An upcycled run's recipe, from its config (defaults where it binds nothing): distillation weight
    (0: no distillation) and steps, the copied blocks' lr scale, position code scale, DiT bridge (bridge.py;
    0: none) with its start, prior anneal steps (0: kept), fade, where the router may keep tokens ("any"
    pixel, or only the patches' first: "grid") and what fills a dropped patch, and the target N."""
    bound = {k: ast.literal_eval(v) for k, v in bindings_of((run / CONFIG_FILE).read_text()).items()
             if k.startswith(("dynamic_chunking.", "upcycling."))}

    def get(key, default):
        return bound.get(key, default)

    bridge, steps = get("dynamic_chunking.dit_bridge", 0), get("upcycling.distill_steps", 0)
    return {
        "distillation_weight": float(get("upcycling.distill_weight", 1.0)) if steps else 0.0,
        "block_lr_scale": float(get("upcycling.block_lr_scale", 1.0)),
        "pos_scale": float(get("dynamic_chunking.pos_scale", 1.0)),
        "dit_bridge": bridge,
        "bridge_start": get("dynamic_chunking.bridge_start", "grid") if bridge else "",
        "prior_steps": get("upcycling.prior_steps", 0),
        "bridge_places": get("dynamic_chunking.bridge_places", "any") if bridge else "",
        "target_ratio": float(get("dynamic_chunking.target_ratio", 4.0)),
        "distill_steps": steps,
        "bridge_fade": get("dynamic_chunking.bridge_fade", "logit") if bridge else "",
        "bridge_dropped": get("dynamic_chunking.bridge_dropped", "neighbour") if bridge else "",
        "bridge_keep_above": get("dynamic_chunking.bridge_keep_above", None) if bridge else None,
    }


SEEDS = (("dcdit_scratch", "dcdit_scratch_seed1"),
         ("upcycled_bridge_thin_n4.4_count_distill", "upcycled_bridge_thin_n4.4_count_distill_seed1"))


def seed_spread(root: Path) -> str:
    """Two trainings (train.seed 0 and 1) of the same recipe side by side, where both were run."""
    lines = []
    for runs in SEEDS:
        if not all((root / UP / r / METRICS_FILE).is_file() for r in runs):
            continue
        cells = []
        for r in runs:
            c, q = heldout_curve(root / UP / r), sample_quality(root / UP / r)
            fid = f", fid_shapes {q['fid_shapes']:.1f}" if q else ""
            cells.append(f"`{r}`: loss {float(c.heldout_loss.iloc[-1]):.4f} at step {int(c.step.iloc[-1])}{fid}")
        lines.append("- " + "; ".join(cells))
    return ("\nThe same recipe trained twice (train.seed 0 and 1), the spread between trainings:\n"
            + "\n".join(lines) + "\n") if lines else ""


HIGH_NOISE = ("500", "750", "999")  # the timesteps where a sample's layout is decided


def sample_quality(run: Path) -> dict[str, float]:
    """fid_shapes of the run's final EMA model, from ``dyncompute eval`` when it was run (else nothing), and
    that evaluation's ε MSE on its 128 held-out images: the mean over its timesteps, and over t >= 500."""
    path = run / "eval" / "eval.json"
    return quality_of(json.loads(path.read_text())) if path.is_file() else {}


def quality_of(report: dict) -> dict[str, float]:
    """`sample_quality` from an eval.json's contents."""
    out = {"fid_shapes": float(report["fid_shapes"])}
    mse = report.get("denoising_mse") or {}
    if all(t in mse for t in HIGH_NOISE):
        out["eval_mse_all_t"] = sum(mse.values()) / len(mse)
        out["eval_mse_t500_999"] = sum(mse[t] for t in HIGH_NOISE) / len(HIGH_NOISE)
    return out


LONGER = ("upcycled_bridge_thin_n4.4_count_distill", "upcycled_bridge_thin_n4.4_count_distill_400",
          "upcycled_bridge_thin_n4.4_count_distill_800")  # one recipe trained 200, 400 and 800 steps


def quality_over_steps(root: Path) -> str:
    """fid_shapes of one dynamic upcycled recipe trained 200, 400 and 800 steps (one trajectory: the lr is
    constant after warm-up, so the longer runs retrace the shorter), against the from-scratch DC-DiT's."""
    fid = {r: q["fid_shapes"] for r in LONGER if (q := sample_quality(root / UP / r))}
    if len(fid) < 2:
        return ""
    cells = [f"{v:.1f} after {int(heldout_curve(root / UP / r).step.iloc[-1])} steps" for r, v in fid.items()]
    scratch = [sample_quality(root / UP / r).get("fid_shapes") for r in ("dcdit_scratch", "dcdit_scratch_seed1")]
    scratch = " / ".join(f"{v:.1f}" for v in scratch if v is not None)
    return ("\n" + textwrap.fill(
        f"**Sample quality over training.** The thinning recipe `{LONGER[0]}` trained longer: fid_shapes "
        f"{', '.join(cells)}, against {scratch} for the from-scratch DC-DiT after 800 steps (two trainings). "
        "The upcycled model matches the from-scratch samples between 1/2 and 1 x the from-scratch steps, and "
        "beats them at equal steps; against this 800-step bar the claim's <= 1/4 holds for the loss, not for the "
        "samples (longer bars below).", 110) + "\n")


SCRATCH_HORIZONS = ("dcdit_scratch", "dcdit_scratch_1600", "dcdit_scratch_3200")  # one trajectory: 800, 1600, 3200
TRAJECTORIES = {  # upcycled recipe -> its runs of 200, 400 and 800 steps (one trajectory each)
    "thin N = 4.4, count fade, + distillation": LONGER,
    "thin N = 4.4, count fade, no distillation": ("upcycled_bridge_thin_n4.4_count",
                                                  "upcycled_bridge_thin_n4.4_count_400",
                                                  "upcycled_bridge_thin_n4.4_count_800"),
}


def trajectory(root: Path, runs: tuple[str, ...]) -> tuple[pd.DataFrame, dict[int, tuple[float, float | None]]]:
    """One training trajectory kept as runs of growing length: the longest run's held-out curve, and per run
    trained, its steps -> (final held-out loss, fid_shapes or None when not evaluated)."""
    done = [r for r in runs if (root / UP / r / METRICS_FILE).is_file()]
    points, curve = {}, None
    for r in done:
        curve = heldout_curve(root / UP / r)
        points[int(curve.step.iloc[-1])] = (float(curve.heldout_loss.iloc[-1]),
                                            sample_quality(root / UP / r).get("fid_shapes"))
    return curve, points


def trajectories(root: Path) -> dict[str, tuple[pd.DataFrame, dict]]:
    """The from-scratch bar ("scratch") and every upcycled recipe of `TRAJECTORIES` that was trained."""
    found = {"scratch": trajectory(root, SCRATCH_HORIZONS),
             **{recipe: trajectory(root, runs) for recipe, runs in TRAJECTORIES.items()}}
    return {name: t for name, t in found.items() if t[1]}


def horizon_results(paths: dict[str, tuple[pd.DataFrame, dict]]) -> pd.DataFrame:
    """The claim against each length of from-scratch training: per horizon H and upcycled recipe, the step
    from which the recipe's loss stays at or below the from-scratch loss at H, and the fewest steps among its
    evaluated runs whose fid_shapes is at or below the from-scratch fid_shapes at H; each over H."""
    rows = []
    for H, (loss, fid) in paths.get("scratch", (None, {}))[1].items():
        for recipe, (longest, points) in paths.items():
            if recipe == "scratch":
                continue
            evaluated = {n: f for n, (_, f) in sorted(points.items()) if f is not None}
            good = [n for n, f in evaluated.items() if fid is not None and f <= fid]
            loss_steps = _stays_below(longest, loss)
            rows.append({"scratch_steps": H, "scratch_heldout_loss": loss, "scratch_fid_shapes": fid,
                         "recipe": recipe, "upcycled_steps_trained": int(longest.step.iloc[-1]),
                         "loss_steps": loss_steps, "loss_steps_ratio": loss_steps / H,
                         "fid_shapes_evaluated": "; ".join(f"{n}: {f:.1f}" for n, f in evaluated.items()),
                         "fid_steps": good[0] if good else float("nan"),
                         "fid_steps_ratio": good[0] / H if good else float("nan")})
    return pd.DataFrame(rows)


def horizons_text(df: pd.DataFrame) -> str:
    if df.empty or df.scratch_steps.nunique() < 2:
        return ""
    lines = ["**Against longer from-scratch training.** The from-scratch DC-DiT continued to "
             f"{', '.join(str(h) for h in sorted(df.scratch_steps.unique()))} steps (one trajectory; "
             "`horizons.csv`). Per horizon H: its loss and fid_shapes at H, and the share of H after which each "
             "upcycled recipe matches them (loss: stays at or below from then on; fid_shapes: the fewest "
             "evaluated steps at or below; blank: not within the steps trained):", "",
             "| H | from-scratch loss | from-scratch fid_shapes | recipe | loss: steps (/ H) | fid_shapes of the "
             "recipe (steps: value) | fid: steps (/ H) |", "|---:|---:|---:|---|---|---|---|"]
    for _, r in df.iterrows():
        fid = "" if pd.isna(r.scratch_fid_shapes) else f"{r.scratch_fid_shapes:.1f}"
        loss = "" if pd.isna(r.loss_steps) else f"{r.loss_steps:.0f} ({r.loss_steps_ratio:.2f})"
        fsteps = "" if pd.isna(r.fid_steps) else f"{r.fid_steps:.0f} ({r.fid_steps_ratio:.2f})"
        lines.append(f"| {r.scratch_steps} | {r.scratch_heldout_loss:.4f} | {fid} | {r.recipe} | {loss} | "
                     f"{r.fid_shapes_evaluated} | {fsteps} |")
    both = df[(df.loss_steps_ratio <= 0.25) & (df.fid_steps_ratio <= 0.25)]
    verdicts = []
    def which(rows) -> str:
        if len(rows) == len(TRAJECTORIES):
            return "both recipes"
        if not len(rows):
            return "neither recipe"
        return "only the recipe " + " and ".join("with distillation" if "+ distillation" in r else "without"
                                                 for r in rows.recipe)

    for H, rows in df.groupby("scratch_steps"):
        verdicts.append(f"H = {H}: the loss within H/4 for {which(rows[rows.loss_steps_ratio <= 0.25])}, "
                        f"fid_shapes for {which(rows[rows.fid_steps_ratio <= 0.25])}")
    lines += ["", textwrap.fill(
        "Read against the horizon: " + "; ".join(verdicts) + ". " + (
            "No horizon has both halves within H/4 for one recipe: the claim is not reproduced here."
            if both.empty else f"Both halves within 1/4: {', '.join(sorted(set(both.recipe)))}."), 110)]
    return "\n" + "\n".join(lines) + "\n"


def horizons_figure(paths: dict[str, tuple[pd.DataFrame, dict]], df: pd.DataFrame, path: Path) -> None:
    """Held-out loss and fid_shapes over training steps: the from-scratch DC-DiT to its longest horizon, the
    upcycled recipes to theirs; a recipe meets the claim at horizon H if it matches the from-scratch value at
    H by step H/4 (the dashed lines)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    for i, (name, (curve, points)) in enumerate(paths.items()):
        scratch = name == "scratch"
        label, color = ("DC-DiT N=4 from scratch", "black") if scratch else (f"upcycled: {name}", RUN_COLORS[i - 1])
        left.plot(curve.step, curve.heldout_loss, color=color, label=label)
        fid = {n: f for n, (_, f) in sorted(points.items()) if f is not None}
        right.plot(list(fid), list(fid.values()), color=color, marker="o" if scratch else "s", label=label)
    for _, r in df.drop_duplicates("scratch_steps").iterrows():  # the bar at H, to be met by step H/4
        for ax, value in ((left, r.scratch_heldout_loss), (right, r.scratch_fid_shapes)):
            if pd.isna(value):
                continue
            ax.plot([r.scratch_steps / 4, r.scratch_steps], [value, value], color="gray", ls="--", lw=1)
            ax.plot([r.scratch_steps / 4], [value], color="gray", marker="|", ms=12)
            ax.annotate(f"H={r.scratch_steps}", (r.scratch_steps / 4, value), fontsize=7, color="dimgray",
                        xytext=(2, 3), textcoords="offset points")
    left.set_yscale("log")
    left.set_ylabel("held-out denoising loss (ε MSE, mean over timesteps; log)")
    right.set_ylabel("fid_shapes (lower is better)")
    ticks = [25, 50, 100, 200, 400, 800, 1600, 3200]
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training steps (upcycled: after upcycling; log). Dashed: the from-scratch value at H, "
                      "from H/4 (|) to H", fontsize=8)
        ax.legend(fontsize=8)
    right.set_xlim(150, 4000)
    fig.suptitle("The upcycling claim against each length of from-scratch training (EMA weights)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def loss_vs_samples(root: Path) -> str:
    """Across every evaluated run: which loss ranks the runs as fid_shapes does (Spearman's rho), and the
    run that tested the high-noise explanation (every patch kept at t >= 500)."""
    reports = {p.name: json.loads((p / "eval" / "eval.json").read_text())
               for p in sorted((root / UP).iterdir()) if (p / "eval" / "eval.json").is_file()}
    rows = [{"run": name, **quality_of(r), "spearman": r.get("kept_vs_noise_spearman")} for name, r in reports.items()]
    df = pd.DataFrame(rows).dropna(subset=["eval_mse_t500_999"])
    if len(df) < 4:
        return ""
    keep = df[df.run.str.contains("_keep")]
    longer = {r for runs in TRAJECTORIES.values() for r in runs[1:]} | set(SCRATCH_HORIZONS[1:])
    df = df[~df.run.str.contains("_keep") & ~df.run.isin(longer)]  # the 800-step bars, upcycled runs of 200 steps
    rho = {c: df.fid_shapes.corr(df[c], method="spearman") for c in ("eval_mse_all_t", "eval_mse_t500_999")}
    worst_static = df[df.run.isin(["dit", "upcycled_bridge"])].eval_mse_t500_999.max()
    scratch = df[df.run.str.startswith("dcdit_scratch")]
    thin = df[df.run.str.startswith("upcycled_bridge_thin")]
    spearman = thin.spearman.dropna()
    text = (
        f"**Which loss the samples follow.** Over {len(df)} evaluated runs (the references and the upcycled "
        f"runs of 200 steps that thin at every noise level, or not at all), fid_shapes ranks with the ε MSE at "
        f"high noise (t = 500, 750, 999; "
        f"`eval_mse_t500_999`, from `dyncompute eval`'s 128 held-out images): Spearman's rho "
        f"{rho['eval_mse_t500_999']:.2f}. It hardly ranks with the mean over all eight timesteps "
        f"(`eval_mse_all_t`, what the held-out loss curves average): rho {rho['eval_mse_all_t']:.2f}. That mean "
        "is dominated by the low-noise timesteps, where ε MSE is largest, and there every thinned upcycled model "
        "beats the from-scratch DC-DiT: the loss half of the claim. At high noise the thinned models are the "
        f"worst of those runs, {thin.eval_mse_t500_999.min():.4f}-{thin.eval_mse_t500_999.max():.4f}, against "
        f"{scratch.eval_mse_t500_999.min():.4f}-{scratch.eval_mse_t500_999.max():.4f} for the from-scratch DC-DiT "
        f"and at most {worst_static:.4f} for the DiT/2 source and the static bridge, which keep every patch; "
        "their routers drop the most patches there (kept fraction vs noise level, Spearman "
        f"{spearman.max():.2f} to {spearman.min():.2f}).")
    for _, r in keep.iterrows():
        text += (
            f" **The direct test does not bear the explanation out**: `{r.run}` keeps every patch at t >= 500 "
            f"(`bridge_keep_above`). Its high-noise MSE falls to {r.eval_mse_t500_999:.4f}, the from-scratch "
            f"level, but its fid_shapes stays at {r.fid_shapes:.1f}, against the from-scratch DC-DiT's "
            f"{scratch.fid_shapes.min():.1f}-{scratch.fid_shapes.max():.1f}. So at equal high-noise loss the gap "
            "remains: dropping patches at high noise is not what costs the samples. The high-noise loss of "
            "the copied blocks stays several times the DiT's even with every patch kept there, and the "
            "cause is still open.")
    return "\n" + textwrap.fill(text, 110) + "\n"


def _first_below(curve: pd.DataFrame, loss: float) -> float:
    reached = curve[curve.heldout_loss <= loss]
    return float(reached.step.iloc[0]) if len(reached) else float("nan")


def _stays_below(curve: pd.DataFrame, loss: float) -> float:
    """The first evaluation from which the curve stays at or below ``loss`` to its end (a run that dips
    below and comes back up has not reached it)."""
    above = curve[curve.heldout_loss > loss]
    after = curve if not len(above) else curve[curve.step > above.step.iloc[-1]]
    return float(after.step.iloc[0]) if len(after) else float("nan")


def _at(curve: pd.DataFrame, step: float) -> float:
    below = curve[curve.step <= step]
    return float(below.heldout_loss.iloc[-1]) if len(below) else float("nan")


def upcycling_results(root: Path) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Per upcycled run: steps to reach the from-scratch DC-DiT's final held-out loss, / its steps."""
    names = ["dit", "dcdit_scratch", *UPCYCLED]
    curves = {n: heldout_curve(root / UP / n) for n in names}
    scratch = curves["dcdit_scratch"]
    scratch_steps, bar = int(scratch.step.iloc[-1]), float(scratch.heldout_loss.iloc[-1])
    rows = []
    for name in UPCYCLED:
        c, recipe = curves[name], run_recipe(root / UP / name)
        steps = _stays_below(c, bar)
        rows.append({
            "run": name, **{k: recipe.pop(k) for k in RECIPE}, "scratch_steps": scratch_steps,
            "scratch_final_heldout_loss": bar, "upcycled_steps_trained": int(c.step.iloc[-1]),
            "steps_to_reach_scratch_final": steps, "steps_ratio": steps / scratch_steps,
            "upcycled_heldout_loss_at_quarter": _at(c, scratch_steps / 4),
            "scratch_heldout_loss_at_quarter": _at(scratch, scratch_steps / 4),
            "upcycled_final_heldout_loss": float(c.heldout_loss.iloc[-1]),
            "scratch_steps_to_reach_upcycled_final": _first_below(scratch, float(c.heldout_loss.iloc[-1])),
            "dit_source_steps": int(curves["dit"].step.iloc[-1]),
            "dit_source_final_heldout_loss": float(curves["dit"].heldout_loss.iloc[-1]),
            **kept_fractions(root / UP / name), **sample_quality(root / UP / name), **recipe,
        })
    return pd.DataFrame(rows), curves


RUN_COLORS = ([plt.cm.tab10(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)] + [plt.cm.tab20(i) for i in (1, 5, 9)]
              + [plt.cm.tab20b(i) for i in (0, 8, 12)])  # no gray; one colour per run of a panel


def upcycling_figure(curves: dict[str, pd.DataFrame], results: pd.DataFrame, path: Path) -> None:
    """Two panels over the same references: the paper's recipe (with and without the DiT's position code)
    and the DiT bridge (this project's extension)."""
    places = dict(zip(results.run, results.bridge_places))
    panels = (("The paper's recipe (blocks + embedders copied)", [n for n in UPCYCLED if not places[n]]),
              ("DiT bridge, router free to keep any pixel", [n for n in UPCYCLED if places[n] == "any"]),
              ("DiT bridge, router thins the DiT's patch tokens", [n for n in UPCYCLED if places[n] == "grid"]))
    fig, axes = plt.subplots(1, 3, figsize=(19, 7), sharey=True)
    bar, steps = results.scratch_final_heldout_loss.iloc[0], results.scratch_steps.iloc[0]
    for ax, (title, names) in zip(axes, panels):
        ax.plot(curves["dit"].step, curves["dit"].heldout_loss, color="gray", lw=1, alpha=0.6,
                label="DiT/2 from scratch (the upcycling source)")
        ax.plot(curves["dcdit_scratch"].step, curves["dcdit_scratch"].heldout_loss, color="black", marker=".",
                ms=4, label="DC-DiT N=4 from scratch")
        for i, name in enumerate(names):
            ax.plot(curves[name].step, curves[name].heldout_loss, marker=".", ms=4, label=UPCYCLED[name],
                    color=RUN_COLORS[i % len(RUN_COLORS)])
        ax.axhline(bar, color="black", ls="--", lw=1, label=f"from-scratch DC-DiT final ({steps} steps)")
        ax.axvline(steps / 4, color="black", ls=":", lw=1, label="1/4 of the from-scratch steps")
        ax.set_yscale("log")
        longest = max(int(c.step.max()) for n, c in curves.items() if n in names)
        # the bridge panels: their runs' own steps (the from-scratch bar is the dashed line)
        ax.set_xlim(0, (max(int(c.step.max()) for c in curves.values()) if ax is axes[0] else longest) * 1.05)
        ax.set_xlabel("training steps of the run (upcycled runs: steps after upcycling)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    axes[0].set_ylabel("held-out denoising loss (ε MSE, mean over timesteps; log)")
    fig.suptitle("Upcycling DC-DiT from DiT (EMA weights)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def upcycling_outcome(results: pd.DataFrame, scratch_fid: float) -> str:
    lines = ["Outcome (claim: the from-scratch final loss in <= 1/4 of its steps, and staying there; and, where "
             "evaluated, its sample quality):"]
    for _, r in results.iterrows():
        static = all(abs(r.get(k, 0) - 0.25) < 0.01 for k in ("kept_fraction_min", "kept_fraction_max"))
        if pd.notna(r.steps_ratio):
            verdict = "met" if r.steps_ratio <= 0.25 else "not met"
            note = (" But its router stayed on the DiT's patch grid (0.25 of the pixels kept at every t): it is a "
                    "static patchify with DC-DiT's scaffold around it, not yet dynamic chunking.") if static else (
                f" Its router keeps {r.kept_fraction_low_t:.3f} of the pixels at t = 0 and "
                f"{r.kept_fraction_high_t:.3f} at t = 999 ({r.kept_fraction_min:.3f}-{r.kept_fraction_max:.3f} "
                "over the evaluated t).")
            quality = ""
            if pd.notna(r.get("fid_shapes", float("nan"))):
                share = r.upcycled_steps_trained / r.scratch_steps
                verdict_q = ("worse, so the quality half of the claim is not met" if r.fid_shapes > scratch_fid
                             else "as good or better" + ("" if share <= 0.25 else
                                                         ", but not within 1/4 of the steps"))
                quality = (f" fid_shapes {r.fid_shapes:.1f} after {r.upcycled_steps_trained} steps ({share:.2f} of "
                           f"the from-scratch steps) against the from-scratch DC-DiT's {scratch_fid:.1f}: "
                           f"{verdict_q}.")
            lines.append(f"- `{r.run}`: below it from step {r.steps_to_reach_scratch_final:.0f} on, "
                         f"steps_ratio {r.steps_ratio:.3f}: {verdict}.{note}{quality}")
        else:
            lines.append(f"- `{r.run}`: not below it at the end of its {r.upcycled_steps_trained} steps "
                         f"({r.upcycled_steps_trained / r.scratch_steps:.2f} of the from-scratch steps): not met; "
                         f"its final loss {r.upcycled_final_heldout_loss:.4f} is what the from-scratch run reached "
                         f"after {r.scratch_steps_to_reach_upcycled_final:.0f} steps.")
    return "\n".join(lines)


def upcycling_report(root: Path, out: Path) -> pd.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    results, curves = upcycling_results(root)
    _csv(results, out / "results.csv")
    long = pd.concat([c.assign(run=n) for n, c in curves.items()], ignore_index=True)
    _csv(long[["run", "step", "heldout_loss"]], out / "curves.csv")
    upcycling_figure(curves, results, out / "heldout_loss.png")
    paths = trajectories(root)
    horizons = horizon_results(paths)
    if not horizons.empty:
        _csv(horizons, out / "horizons.csv")
        horizons_figure(paths, horizons, out / "horizons.png")
    cols = ["run", "steps_to_reach_scratch_final", "steps_ratio", "upcycled_heldout_loss_at_quarter",
            "scratch_heldout_loss_at_quarter", "upcycled_final_heldout_loss", "kept_fraction_low_t",
            "kept_fraction_high_t", "eval_mse_t500_999", "fid_shapes"]
    recipe = ["run", "distillation_weight", "distill_steps", "block_lr_scale", "pos_scale", "dit_bridge",
              "bridge_start", "prior_steps", "bridge_fade", "bridge_places", "bridge_dropped", "bridge_keep_above",
              "target_ratio"]
    scratch_fid = sample_quality(root / UP / "dcdit_scratch").get("fid_shapes", float("nan"))
    dit_steps, scratch_steps = int(results.dit_source_steps.iloc[0]), int(results.scratch_steps.iloc[0])
    bar = float(results.scratch_final_heldout_loss.iloc[0])
    scratch_kept = kept_fractions(root / UP / "dcdit_scratch")
    seeds = seed_spread(root)
    seed_jobs = " ".join(r for pair in SEEDS for r in pair[1:])
    upcycled_steps = int(results.upcycled_steps_trained.max())
    jobs = " \\\n    ".join(UPCYCLED)
    atomic_write_text(f"""# Upcycling DC-DiT from DiT on the built-in data

Tiny quickstart-size models on this project's procedural data (32x32x3, 10 classes; width 64, depth 4,
4 heads), batch 32, lr 1e-3 (30 warm-up steps; upcycled runs 10), EMA 0.95, one process with
OMP_NUM_THREADS=1 on a 2-core CPU, one seed per run. The DiT/2 source trained {dit_steps} steps; the DC-DiT
N = 4 from scratch {scratch_steps} steps (final held-out loss {bar:.4f}); every upcycled DC-DiT up to
{upcycled_steps} steps from the DiT's EMA weights.

The recipes (`results.csv` has them per run):
- **The paper's** (`upcycle.gin`): backbone blocks and t/y embedders copied, embedders frozen, a
  LayerNorm adaptor on the scaffold's conditioning, the rest of the scaffold freshly initialised; with
  or without a 100-step distillation warm-up (block-output MSE against the frozen DiT at matching grid
  positions, added to the diffusion loss), the copied blocks at 0.1 x or the full lr.
- **+ the DiT's position code** (`pos_scale` 0.5): a kept token at pixel (r, c) carries the code the
  DiT gave patch (r/2, c/2) instead of the from-scratch DC-DiT's per-pixel code.
- **The DiT bridge** (this project's extension, `upcycle_bridge.gin`,
  `plugins/tokenizers/dynamic_chunking/bridge.py`): the DiT's patch embedding and final layer are kept
  beside the new scaffold, and a patch-grid prior on the router's logits (+-4) makes it keep the first
  pixel of every patch, so that the upcycled DC-DiT starts out computing the DiT; the prior is kept, or
  annealed to 0 over the first 100 steps (`upcycling.prior_steps`) so that the router takes over.
- **The DiT bridge, the router thinning the patches** (`upcycle_bridge_thin.gin`): as above, prior
  annealed over 100 steps, but the router may keep only the patches' first pixels (`bridge_places =
  'grid'`): it drops patch tokens where it can, and never adds one between them. Its ratio loss balances
  its own decisions on those pixels towards N = 5 (a fifth of the pixels, 80% of the patches: less
  backbone work than the from-scratch N = 4).

Quality: held-out denoising loss = mean over the timesteps 0, 20, 50, 100, 250, 500, 750, 999 of the
ε-prediction MSE of the EMA model on 64 held-out images (a seed training never uses, fixed noise;
`train.eval_every`, `dyncompute.evaluation.heldout`). `steps_ratio` = the step from which the upcycled
run stays at or below the from-scratch run's final held-out loss / the from-scratch run's steps (empty:
not below it at the end; the first evaluation is at step 25). `kept_fraction_low_t` /
`_high_t`: the router's kept fraction of pixels at t = 0 and t = 999 at the last evaluation (the
from-scratch DC-DiT: {scratch_kept.get("kept_fraction_low_t", float("nan")):.3f} /
{scratch_kept.get("kept_fraction_high_t", float("nan")):.3f}; a router that stays on the patch grid keeps
0.25 at every t, i.e. it is a static patchify). `fid_shapes`: of the final EMA model, 256 class-balanced
DDIM-50 samples against 256 held-out images, on the project's shapes classifier (`dyncompute eval RUN
--samples 256 --sampler ddim --steps 50`; the from-scratch DC-DiT: {scratch_fid:.2f}; blank: not
evaluated). These small models do not draw the shapes yet, so it tells models apart only coarsely.
{seeds}

{_table(results, cols)}

Recipes:

{_table(results, recipe)}

{upcycling_outcome(results, scratch_fid)}
{quality_over_steps(root)}{horizons_text(horizons)}
![against longer from-scratch training](horizons.png)
{loss_vs_samples(root)}
![held-out loss](heldout_loss.png)

How the numbers were made and what they say: `NOTES.md`. Files: `results.csv`, `curves.csv` (every
evaluation of every run). Commands (from the repository root):

```
python experiments/finetune_study.py train --only dit dcdit_scratch \\
    {jobs} --jobs 2
python experiments/finetune_study.py train --only {seed_jobs} --jobs 2
python experiments/finetune_study.py train --only {" ".join(SCRATCH_HORIZONS[1:])} --jobs 1  # continued bars
for r in dcdit_scratch upcycled_bridge upcycled_bridge_thin upcycled_bridge_thin_distill; do
    dyncompute eval runs/upcycling/$r --samples 256 --sampler ddim --steps 50; done  # and every other run
python experiments/finetune_study.py report
```

(each job's `dyncompute train` / `dyncompute upcycle` command line is in `experiments/finetune_study.py`).
""", out / "report.md")
    return results


# --------------------------------------------------------------------------- DyDiT

MODELS = (  # run, family, label, λ
    (f"{UP}/dit", "DiT/2", "DiT/2", None),
    (f"{DY}/dit_continued", "DiT/2", "DiT/2 (+fine-tune steps)", None),
    (f"{DY}/dit_dydit_0.7", "DiT/2", "DyDiT λ=0.7", 0.7),
    (f"{DY}/dit_dydit_0.5", "DiT/2", "DyDiT λ=0.5", 0.5),
    (f"{UP}/dcdit_scratch", "DC-DiT N=4", "DC-DiT N=4", None),
    (f"{DY}/dcdit_dydit_0.7", "DC-DiT N=4", "DC-DiT + DyDiT λ=0.7", 0.7),
    (f"{DY}/dcdit_dydit_0.5", "DC-DiT N=4", "DC-DiT + DyDiT λ=0.5", 0.5),
)


def trajectory_macs(model, images: int) -> dict:
    """Per-image useful MACs (whole model, backbone) over a DDPM-250 trajectory without guidance, and
    the same recorded evaluations at full width (every block running all its tokens, heads and
    channels, no gates): the reference of the MACs ratio, on the very inputs and token counts the
    dynamic model saw (a DC-DiT's tokens depend on the images it generates)."""
    rec = TrajectoryRecorder(model)
    generate(model, num_samples=images, sampler=SAMPLER, num_steps=STEPS, cfg_scale=1.0, seed=0,
             batch_size=images, observers=[rec], device="cpu")
    count = rec.count(images)
    plain = [replace(ev, rows=[RowSignature(r.length, r.backbone_ran) for r in ev.rows]) for ev in rec.evaluations]
    full = TrajectoryCount.from_evaluations(plain, rec.cost, images)
    return {"macs": count.useful_macs_per_image, "backbone": count.by_component.get("backbone", 0.0),
            "full": full.useful_macs_per_image, "full_backbone": full.by_component.get("backbone", 0.0),
            "notes": count.notes}


def dydit_results(root: Path, images: int) -> tuple[pd.DataFrame, list[str]]:
    rows, notes = [], []
    cache_path = root / DY / "report_rows.json"  # rows of runs counted before (same newest checkpoint)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    for run, family, label, lam in MODELS:
        if not (root / run / "checkpoints").is_dir():
            notes.append(f"{label}: not trained ({run} missing), left out")
            continue
        key = f"{run}:{latest_checkpoint(root / run).name}:{images}"
        if key not in cache:
            cache[key] = dydit_row(root / run, family, label, lam, images)
            atomic_write_text(json.dumps(cache, indent=1), cache_path)
        row = dict(cache[key])
        notes += [f"{label}: {x}" for x in row.pop("notes")]
        rows.append(row)
    return pd.DataFrame(rows), notes


def dydit_row(run: Path, family: str, label: str, lam: float | None, images: int) -> dict:
    model = load_run(run).cpu().eval()
    torch.manual_seed(0)
    m = trajectory_macs(model, images)
    row = {"model": label, "run": str(run.relative_to(run.parents[2])), "family": family, "target_lambda": lam,
           "heldout_loss": heldout_loss(model, run), "per_image_GMACs": m["macs"] / 1e9,
           "per_image_TFLOPs": 2 * m["macs"] / 1e12, "backbone_per_image_GMACs": m["backbone"] / 1e9,
           "notes": m["notes"]}
    if lam is not None:
        ratio, backbone_ratio = m["macs"] / m["full"], m["backbone"] / m["full_backbone"]
        row.update(full_width_per_image_GMACs=m["full"] / 1e9, macs_ratio=ratio, backbone_macs_ratio=backbone_ratio,
                   within_5pct_of_target=abs(ratio / lam - 1) <= 0.05,
                   backbone_within_5pct_of_target=abs(backbone_ratio / lam - 1) <= 0.05)
    return row


def dydit_figure(df: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for family, marker in (("DiT/2", "o"), ("DC-DiT N=4", "s")):
        sub = df[df.family == family]
        ax.scatter(sub.per_image_TFLOPs, sub.heldout_loss, marker=marker, s=40, label=family)
        for _, r in sub.iterrows():
            ax.annotate(r.model, (r.per_image_TFLOPs, r.heldout_loss), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
    _finish(fig, ax, path, f"TFLOPs per image ({SAMPLER.upper()}-{STEPS}, no guidance; FLOPs = 2 x MACs)",
            "held-out denoising loss (ε MSE, mean over timesteps)", "Quality vs compute on the built-in data")


def dydit_report(root: Path, out: Path, images: int) -> pd.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    df, notes = dydit_results(root, images)
    _csv(df, out / "results.csv")
    dydit_figure(df, out / "quality_vs_tflops.png")
    cols = ["model", "target_lambda", "heldout_loss", "per_image_TFLOPs", "macs_ratio", "within_5pct_of_target",
            "backbone_macs_ratio", "backbone_within_5pct_of_target"]
    lines = "\n".join(f"- {n}" for n in dict.fromkeys(notes)) or "- none"
    atomic_write_text(f"""# DyDiT and DC-DiT + DyDiT on the built-in data

DyDiT (`dydit` reducer: TDW routers on the timestep switching heads and MLP channel groups, SDT token
gates before the MLP, FLOPs loss on the hard decisions towards λ, decision noise annealed to zero)
fine-tuned from the upcycling study's DiT/2 (400 steps: target warm-up 100, noise annealed over 200)
and from its from-scratch DC-DiT N = 4 (200 steps: warm-up 50, noise over 100); `DiT/2 (+fine-tune
steps)` is the DiT continued 400 steps without DyDiT (a control for the extra training). lr 1e-3,
batch 32, EMA 0.95, FLOPs-loss weight 2, τ = 1, gate biases start at 1 (all on), one seed each.

Quality: held-out denoising loss (mean over timesteps of the ε MSE on 64 held-out images, EMA weights,
hard gate decisions; as in `reports/upcycling/`). Compute: per-image useful MACs over a whole
{SAMPLER.upper()}-{STEPS} sampling trajectory (no guidance, {images} images), counted with fvcore on what ran:
DyDiT's skipped heads, channel groups and tokens are not computed, its routers and gates are counted;
TFLOPs = 2 x MACs / 1e12. `macs_ratio`: per-image MACs of the DyDiT model / the same recorded
evaluations at full width (every block on all its tokens, heads and channels, no gates; the same inputs
and token counts: a DC-DiT's tokens depend on the images it generates); `backbone_macs_ratio`: the same
for the backbone alone. `within_5pct`: |ratio / λ - 1| <= 0.05.

{_table(df, cols)}

Accounting notes:
{lines}

![quality vs TFLOPs](quality_vs_tflops.png)

How the numbers were made and what they say: `NOTES.md`. Files: `results.csv`. Commands (from the
repository root, after the upcycling study's DiT and DC-DiT):

```
python experiments/finetune_study.py train --only dit_dydit_0.7 dit_dydit_0.5 dit_continued --jobs 2
python experiments/finetune_study.py train --only dcdit_dydit_0.7 dcdit_dydit_0.5 --jobs 2 \\
    -b "train.steps = 200" -b "reducers.dydit.target_warmup_steps = 50" \\
    -b "reducers.dydit.noise_anneal_steps = 100" -b "train.checkpoint_every = 100"
python experiments/finetune_study.py report
```

(`dyncompute train experiments/dydit/dydit.gin --run-dir runs/dydit/dit_dydit_0.5 -b "reducers.dydit.target = 0.5"`
and likewise for the others.)
""", out / "report.md")
    return df


def write_reports(root: Path, out: Path, images: int = 4) -> None:
    print(upcycling_report(root, out / "upcycling").to_string(index=False))
    print(dydit_report(root, out / "dydit", images).to_string(index=False))
