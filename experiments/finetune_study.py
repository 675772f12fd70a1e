"""The fine-tuning studies of issue 12 on the built-in data: DC-DiT upcycling and DyDiT.

    python experiments/finetune_study.py train [--only NAME ...] [--jobs 2]
    python experiments/finetune_study.py report [--out reports] [--images 4]

``train`` runs the trainings under ``runs/`` (each resumes if it exists; a job starts once the runs it
starts from are done): the DiT/2 to start from, the DC-DiT N = 4 from scratch, the DC-DiT upcycled from
the DiT with and without the distillation warm-up, DyDiT at λ = 0.7 / 0.5 fine-tuned from the DiT (and,
with ``--only``, from the DC-DiT), and the DiT continued for the same steps without DyDiT (a control).
Step counts are the experiment configs'. ``report`` writes ``reports/upcycling/`` and ``reports/dydit/``
(see finetune_report.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UP, DY = "runs/upcycling", "runs/dydit"

def bound(*bindings: str) -> list[str]:
    return [a for b in bindings for a in ("-b", b)]


def upcycled(name: str, config: str, *bindings: str) -> tuple[str, list[str], list[str]]:
    """A DC-DiT upcycled from the DiT/2 source with ``experiments/upcycling/<config>`` and extra bindings."""
    return f"{UP}/{name}", ["upcycle", f"{UP}/dit", f"experiments/upcycling/{config}", *bound(*bindings)], ["dit"]


POS1 = "tokenizers.dynamic_chunking.pos_scale = 1.0"
THIN, N44 = "upcycle_bridge_thin.gin", "tokenizers.dynamic_chunking.target_ratio = 4.4"
COUNT, D100 = "tokenizers.dynamic_chunking.bridge_fade = 'count'", "upcycling.distill_steps = 100"
RECIPES = {  # upcycled run -> (config, bindings)
    # pos_scale 1.0: the first upcycled runs, before tokens got the DiT's position code (upcycle.gin's 0.5)
    "upcycled": ("upcycle.gin", POS1),
    "upcycled_no_distill": ("upcycle_no_distill.gin", POS1),
    "upcycled_no_distill_block_lr1": ("upcycle_no_distill.gin", "upcycling.block_lr_scale = 1.0", POS1),
    "upcycled_block_lr1_distill_w0.1": ("upcycle.gin", "upcycling.block_lr_scale = 1.0",
                                        "upcycling.distill_weight = 0.1", POS1),
    "upcycled_pos": ("upcycle.gin",),
    "upcycled_pos_no_distill": ("upcycle_no_distill.gin", "upcycling.block_lr_scale = 1.0"),
    "upcycled_bridge": ("upcycle_bridge.gin",),
    "upcycled_bridge_anneal": ("upcycle_bridge.gin", "upcycling.prior_steps = 100"),
    "upcycled_bridge_anneal150": ("upcycle_bridge.gin", "upcycling.prior_steps = 150"),
    "upcycled_bridge_all_anneal": ("upcycle_bridge.gin", "upcycling.prior_steps = 100",
                                   "tokenizers.dynamic_chunking.bridge_start = 'all'"),
    "upcycled_bridge_anneal_distill": ("upcycle_bridge.gin", "upcycling.prior_steps = 100", D100),
    # the router thins the DiT's patch tokens (never adds one between them) once the prior has faded, towards
    # N = 5 (a fifth of the pixels: 80% of the patches, less backbone work than the from-scratch N = 4)
    "upcycled_bridge_thin": (THIN,),
    "upcycled_bridge_thin_distill": (THIN, D100),
    "upcycled_bridge_thin_anneal50": (THIN, "upcycling.prior_steps = 50"),
    # N = 4.4: 91% of the patches (the N = 5 runs drop too many at low noise, where samples get their detail)
    "upcycled_bridge_thin_n4.4": (THIN, N44),
    "upcycled_bridge_thin_n4.4_distill": (THIN, N44, D100),
    # distillation through all 200 steps: the DiT's block outputs anchor the backbone while the router thins
    "upcycled_bridge_thin_n4.4_distill200": (THIN, N44, "upcycling.distill_steps = 200"),
    "upcycled_bridge_thin_distill200": (THIN, "upcycling.distill_steps = 200"),
    # the prior fades in numbers: the dropped share of the patches grows linearly over the 100 steps
    "upcycled_bridge_thin_n4.4_count": (THIN, N44, COUNT),
    "upcycled_bridge_thin_n4.4_count_distill": (THIN, N44, COUNT, D100),
    # dropped patches predicted by the scaffold's decoder alone (not the DiT's prediction of a neighbour)
    "upcycled_bridge_thin_n4.4_count_scaffold": (THIN, N44, COUNT,
                                                 "tokenizers.dynamic_chunking.bridge_dropped = 'scaffold'"),
    # every patch kept at t >= 500, where the samples follow the loss (report: loss_vs_samples); thinned below
    "upcycled_bridge_thin_n4.4_count_distill_keep500": (THIN, N44, COUNT, D100,
                                                        "tokenizers.dynamic_chunking.bridge_keep_above = 500"),
    # the same recipe trained half and all of the from-scratch bar's 800 steps: does its fid_shapes catch up at all?
    "upcycled_bridge_thin_n4.4_count_distill_400": (THIN, N44, COUNT, D100, "train.steps = 400"),
    "upcycled_bridge_thin_n4.4_count_distill_800": (THIN, N44, COUNT, D100, "train.steps = 800"),
    "upcycled_bridge_thin_n4.4_count_400": (THIN, N44, COUNT, "train.steps = 400"),  # the same without distillation
    "upcycled_bridge_thin_n4.4_count_800": (THIN, N44, COUNT, "train.steps = 800"),
    # a second seed of one dynamic recipe (and of the bar below): how far apart do two trainings land?
    "upcycled_bridge_thin_n4.4_count_distill_seed1": (THIN, N44, COUNT, D100, "train.seed = 1"),
}
JOBS = {  # name -> (run directory, dyncompute arguments, runs it starts from)
    "dit": (f"{UP}/dit", ["train", "experiments/upcycling/dit.gin"], []),
    "dcdit_scratch": (f"{UP}/dcdit_scratch", ["train", "experiments/upcycling/dcdit_scratch.gin"], []),
    "dcdit_scratch_seed1": (f"{UP}/dcdit_scratch_seed1",
                            ["train", "experiments/upcycling/dcdit_scratch.gin", *bound("train.seed = 1")], []),
    **{name: upcycled(name, *recipe) for name, recipe in RECIPES.items()},
    "dit_dydit_0.7": (f"{DY}/dit_dydit_0.7", ["train", "experiments/dydit/dydit.gin", "-b",
                                              "reducers.dydit.target = 0.7"], ["dit"]),
    "dit_dydit_0.5": (f"{DY}/dit_dydit_0.5", ["train", "experiments/dydit/dydit.gin", "-b",
                                              "reducers.dydit.target = 0.5"], ["dit"]),
    "dit_continued": (f"{DY}/dit_continued", ["train", "experiments/dydit/dit_continued.gin"], ["dit"]),
    "dcdit_dydit_0.7": (f"{DY}/dcdit_dydit_0.7", ["train", "experiments/dydit/dcdit_dydit.gin", "-b",
                                                  "reducers.dydit.target = 0.7"], ["dcdit_scratch"]),
    "dcdit_dydit_0.5": (f"{DY}/dcdit_dydit_0.5", ["train", "experiments/dydit/dcdit_dydit.gin", "-b",
                                                  "reducers.dydit.target = 0.5"], ["dcdit_scratch"]),
}
# the from-scratch bar trained on (its lr is constant after warm-up): a copy of the shorter run's directory resumes
# with more steps, so each length is one trajectory and keeps its own eval/
CONTINUED = {"dcdit_scratch_1600": ("dcdit_scratch", 1600), "dcdit_scratch_3200": ("dcdit_scratch_1600", 3200)}
for _name, (_source, _steps) in CONTINUED.items():
    JOBS[_name] = (f"{UP}/{_name}", [*JOBS[_source][1], *bound(f"train.steps = {_steps}")], [_source])
DEFAULT = ["dit", "dcdit_scratch", "upcycled", "upcycled_no_distill", "upcycled_no_distill_block_lr1",
           "upcycled_block_lr1_distill_w0.1", "dit_dydit_0.7", "dit_dydit_0.5", "dit_continued"]


def run(name: str, extra: list[str]) -> bool:
    run_dir, args, _ = JOBS[name]
    if name in CONTINUED and not (ROOT / run_dir).exists():  # resume a copy of the shorter run (not its eval)
        shutil.copytree(ROOT / JOBS[CONTINUED[name][0]][0], ROOT / run_dir, ignore=shutil.ignore_patterns("eval"))
    Path(ROOT / run_dir).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dyncompute.cli", *args, "--run-dir", run_dir, "-b", "train.progress = False",
           *[a for b in extra for a in ("-b", b)]]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.time()
    with open(ROOT / run_dir / "log.txt", "a") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    print(f"{name}: {'ok' if rc == 0 else f'failed ({rc})'} in {time.time() - t0:.0f} s", flush=True)
    return rc == 0


def train(names: list[str], workers: int, extra: list[str]) -> None:
    """Run each job once the runs it starts from are done (or were done before); failures skip dependants."""
    status = {n: True for n in JOBS if n not in names}  # not asked for: assumed trained already
    pending, futures = list(names), {}
    with ThreadPoolExecutor(workers) as pool:
        while pending or futures:
            for name in [n for n in pending if all(d in status for d in JOBS[n][2])]:
                pending.remove(name)
                if all(status[d] for d in JOBS[name][2]):
                    futures[name] = pool.submit(run, name, extra)
                else:
                    status[name] = False
            for name in [n for n, f in futures.items() if f.done()]:
                status[name] = futures.pop(name).result()
            time.sleep(1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["train", "report"])
    p.add_argument("--only", nargs="+", choices=list(JOBS), help="jobs to run (default: all but DC-DiT + DyDiT)")
    p.add_argument("--jobs", type=int, default=2, help="trainings at once")
    p.add_argument("--bind", "-b", action="append", default=[], help="extra gin binding for every job")
    p.add_argument("--out", default="reports")
    p.add_argument("--images", type=int, default=4, help="images sampled per model for the MACs trajectory")
    args = p.parse_args(argv)
    if args.command == "train":
        train(args.only or DEFAULT, args.jobs, args.bind)
    else:
        sys.path.insert(0, str(ROOT / "experiments"))
        from finetune_report import write_reports

        write_reports(ROOT, Path(args.out), args.images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
