"""One sweep cell: train (or reuse the trained checkpoint) -> evaluate -> count compute -> one result row.

A sweep folder::

    sweep.json                  the expanded grid (written by the runner)
    runs/<train_id>/            one training run per training identity: training.gin, checkpoints/,
                                metrics.csv, operative_config.gin, trained.json (written when done),
                                reference/ (cached reference samples)
    cells/<cell_id>/            cell.json (what to run), config.gin (the cell's resolved gin), cell.log,
                                operative_config.gin, samples.png/.npz, views/, and last, atomically,
                                result.json (finished) or error.json (failed, with the traceback)

`run_cell` is what an executor runs (in a fresh process for ``local`` and ``slurm``); it never
raises for a failure inside the cell: it records it in error.json and returns it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import traceback
from pathlib import Path

import gin
import pandas as pd
import torch

from ..config import scoped
from ..io import atomic_save, atomic_write_text, load_checkpoint
from ..sampling import generate, save_samples
from .compute import count_compute, timed_samples
from .evaluate import CellSettings, evaluate_cell
from .spec import Cell, identity

log = logging.getLogger(__name__)
CELLS, RUNS = "cells", "runs"
RESULT, ERROR, CLAIM, TRAINED = "result.json", "error.json", "running.json", "trained.json"


def cell_dir(root: str | Path, cell_id: str) -> Path:
    return Path(root) / CELLS / cell_id


def run_dir(root: str | Path, train_id: str) -> Path:
    return Path(root) / RUNS / train_id


def write_json(obj, path: Path) -> Path:
    return atomic_write_text(json.dumps(obj, indent=1, default=_jsonable), path)


def _jsonable(v):
    if isinstance(v, (Path, torch.device)):
        return str(v)
    if hasattr(v, "item"):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def prepare(root: str | Path, sweep_name: str, cell: Cell, threads: int | None = None,
            nproc_per_node: int = 1, backend: str | None = None) -> Path:
    """Write what a cell needs to run (cell.json, config.gin; its run's training.gin) before submitting."""
    cdir, run = cell_dir(root, cell.cell_id), run_dir(root, cell.train_id)
    spec = {"sweep": sweep_name, "cell_id": cell.cell_id, "train_id": cell.train_id, "labels": cell.labels,
            "label": cell.label, "training": list(cell.training), "sampling": list(cell.sampling),
            "reference": list(cell.reference), "run_dir": f"{RUNS}/{cell.train_id}", "threads": threads,
            "nproc_per_node": nproc_per_node, "backend": backend,
            "calibrate": {r: json.loads(a) for r, a in cell.calibrate}, "reference_is_self": cell.reference_is_self}
    write_json(spec, cdir / "cell.json")
    atomic_write_text(cell.config, cdir / "config.gin")
    if not (run / "training.gin").is_file():
        atomic_write_text(cell.training_config, run / "training.gin")
    return cdir


def run_cell(path: str) -> dict:
    """Run the cell in folder ``path``; returns ``{"cell_id", "status": "finished"|"failed", ...}``."""
    from ..processes import tune_allocator

    tune_allocator()  # a cell process samples in loops like the CLI's
    cdir = Path(path)
    spec = json.loads((cdir / "cell.json").read_text())
    root, t0, cpu0, stage = cdir.parent.parent, time.perf_counter(), time.process_time(), "train"
    write_json({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}, cdir / CLAIM)
    try:
        with _cell_log(cdir / "cell.log"), _threads(spec.get("threads")):
            log.info("cell %s (%s) starts", spec["cell_id"], spec["label"])
            run = root / spec["run_dir"]
            training = ensure_trained(run, spec.get("nproc_per_node") or 1, spec.get("backend"))
            stage = "evaluate"
            result = _evaluate(cdir, run, spec, root)
        # CPU seconds of this process (all its threads) beside wall seconds: shared machines inflate the latter
        result.update(training=training, cell_wall_s=time.perf_counter() - t0, cell_cpu_s=time.process_time() - cpu0)
        write_json({**_identity(spec), **result}, cdir / RESULT)  # last: its presence means finished
        (cdir / ERROR).unlink(missing_ok=True)
        return {"cell_id": spec["cell_id"], "status": "finished"}
    except Exception as e:  # noqa: BLE001 - a failed cell is recorded, the sweep goes on
        record_failure(cdir, spec, stage, f"{type(e).__name__}: {e}", traceback.format_exc())
        return {"cell_id": spec["cell_id"], "status": "failed", "stage": stage, "error": f"{type(e).__name__}: {e}"}
    finally:
        (cdir / CLAIM).unlink(missing_ok=True)


def record_failure(cdir: Path, spec: dict, stage: str, error: str, tb: str = "") -> None:
    write_json({**_identity(spec), "stage": stage, "error": error, "traceback": tb, "host": socket.gethostname(),
                "failed_at": time.time()}, cdir / ERROR)


def _identity(spec: dict) -> dict:
    keys = ("sweep", "cell_id", "train_id", "labels", "label")
    return {k: spec[k] for k in keys} | {"bindings": {k: spec[k] for k in ("training", "sampling", "reference")}}


# --------------------------------------------------------------------------- training


def ensure_trained(run: Path, nproc_per_node: int = 1, backend: str | None = None) -> dict:
    """Train the run (resuming any checkpoint) unless it finished; its summary, ``reused`` when it had."""
    marker = run / TRAINED
    if marker.is_file():
        return {**json.loads(marker.read_text()), "reused": True}
    from ..engine import launch, train

    if nproc_per_node > 1:  # a multi-process cell: ignite.distributed spawns the workers
        launch(str(run / "training.gin"), [], str(run), backend=backend or "nccl", nproc_per_node=nproc_per_node)
    else:
        with scoped([run / "training.gin"]):
            train(run, progress=False)
    summary = training_summary(run)
    write_json(summary, marker)
    return {**summary, "reused": False}


def training_summary(run: Path) -> dict:
    m = pd.read_csv(run / "metrics.csv")
    k = max(1, len(m) // 10)
    out = {"run_dir": f"{RUNS}/{run.name}", "metrics_csv": f"{RUNS}/{run.name}/metrics.csv",
           "steps": int(m["step"].iloc[-1]), "train_wall_s": float(m["seconds"].iloc[-1]),
           "train_loss_last_10%": float(m["loss"].iloc[-k:].mean())}
    if "tokens_per_sample" in m:
        out["train_tokens_per_sample"] = float(m["tokens_per_sample"].iloc[-k:].mean())
    return out


def load_trained(run: Path):
    """The trained run's EMA weights in the model the active gin config builds (reducers attached)."""
    from ..model import DiffusionTransformer
    from ..runs import latest_checkpoint

    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {run}/checkpoints")
    model = DiffusionTransformer()
    missing, unexpected = model.load_state_dict(load_checkpoint(ckpt)["ema"], strict=False)
    misfit = [k for k in missing if not k.startswith("reducers.")] + list(unexpected)
    if misfit:
        raise RuntimeError(f"checkpoint {ckpt} does not fit the cell's model: {misfit[:5]}")
    return model.eval().to(_device())


def _device() -> torch.device:
    from ..runs import resolve_device

    return resolve_device("auto")


# --------------------------------------------------------------------------- evaluation + compute


def _evaluate(cdir: Path, run: Path, spec: dict, root: Path) -> dict:
    with scoped([cdir / "config.gin"]):
        settings = CellSettings()
    itself = spec.get("reference_is_self", False)
    reference = reference_samples(run, spec["reference"], settings) if spec["reference"] and not itself else None
    with scoped([cdir / "config.gin", *calibrations(run, spec.get("calibrate", {}))]):
        model = load_trained(run)
        budget = sampling_budget(model)
        timed = timed_samples(model, settings.num_samples, settings.seed)
        if itself:  # this cell is the reference configuration: its samples are the reference (and cached as such)
            reference = reference_samples(run, spec["reference"], settings, timed.samples.images)
        evaluation = evaluate_cell(model, timed.samples, settings, budget, reference)
        compute = count_compute(model, timed, settings.count_images, settings.seed)
        files = _write_figures(model, timed.samples, cdir, root, run, settings, budget)
        atomic_write_text(gin.operative_config_str(), cdir / "operative_config.gin")
    return {"metrics": evaluation.metrics, "metric_goals": evaluation.goals,
            "metric_descriptions": evaluation.descriptions, "compute": compute["columns"],
            "compute_details": compute["details"], "files": files, "budget": budget,
            "notes": evaluation.notes + compute["details"]["notes"]}


def calibrations(run: Path, wanted: dict) -> list[Path]:
    """The gin files of the reducers calibrated on the trained run (``sweep.calibrate``); cached per run."""
    from ..registry import REDUCERS

    files = []
    for name, kwargs in wanted.items():
        path = run / "calibration" / f"{name}-{identity(json.dumps(kwargs, sort_keys=True))}.gin"
        if not path.is_file():
            REDUCERS.get(name).calibrate(str(run), out=str(path), **kwargs)
        files.append(path)
    return files


def sampling_budget(model) -> dict:
    """The budget keywords (e.g. DC-DiT's ``tail_drop``) the cell binds on ``generate``."""
    keys = model.tokenizer.budget_keys
    return {k: v for k, v in gin.get_bindings("generate").items() if k in keys}


def reference_samples(run: Path, bindings: list[str], settings: CellSettings, images=None) -> torch.Tensor:
    """Samples of the trained model under the reference settings, same noise and labels; cached per run
    (``images``: a cell's own samples under exactly those settings)."""
    key = identity(*bindings, f"n={settings.num_samples}", f"seed={settings.seed}")
    path = run / "reference" / f"{key}.pt"
    if path.is_file():
        return load_checkpoint(path)["images"]
    if images is None:
        with scoped([run / "training.gin"], bindings):
            model = load_trained(run)
            images = generate(model, num_samples=settings.num_samples, batch_size=settings.num_samples,
                              seed=settings.seed, device=str(_device())).images
    images = images.cpu()
    atomic_save({"images": images, "bindings": bindings}, path)
    return images


def _write_figures(model, samples, cdir: Path, root: Path, run: Path, settings: CellSettings, budget: dict) -> dict:
    def rel(p) -> str:
        return Path(p).resolve().relative_to(root.resolve()).as_posix()

    files = {k: rel(v) for k, v in save_samples(samples.images, cdir, name="samples", grid_images=32).items()}
    if model.tokenizer.dynamic_tokens:  # data-dependent tokens: where they go along a trajectory
        views = tokenizer_views(run, settings, budget)
        files.update(boundary_maps=rel(views["boundary_maps"]), kept_vs_timestep=rel(views["table"]))
    return files


def tokenizer_views(run: Path, settings: CellSettings, budget: dict) -> dict:
    """Boundary maps and tokens kept vs timestep of the trained tokenizer at a budget (DDIM, no reducers:
    they depend on the tokenizer alone); cached per run and budget, so sampling axes share them."""
    from ..views import write_views

    key = identity(json.dumps(budget, sort_keys=True), f"n={settings.views_samples}", f"steps={settings.views_steps}")
    folder = run / "views" / key
    if (folder / "boundary_maps.png").is_file() and (folder / "kept_vs_timestep.csv").is_file():
        return {"boundary_maps": folder / "boundary_maps.png", "table": folder / "kept_vs_timestep.csv"}
    with scoped([run / "training.gin"]):
        model = load_trained(run)
        return write_views(model, folder, settings.views_samples, settings.views_steps, **budget)


# --------------------------------------------------------------------------- process plumbing


@contextlib.contextmanager
def _cell_log(path: Path):
    """The cell's prints, warnings and log records go to its own file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        level = root.level
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.getLogger("ignite").setLevel(logging.WARNING)
        try:
            yield
        finally:
            root.removeHandler(handler)
            root.setLevel(level)


@contextlib.contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cell_status(cdir: Path) -> str:
    """finished | failed | running (claimed by a live process on this host) | pending."""
    if (cdir / RESULT).is_file():
        return "finished"
    if (cdir / ERROR).is_file():
        return "failed"
    claim = cdir / CLAIM
    if claim.is_file():
        try:
            c = json.loads(claim.read_text())
            if c["host"] == socket.gethostname() and c["pid"] != os.getpid():
                os.kill(int(c["pid"]), 0)
                return "running"
        except (OSError, ValueError, KeyError):
            pass  # a stale claim: the process that wrote it is gone
    return "pending"
