"""The ``dyncompute`` command line: argument parsing only.

Parsing imports no torch, so ``dyncompute --help`` answers at once; each command's handler lives in
:mod:`dyncompute.commands` and is imported only when the command runs.
"""
from __future__ import annotations

import argparse
import sys
import traceback


def _train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a gin config (resumes an existing run dir)")
    p.add_argument("config", help="gin file")
    p.add_argument("--run-dir", help="output directory (default runs/<config name>)")
    p.add_argument("--bind", "-b", action="append", default=[], help="extra gin binding, repeatable")
    p.add_argument("--backend", choices=["nccl", "gloo"], help="ignite.distributed backend (default: one process)")
    p.add_argument("--nproc-per-node", type=int, help="processes to spawn on this node (with --backend)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="go on from the run directory's checkpoint although the config differs from its config.gin "
                   "(without it only train.steps may grow)")


def _upcycle(sub) -> None:
    p = sub.add_parser("upcycle", help="train a DC-DiT upcycled from a DiT (its blocks and embedders), resumable")
    p.add_argument("dit", help="the DiT: a run directory of ours or an original DiT .pt file")
    p.add_argument("config", help="gin file of the DC-DiT (tokenizer dynamic_chunking, the DiT's width and depth)")
    p.add_argument("--run-dir", help="output directory (default runs/<config name>)")
    p.add_argument("--distill-steps", type=int, help="steps of the distillation warm-up (default: the config's)")
    p.add_argument("--bind", "-b", action="append", default=[], help="extra gin binding, repeatable")


def _sample(sub) -> None:
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


def _plugins(sub) -> None:
    sub.add_parser("plugins", help="list the registered plugins of every kind")


def _quickstart(sub) -> None:
    p = sub.add_parser("quickstart", help="train, sample and report DiT/2, DC-DiT and its iso-FLOP DiT (a sweep)")
    p.add_argument("--out", default="reports/quickstart-run", help="sweep folder (default reports/quickstart-run, "
                   "ignored by git)")
    p.add_argument("--jobs", "-j", type=int, help="cells at once (default: min(3, cores))")
    p.add_argument("--executor", default="local", choices=["local", "debug"])
    p.add_argument("--steps", type=int, help="override every model's training steps")
    p.add_argument("--bind", "-b", action="append", default=[], help="extra binding for every cell")


def _sweep(sub) -> None:
    p = sub.add_parser("sweep", help="run or resume a gin sweep (grid of cells) and write its report")
    p.add_argument("sweep_file", help="sweep gin file (sweep.base, sweep.axes, ...)")
    p.add_argument("--out", required=True, help="sweep folder (cells/, runs/, results.csv, report.md)")
    p.add_argument("--executor", default="local", choices=["local", "slurm", "debug"])
    p.add_argument("--jobs", "-j", type=int, help="local: cells at once (default 1); slurm: array parallelism")
    p.add_argument("--shard", help="run shard i of n (1-based), e.g. 1/2: disjoint training runs")
    p.add_argument("--retry-failed", action="store_true", help="rerun the cells that failed before")
    p.add_argument("--partition", help="slurm partition")
    p.add_argument("--gpus", type=int, help="slurm: GPUs per cell (a cell with >1 trains with ignite.distributed)")
    p.add_argument("--time", type=int, help="slurm: time limit per cell in minutes")
    p.add_argument("--threads", type=int, help="torch threads per cell (default local: cores / jobs)")
    p.add_argument("--bind", "-b", action="append", default=[],
                   help="extra binding for every cell (after sweep.bindings)")
    p.add_argument("--dry-run", action="store_true", help="check and expand the sweep, print the cells, run nothing")
    p.add_argument("--no-progress", action="store_true")


def _report(sub) -> None:
    p = sub.add_parser("report", help="rebuild a sweep's results.csv, report.md/.html and figures from its files")
    p.add_argument("sweep_dir")
    p.add_argument("--to", help="write the report here instead (figures are copied; default: SWEEP_DIR)")


def _bench(sub) -> None:
    p = sub.add_parser("bench", help="run benchmark cases (each timed against its reference)")
    p.add_argument("cases", nargs="*", help="case names (default: all)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: CUDA when available")
    p.add_argument("--arg", "-a", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword for the case builders that take it (e.g. batch=64, compile=True), repeatable")
    p.add_argument("--out", default="reports/bench/bench.csv")
    p.add_argument("--list", action="store_true", help="list the case names")


def _config_arguments(p, what: str = "gin file") -> None:
    p.add_argument("config", help=what)
    p.add_argument("bindings", nargs="*", help="extra gin bindings")
    p.add_argument("--bind", "-b", action="append", default=[], help="extra gin binding, repeatable")


def _flops(sub) -> None:
    p = sub.add_parser("flops", help="exact MACs/FLOPs per forward (useful, executed, by component) and per image")
    _config_arguments(p)
    p.add_argument("--samples", type=int, help="measured inputs (default: 1 when the tokenizer takes no budget "
                   "keywords and there are no reducers, else 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed forwards for the wall-clock (0: none)")
    p.add_argument("--trajectory", action="store_true", help="also count a whole sampling trajectory")
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--images", type=int, default=2, help="images sampled for the trajectory count")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _match(sub) -> None:
    p = sub.add_parser("match", help="iso-FLOP / iso-param DiT baselines of a config, compute-matched steps")
    _config_arguments(p, "gin file of the model to match")
    p.add_argument("--patch-size", type=int, default=2, help="patch size of the DiT baselines")
    p.add_argument("--by", choices=["auto", "depth", "width"], default="auto",
                   help="choose the depth (same width), the width (fixed depth), or depth then width")
    p.add_argument("--depth", type=int, help="fixed depth for --by width (default: the config's)")
    p.add_argument("--tol", type=float, default=0.02)
    p.add_argument("--samples", type=int, default=8, help="real inputs the MACs are measured on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="weights for the measured model (run dir or checkpoint file)")
    p.add_argument("--backbone-tokens", type=int, help="count the backbone at this many tokens per sample")
    p.add_argument("--dit-steps", type=float, help="S_DiT: also report the compute-matched training length")
    p.add_argument("--warm-steps", type=float, default=0.0, help="S_warm: warm-up steps at the first budget")
    p.add_argument("--budgets", help="comma-separated budget values (default: the tokenizer's budget set)")
    p.add_argument("--budget-key", help="budget keyword (default: the tokenizer's first)")
    p.add_argument("--json", action="store_true")


def _calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="fit a reducer's settings to a trained run (TeaCache's polynomial), as gin")
    p.add_argument("reducer", help="a registered reducer (teacache)")
    p.add_argument("run_dir")
    p.add_argument("--out", help="gin file to write (default RUN_DIR/<reducer>.gin)")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50, help="sampling steps of the calibration trajectories")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--clip-denoised", action="store_true", help="clip x0 to [-1, 1] (pixel data), as sampling does")
    p.add_argument("--bind", "-b", action="append", default=[], help="extra gin binding for the model, repeatable")


def _views(sub) -> None:
    p = sub.add_parser("views", help="boundary maps and tokens kept vs timestep over a sampling trajectory")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output folder (default RUN_DIR/views)")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--weights", default="ema", help="ema or model")


def _eval(sub) -> None:
    p = sub.add_parser("eval", help="sample quality (fid_shapes, is_shapes, cas), held-out loss, router diagnostics")
    p.add_argument("run_dir")
    p.add_argument("--samples", type=int, default=256, help="generated (and real reference) images")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--steps", type=int, default=250, help="sampling steps")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", type=int, default=128, help="held-out images for the loss and router metrics")
    p.add_argument("--features", nargs="+", default=["shapes_classifier"], help="registered feature extractors")
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--out", help="output folder (default RUN_DIR/eval)")
    p.add_argument("--bind", "-b", action="append", default=[], help="extra gin binding, repeatable")


COMMANDS = [_train, _upcycle, _sample, _plugins, _quickstart, _sweep, _report, _bench, _flops, _match, _views, _eval,
            _calibrate]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dyncompute", description="A research framework for dynamic-compute "
                                     "diffusion transformers: train, sample, count and compare.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    """Run a command. A user error prints one line and returns its status (2: bad input, 3: diverged);
    ``--debug`` adds the traceback. Any other exception is a bug and propagates with its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    from . import commands
    from .errors import DyncomputeError, one_line, quiet_libraries
    from .processes import tune_allocator

    quiet_libraries()
    tune_allocator()

    try:
        getattr(commands, args.command)(args)
    except (DyncomputeError, FileNotFoundError) as e:  # a missing file is named by its message
        if debug:
            traceback.print_exc()
        print(f"dyncompute {args.command}: error: {one_line(e)}", file=sys.stderr)
        return getattr(e, "exit_status", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
