"""The ``dyncompute`` command line: train, sample, quickstart, bench, plugins, and plugin-provided views.

Modules in ``COMMAND_MODULES`` add their own sub-commands through ``register_cli(subparsers)``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

COMMAND_MODULES = [
    "dyncompute.quickstart",
    "dyncompute.bench",
    "dyncompute.flops",
    "dyncompute.matching",
    "dyncompute.views",
    "dyncompute.evaluation.evaluate",
]


def cmd_train(args) -> None:
    from .engine import launch

    run_dir = args.run_dir or default_run_dir(args.config)
    steps = launch(args.config, args.bind, run_dir, backend=args.backend, nproc_per_node=args.nproc_per_node)
    print(f"trained {steps} steps -> {run_dir}")


def cmd_sample(args) -> None:
    from .config import scoped
    from .sampling import generate, load_run, save_samples

    model = load_run(args.run_dir, weights=args.weights)
    bindings = [f"generate.{k} = {v!r}" for k, v in
                dict(num_samples=args.num_samples, sampler=args.sampler, num_steps=args.steps,
                     cfg_scale=args.cfg_scale, seed=args.seed).items() if v is not None]
    with scoped([], bindings + args.bind):
        result = generate(model, progress=True)
    files = save_samples(result.images, args.out or Path(args.run_dir) / "samples")
    print(json.dumps({**files, "nfe": result.nfe, "num_samples": len(result.images)}))


def cmd_plugins(args) -> None:
    from .registry import ALL

    for kind, registry in ALL.items():
        print(f"{kind}: {', '.join(registry.names()) or '(none)'}")


def default_run_dir(config: str) -> str:
    return str(Path("runs") / Path(config).stem)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dyncompute", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a gin config (resumes an existing run dir)")
    p.add_argument("config", help="gin file")
    p.add_argument("--run-dir", help="output directory (default runs/<config name>)")
    p.add_argument("--bind", "-b", action="append", default=[], help="extra gin binding, repeatable")
    p.add_argument("--backend", choices=["nccl", "gloo"], help="ignite.distributed backend (default: one process)")
    p.add_argument("--nproc-per-node", type=int, help="processes to spawn on this node (with --backend)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample a trained run: PNG grid + ADM-style .npz")
    p.add_argument("run_dir")
    p.add_argument("--num-samples", "-n", type=int)
    p.add_argument("--sampler", help="a registered sampler (ddpm, ddim, ode, ...)")
    p.add_argument("--steps", type=int, help="sampling steps")
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--out", help="output folder (default RUN_DIR/samples)")
    p.add_argument("--bind", "-b", action="append", default=[], help="extra gin binding, repeatable")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("plugins", help="list the registered plugins of every kind")
    p.set_defaults(func=cmd_plugins)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("ignite").setLevel(logging.WARNING)  # ignite narrates every launch at INFO
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError, TypeError, RuntimeError) as e:
        message = str(e).split("\n  In call to configurable")[0]  # gin appends its call context on new lines
        print(f"dyncompute {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
