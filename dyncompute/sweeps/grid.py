"""The sweep runner: an ignite `Engine` whose iterations are finished cells.

The engine's data is a `Scheduler`: it submits cells to a submitit executor (at most K at once
locally), holds back a cell whose training run another running cell is producing, and yields each
cell's `Outcome` as it ends. Per outcome the engine fires ``CellEvents.CELL_FINISHED`` or
``CELL_FAILED``; handlers refresh the report and keep one live progress line (ignite's
`ProgressBar`: done / total, running, failed, ETA).

Resuming is by the files alone: a cell with result.json is finished and skipped; one with error.json
failed and is rerun only with ``retry_failed``; any other cell (never run, or killed) runs.
``shard=(i, n)`` runs the cells of every n-th training run (sorted by identity), so shards never
train the same run and several machines can fill one folder.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from ignite.engine import Engine, EventEnum, Events
from ignite.handlers import ProgressBar

from ..errors import UserError
from ..io import atomic_write_text
from .cell import RESULT, TRAINED, cell_dir, cell_status, prepare, record_failure, run_dir
from .executors import CellExecutor, ExecutorConfig
from .report import shown_path
from .spec import Cell, Sweep, load_sweep

log = logging.getLogger(__name__)
MANIFEST = "sweep.json"


class CellEvents(EventEnum):
    CELL_FINISHED = "cell_finished"
    CELL_FAILED = "cell_failed"


@dataclass
class Outcome:
    cell: Cell
    status: str  # finished | failed
    error: str = ""
    stage: str = ""


class Scheduler:
    """Iterable of outcomes, one per cell, in the order cells end."""

    def __init__(self, root: Path, cells: list[Cell], executor: CellExecutor):
        self.root, self.executor = root, executor
        self.queue = deque(cells)
        self.running: dict = {}  # job -> cell
        self.training: set[str] = set()  # training runs a running cell is producing
        self.failed_training: dict[str, str] = {}
        self.ended: deque[Outcome] = deque()
        self.done = self.failed = 0
        self.on_change = lambda: None  # called after submissions and while waiting (the progress line)

    def counts(self) -> dict:
        return {"done": self.done, "running": len(self.running), "failed": self.failed}

    def __iter__(self):
        try:
            while self.queue or self.running or self.ended:
                if not self.ended:
                    self._submit_ready()
                outcome = self.ended.popleft() if self.ended else self._wait()
                self.done += outcome.status == "finished"
                self.failed += outcome.status == "failed"
                yield outcome
        finally:
            self.cancel()

    def _submit_ready(self) -> None:
        limit = self.executor.config.max_running
        free = len(self.queue) if limit is None else limit - len(self.running)
        batch = []
        for cell in list(self.queue):
            if len(batch) >= free:
                break
            tid = cell.train_id
            if tid in self.failed_training:
                self.queue.remove(cell)
                self.ended.append(self._skip(cell, self.failed_training[tid]))
                continue
            if not (run_dir(self.root, tid) / TRAINED).is_file():
                if tid in self.training:
                    continue  # another running cell trains it: reuse it when it is done
                self.training.add(tid)
            self.queue.remove(cell)
            batch.append(cell)
        if batch:
            jobs = self.executor.submit([cell_dir(self.root, c.cell_id) for c in batch])
            self.running.update(zip(jobs, batch))
            self.on_change()

    def _wait(self) -> Outcome:
        while True:
            for job, cell in list(self.running.items()):
                if job.done():
                    del self.running[job]
                    return self._ended(job, cell)
            time.sleep(self.executor.poll_s)
            self.on_change()  # keeps the progress line's clock moving

    def _ended(self, job, cell: Cell) -> Outcome:
        try:
            r = job.result()
            outcome = Outcome(cell, r["status"], r.get("error", ""), r.get("stage", ""))
        except Exception as e:  # noqa: BLE001 - the job itself died (killed, timed out, lost)
            first = (str(e).strip().splitlines() or [""])[0]
            outcome = Outcome(cell, "failed", f"job {job.job_id} ended without a result: {type(e).__name__}: {first}",
                              "job")
            record_failure(cell_dir(self.root, cell.cell_id), _spec(self.root, cell), "job", outcome.error, str(e))
        self.training.discard(cell.train_id)
        if outcome.status == "failed" and not (run_dir(self.root, cell.train_id) / TRAINED).is_file():
            self.failed_training[cell.train_id] = (f"not run: its training failed in cell {cell.label!r} "
                                                   f"({cell.cell_id}): {outcome.error}")
        return outcome

    def _skip(self, cell: Cell, message: str) -> Outcome:
        record_failure(cell_dir(self.root, cell.cell_id), _spec(self.root, cell), "train", message)
        return Outcome(cell, "failed", message, "train")

    def cancel(self) -> None:
        for job in self.running:
            try:
                job.cancel(check=False)
            except Exception as e:  # noqa: BLE001 - best effort on the way out
                log.warning("could not cancel job %s: %s", getattr(job, "job_id", "?"), e)
        self.running.clear()


def _spec(root: Path, cell: Cell) -> dict:
    return json.loads((cell_dir(root, cell.cell_id) / "cell.json").read_text())


# --------------------------------------------------------------------------- the engine


class GridProgressBar(ProgressBar):
    """ignite's ProgressBar, shown from the grid's start (not from the first ended cell) and refreshed
    while cells run: ``sweep NAME: 3/6 cells done, running=2, failed=0 |bar| [elapsed<ETA]``."""

    def __init__(self, name: str, scheduler: Scheduler):
        super().__init__(persist=True, desc=f"sweep {name}",
                         bar_format="{desc}{n_fmt}/{total_fmt} cells done{postfix} |{bar:20}| [{elapsed}<{remaining}]")
        self.scheduler = scheduler
        self._shown: dict | None = None

    def _reset(self, pbar_total: int | None) -> None:
        self.pbar = self.pbar_cls(total=pbar_total, leave=self.persist, bar_format=self.bar_format, **self.tqdm_kwargs)
        self.pbar.set_description(self.tqdm_kwargs["desc"])  # as ignite's handler will: "sweep NAME: "

    def attach_to_grid(self, engine: Engine) -> None:
        self.attach(engine, output_transform=lambda _: self._postfix())
        engine.add_event_handler(Events.STARTED, lambda e: self._reset(e.state.epoch_length))
        self.scheduler.on_change = self.refresh

    def _postfix(self) -> dict:
        c = self.scheduler.counts()
        return {"running": c["running"], "failed": c["failed"]}

    def refresh(self) -> None:
        """Redraw the line; into a log file (no terminal) only when the counts change."""
        if self.pbar is None:
            return
        postfix = self._postfix()
        if not sys.stderr.isatty() and postfix == self._shown:
            return
        self._shown = postfix
        self.pbar.set_postfix(postfix, refresh=False)
        self.pbar.refresh()


def create_grid_engine(scheduler: Scheduler, name: str, progress: bool = True) -> Engine:
    def process(engine: Engine, outcome: Outcome) -> Outcome:
        engine.fire_event(CellEvents.CELL_FINISHED if outcome.status == "finished" else CellEvents.CELL_FAILED)
        return outcome

    engine = Engine(process)
    engine.register_events(*CellEvents)
    if progress:
        bar = GridProgressBar(name, scheduler)
        bar.attach_to_grid(engine)

        @engine.on(CellEvents.CELL_FAILED)
        def _say_failed(engine: Engine) -> None:
            o = engine.state.batch  # the outcome being processed
            bar.log_message(f"cell failed: {o.cell.label} ({o.cell.cell_id}), {o.stage}: {o.error}")
    return engine


class ReportRefresher:
    """Rebuilds the report as results arrive: results.csv every cell, pages and figures at most every ``every_s``."""

    def __init__(self, root: Path, every_s: float = 60.0):
        self.root, self.every_s, self.last = root, every_s, time.monotonic()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(CellEvents.CELL_FINISHED, self.refresh)

    def refresh(self, engine: Engine | None = None) -> None:
        from .report import write_report

        full = time.monotonic() - self.last >= self.every_s
        try:
            write_report(self.root, figures=full)
        except Exception as e:  # noqa: BLE001 - a report problem must not stop the grid
            log.warning("report refresh failed: %s: %s", type(e).__name__, e)
        if full:
            self.last = time.monotonic()


# --------------------------------------------------------------------------- the runner


def run_sweep(path: str | Path, out: str | Path, executor: ExecutorConfig | None = None,
              shard: tuple[int, int] | None = None, retry_failed: bool = False, progress: bool = True,
              report: bool = True, report_every_s: float = 60.0, sweep: Sweep | None = None,
              threads: int | None = None) -> dict:
    """Run (or resume) a sweep into ``out``; returns counts. Every check runs before any cell."""
    sweep = sweep or load_sweep(path)
    executor = executor or ExecutorConfig()
    if executor.kind == "slurm":
        executor.slurm = {**sweep.slurm, **executor.slurm}
    root = Path(out)
    write_manifest(root, sweep)
    mine = shard_cells(sweep.cells, shard)
    status = {c.cell_id: cell_status(cell_dir(root, c.cell_id)) for c in mine}
    wanted = {"pending", "failed"} if retry_failed else {"pending"}
    todo = training_first([c for c in mine if status[c.cell_id] in wanted])
    if threads is None and executor.kind == "local":  # K cells share the cores (oversubscribed OpenMP crawls)
        threads = max(1, (os.cpu_count() or 1) // (executor.jobs or 1))
    gpus = executor.gpus_per_cell
    for c in todo:
        prepare(root, sweep.name, c, threads=threads, nproc_per_node=max(1, gpus),
                backend="nccl" if gpus > 1 else None)
    counts = {s: sum(v == s for v in status.values()) for s in ("finished", "failed", "running", "pending")}
    summary = {"cells": len(sweep.cells), "this_shard": len(mine), "to_run": len(todo), "before": counts}
    if todo:
        # submitit names its files by job id (a PID locally): one folder per runner, so shards never collide
        jobs_dir = root / "submitit" / f"{socket.gethostname()}-{os.getpid()}"
        scheduler = Scheduler(root, todo, CellExecutor(executor, jobs_dir))
        engine = create_grid_engine(scheduler, sweep.name, progress)
        ReportRefresher(root, report_every_s if report else float("inf")).attach(engine)
        engine.run(scheduler, max_epochs=1, epoch_length=len(todo))
        summary.update(scheduler.counts())
    from .report import write_report

    summary["report"] = str(write_report(root, figures=report))  # results.csv always; pages when ``report``
    return summary


def training_first(cells: list[Cell]) -> list[Cell]:
    """One cell of every training run first (so trainings start in parallel), then the rest, grid order."""
    seen, first, rest = set(), [], []
    for c in cells:
        (rest if c.train_id in seen else first).append(c)
        seen.add(c.train_id)
    return first + rest


def shard_cells(cells: list[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """Shard i of n (1-based): the cells of the training runs at sorted positions i-1, i-1+n, ..."""
    if shard is None:
        return list(cells)
    i, n = shard
    if not (n >= 1 and 1 <= i <= n):
        raise UserError(f"--shard {i}/{n}: expected i/n with 1 <= i <= n")
    train_ids = sorted({c.train_id for c in cells})
    mine = {t for k, t in enumerate(train_ids) if k % n == i - 1}
    return [c for c in cells if c.train_id in mine]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected i/n, e.g. 1/2") from None
    shard_cells([], (i, n))  # range check
    return i, n


def write_manifest(root: Path, sweep: Sweep) -> Path:
    """sweep.json: the expanded grid (identical for every shard), for reports and for reading."""
    manifest = {
        "name": sweep.name, "source": shown_path(sweep.source), "base": [shown_path(b) for b in sweep.base],
        "axes": {a: {label: list(b) for label, b in v.items()} for a, v in sweep.axes.items()},
        "bindings": list(sweep.bindings), "panels_by": sweep.panels_by,
        "seeds": sorted({c.labels.get("seed") for c in sweep.cells} - {None}),
        "cells": [{"cell_id": c.cell_id, "train_id": c.train_id, "labels": c.labels, "label": c.label}
                  for c in sweep.cells],
    }
    return atomic_write_text(json.dumps(manifest, indent=1), root / MANIFEST)



@contextlib.contextmanager
def resumable(out: str | Path):
    """Ctrl-C stops the sweep (running cells are cancelled) with one line on how to resume, exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        done = len(list(Path(out).glob(f"cells/*/{RESULT}")))
        print(f"\ninterrupted: {done} cells of {out} are finished; run the same command again to resume",
              file=sys.stderr)
        raise SystemExit(130) from None
