"""Handlers of the ``dyncompute`` commands (parsed in :mod:`dyncompute.cli`): one function per
command, named like it, turning parsed arguments into calls of the library and printed results."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd


def train(args) -> None:
    if args.nproc_per_node:  # the workers' fork server imports the framework while this process does
        from .processes import start_method

        start_method(["dyncompute.engine"])
    from .engine import launch

    run_dir = args.run_dir or str(Path("runs") / Path(args.config).stem)
    steps = launch(args.config, args.bind, run_dir, backend=args.backend, nproc_per_node=args.nproc_per_node,
                   allow_config_change=args.allow_config_change)
    print(f"trained {steps} steps -> {run_dir}")


def upcycle(args) -> None:
    from .engine import launch
    from .errors import ConfigError

    if not Path(args.dit).exists():
        raise ConfigError(f"DiT to upcycle not found: {args.dit}")
    bindings = ["train.extension = @upcycling()", f"upcycling.source = {str(args.dit)!r}",
                "tokenizers.dynamic_chunking.cond_adaptor = True"]
    if args.distill_steps is not None:
        bindings.append(f"upcycling.distill_steps = {args.distill_steps}")
    run_dir = args.run_dir or str(Path("runs") / Path(args.config).stem)
    steps = launch(args.config, bindings + args.bind, run_dir)
    print(f"trained {steps} steps (upcycled from {args.dit}) -> {run_dir}")


def sample(args) -> None:
    from .config import scoped
    from .engine import run_objective
    from .errors import UserError
    from .runs import load_run
    from .sampling import check_sampler, generate, save_samples

    out = Path(args.out or Path(args.run_dir) / "samples")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    settings = {"num_samples": args.num_samples, "sampler": args.sampler, "num_steps": args.steps,
                "cfg_scale": args.cfg_scale, "seed": args.seed, "objective": run_objective(args.run_dir)}
    bindings = [f"generate.{k} = {v!r}" for k, v in settings.items() if v is not None] + args.bind
    with scoped([], bindings):
        check_sampler()  # before any weights are read
    model = load_run(args.run_dir, weights=args.weights, bindings=args.bind)  # e.g. reducers
    with scoped([], bindings):
        result = generate(model, progress=True)
    files = save_samples(result.images, out)
    print(json.dumps({**files, "nfe": result.nfe, "num_samples": len(result.images)}))


def plugins(args) -> None:
    from .registry import ALL

    for kind, registry in ALL.items():
        print(f"{kind}: {', '.join(registry.names()) or '(none)'}")


def quickstart(args) -> None:
    from .quickstart import quickstart as run
    from .sweeps.grid import resumable

    bindings = [*args.bind, *([f"train.steps = {args.steps}"] if args.steps else [])]
    with resumable(args.out):
        summary = run(args.out, args.jobs, args.executor, bindings)
    print(f"report: {summary['report']} (and report.html, results.csv, figures/ beside it)")


def sweep(args) -> None:
    from .sweeps.cell import cell_dir, cell_status
    from .sweeps.executors import ExecutorConfig
    from .sweeps.grid import parse_shard, resumable, run_sweep, shard_cells
    from .sweeps.spec import load_sweep

    spec = load_sweep(args.sweep_file, args.bind)
    slurm = {k: v for k, v in (("partition", args.partition), ("gpus_per_node", args.gpus), ("time", args.time))
             if v is not None}
    shard = parse_shard(args.shard)
    if args.dry_run:
        for c in shard_cells(spec.cells, shard):
            print(f"{c.cell_id}  train {c.train_id}  {cell_status(cell_dir(args.out, c.cell_id)):8s}  {c.label}")
        return
    with resumable(args.out):
        summary = run_sweep(args.sweep_file, args.out, ExecutorConfig(args.executor, args.jobs, slurm), shard,
                            args.retry_failed, progress=not args.no_progress, sweep=spec, threads=args.threads)
    print(json.dumps(summary))
    if summary.get("failed"):
        raise SystemExit(1)


def report(args) -> None:
    from .sweeps.report import write_report

    print(write_report(args.sweep_dir, args.to))


def bench(args) -> None:
    import torch

    from .bench import CASES, DEVICE, parse_case_args, run_cases
    from .errors import UserError
    from .registry import load_plugins

    if args.list:
        load_plugins()
        print("\n".join(sorted(CASES)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("bench --device cuda: no CUDA device is available")
    DEVICE["name"] = args.device
    df = run_cases(args.cases or None, args.warmup, args.repeats, args.out, args.threads, parse_case_args(args.arg))
    if df.empty:
        print("no pairs to time on this device (e.g. a CUDA-only comparison on the CPU)")
        return
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(df.drop(columns=["target"]).round(3).to_string(index=False))
    print(f"wrote {args.out}")


def flops(args) -> None:
    from .config import build_model
    from .flops import count_forward, measurement_inputs
    from .trajectory import count_trajectory

    model, root = build_model(args.config, [*args.bindings, *args.bind])
    static = not model.tokenizer.budget_keys and not len(model.reducers)
    n = args.samples or (1 if static else 8)
    fwd = count_forward(model, *measurement_inputs(model, n, args.seed, root), time_repeats=args.repeats)
    out = {"config": args.config, **fwd.to_dict()}
    traj = None
    if args.trajectory:
        traj, _ = count_trajectory(model, args.images, args.sampler, args.steps, args.cfg_scale, seed=args.seed)
        out["trajectory"] = {"sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg_scale,
                             **traj.to_dict()}
    if fwd.unsupported_ops:
        print(f"warning: operators without a MAC handle (counted as 0): {fwd.unsupported_ops}", file=sys.stderr)
    if args.json:
        print(json.dumps(out, default=float))
        return
    print(f"{args.config}: {out['useful_macs'] / 1e9:.3f} GMACs useful, {out['executed_macs'] / 1e9:.3f} GMACs "
          f"executed, {out['flops'] / 1e9:.3f} GFLOPs (= 2 x MACs) per image per forward; "
          f"{fwd.params / 1e6:.2f} M params; mean tokens/sample {sum(fwd.tokens_per_sample) / n:.1f} over {n} inputs"
          + (f"; {out['wall_ms_per_forward']:.1f} ms/image forward" if fwd.wall_ms else ""))
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(fwd.table().round(4).to_string(index=False))
        if traj is not None:
            print(f"trajectory ({args.sampler}, {args.steps} steps, cfg {args.cfg_scale}): NFE {traj.nfe} model calls, "
                  f"{traj.backbone_evaluations} backbone evaluations, "
                  f"{traj.useful_macs_per_image / 1e9:.2f} GMACs = {traj.flops_per_image / 1e12:.4f} TFLOPs per image")
            print(traj.steps.round(4).to_string(index=False, max_rows=20))


def match(args) -> None:
    from .matching import match_table, run_match

    out = run_match(args)
    if args.json:
        print(json.dumps(out, default=float))
        return
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        print(match_table(out).round(3).to_string(index=False))
    if out["source"]["note"]:
        print(f"note: {out['source']['note']}")
    for label in ("iso_flop", "iso_param"):
        m = out[label]
        print(f"{label}: matched {m['matched_on']} by {m['by']}, error {100 * m['error']:+.2f}% "
              f"({'within' if m['within_tol'] else 'NOT within'} {100 * out['tol']:.0f}%)")
    if "compute_matched" in out:
        c = out["compute_matched"]
        print(f"compute-matched steps: S_DC = {c['S_warm']:.0f} + ({c['S_DiT']:.0f} x {c['F_DiT'] / 1e9:.3f} - "
              f"{c['S_warm']:.0f} x {c['F_0'] / 1e9:.3f}) / {c['F_mean'] / 1e9:.3f} = {c['S_DC']:.0f} "
              f"(GMACs per forward; reference {c['reference']})")


def views(args) -> None:
    from .runs import load_run
    from .views import write_views

    model = load_run(args.run_dir, weights=args.weights)
    files = write_views(model, args.out or Path(args.run_dir) / "views", args.num_samples, args.steps, args.sampler)
    print(json.dumps(files))


def eval(args) -> None:  # noqa: A001  (the command is called eval)
    from .errors import UserError
    from .evaluation.evaluate import evaluate_run

    if args.samples < 2 or args.heldout < 1:
        raise UserError(f"--samples must be >= 2 and --heldout >= 1, got {args.samples} and {args.heldout}")
    result = evaluate_run(args.run_dir, args.samples, args.sampler, args.steps, args.cfg_scale, args.seed,
                          args.heldout, tuple(args.features), args.weights, out=args.out, bindings=args.bind)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        if isinstance(value, dict):
            value = "  ".join(f"t={t}: {v:.4g}" if v is not None else f"t={t}: n/a" for t, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.4g}"
        print(f"{key:>38}  {value}")


def calibrate(args) -> None:
    from .registry import REDUCERS

    result = REDUCERS.get(args.reducer).calibrate(
        args.run_dir, out=args.out, sampler=args.sampler, num_steps=args.steps, num_samples=args.num_samples,
        cfg_scale=args.cfg_scale, seed=args.seed, weights=args.weights, bindings=args.bind,
        clip_denoised=True if args.clip_denoised else None)
    print(json.dumps(result))
