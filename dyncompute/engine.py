"""Training with pytorch-ignite: trainer engine, EMA, atomic resumable checkpoints, metrics CSV.

A run directory (see :mod:`dyncompute.runs`) holds ``config.gin``, ``operative_config.gin``,
``checkpoints/``, ``metrics.csv`` and ``history.jsonl``. Calling ``train`` on a run directory that has
checkpoints resumes from the newest good one, exactly, on any number of processes. Every setting is
checked before anything is written; a changed config is refused; a non-finite loss stops the run
before it reaches the weights.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gin
import ignite.distributed as idist
import numpy as np
import pandas as pd
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, EMAHandler
from ignite.handlers.checkpoint import BaseSaveHandler
from tqdm.auto import tqdm

from . import processes
from .config import bound_arguments, scoped
from .diffusion import make_objective
from .errors import CheckpointError, ConfigError, Diverged, RunDirError, one_line
from .evaluation.heldout import attach_evaluator
from .finetune import LossTerm, TrainingExtension
from .io import atomic_save, atomic_write, atomic_write_text
from .model import DiffusionTransformer
from .observe import Evaluation, Observed
from .registry import DATASETS
from .runs import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    check_config_change,
    check_run_dir,
    checkpoint_step,
    checkpoints,
    clean_temp_files,
    config_changes,
    latest_checkpoint,
    load_good_checkpoint,
    non_finite,
    record,
    resolve_device,
    run_lock,
)
from .validate import check_data, check_model, check_processes, check_training

CHECKPOINT_KEYS = ("model", "ema", "optimizer", "trainer")
# Bindings a resumed run may change freely: they change how a run is watched and saved, not its numbers.
# Modules with such settings of their own (periodic evaluation, say) add theirs.
OPERATIONAL = {"train.progress", "train.num_workers", "train.log_every", "train.checkpoint_every",
               "train.keep_checkpoints"}


class SampleStream(torch.utils.data.Sampler):
    """An endless, resumable order of dataset indices.

    Pass e over the data is a permutation seeded by (seed, e); rank r of w takes its share of each
    global batch. Iteration starts at the position the trainer has reached, so a resumed run (even
    mid-pass) reads exactly the batches an uninterrupted run would have read.
    """

    def __init__(self, size: int, batch_size: int, seed: int, position, rank: int = 0, world: int = 1):
        self.size, self.batch, self.seed, self.position = size, batch_size, seed, position
        self.rank, self.world = rank, world

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def __iter__(self):
        j = self.position() * self.batch  # samples this rank has consumed
        epoch, perm = -1, None
        while True:
            g = (j // self.batch) * self.batch * self.world + self.rank * self.batch + j % self.batch
            if g // self.size != epoch:
                epoch = g // self.size
                perm = self._perm(epoch)
            yield int(perm[g % self.size])
            j += 1


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 64-bit seed mixed from (seed, rank, step) by numpy's SeedSequence: no two of them collide in practice."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0])


class StepSeed:
    """Seeds the global RNG (timesteps, noise, label dropout) at every step from (seed, rank, step).

    Each step's draws then depend on nothing that came before, so a run resumed on any number of
    processes draws exactly what an uninterrupted one would, with no random state to checkpoint.
    """

    def __init__(self, seed: int, rank: int = 0):
        self.seed, self.rank = seed, rank

    def __call__(self, engine: Engine) -> None:
        torch.manual_seed(step_seed(self.seed, self.rank, engine.state.iteration))


@dataclass
class TrainStep:
    """One optimisation step: diffusion loss + the auxiliary losses the forward reports (tokenizer's and
    reducers') + a fine-tuning recipe's loss terms, clipped gradients."""

    model: torch.nn.Module
    objective: object
    optimizer: torch.optim.Optimizer
    grad_clip: float
    device: torch.device
    amp: bool = False  # bfloat16 autocast (CUDA): no loss scaling needed
    loss_terms: Sequence[LossTerm] = ()

    def __call__(self, engine: Engine, batch: dict) -> dict:
        self.model.train()
        x = batch["x"].to(self.device, non_blocking=True)
        y = batch["y"].to(self.device, non_blocking=True)
        t = self.objective.sample_timesteps(x.shape[0], device=self.device)
        seen: list[Evaluation] = []
        budget = engine.state.budget  # this step's budget (`MultiBudget`)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            terms = self.objective.training_losses(Observed(self.model, [seen.append]), x, t,
                                                   model_kwargs={"y": y, **budget})
            info = seen[0].info
            aux = dict(info.aux_losses)
            for term in self.loss_terms:
                aux.update(term(seen[0], engine))
            loss = terms["loss"].mean() + sum(aux.values(), torch.zeros((), device=self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        stop_if_not_finite(engine.state.iteration, loss, grad_norm)
        self.optimizer.step()
        out = {"loss": loss.item(), "grad_norm": grad_norm.item()}
        out.update({k: v.mean().item() for k, v in terms.items() if k != "loss"})
        out.update({f"aux_{k}": v.item() for k, v in aux.items()})
        out["tokens_per_sample"] = sum(info.tokens_per_sample) / len(info.tokens_per_sample)
        out.update({k: float(v) for k, v in budget.items()})
        return out


def stop_if_not_finite(step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
    """Stop before a non-finite loss or gradient reaches the weights, on every process alike."""
    bad = (~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)).float().reshape(1)
    if idist.get_world_size() > 1:
        bad = idist.all_reduce(bad, op="MAX")
    if bad.item():
        raise Diverged(f"training diverged at step {step}: loss {loss.item():.4g}, gradient norm "
                       f"{grad_norm.item():.4g}; the step was not applied and no non-finite weights were saved; "
                       "lower train.lr, raise train.warmup_steps or check the data")


class MultiBudget:
    """Multi-budget training: each step's budget drawn from a set (e.g. DC-DiT's tail-drop fractions).

    The draw of step s is seeded by s alone, so every rank draws the same budget and a resumed run
    draws what an uninterrupted one would; the first ``warmup`` steps train at the default budget.
    """

    def __init__(self, budgets: tuple[dict, ...] = (), warmup: int = 0):
        self.budgets, self.warmup = tuple(budgets), warmup

    def draw(self, step: int) -> dict:
        if not self.budgets or step < self.warmup:
            return {}
        g = torch.Generator().manual_seed(step)
        return dict(self.budgets[int(torch.randint(len(self.budgets), (1,), generator=g))])

    def __call__(self, engine: Engine) -> None:
        engine.state.budget = self.draw(engine.state.iteration - 1)


def create_trainer(model, objective, optimizer, grad_clip: float = 1.0, device="cpu", amp: bool = False,
                   budgets: tuple[tuple[dict, ...], int] = ((), 0), seed: int | None = None,
                   loss_terms: Sequence[LossTerm] = ()) -> Engine:
    """The ignite trainer: one `TrainStep` per iteration (which stops on a non-finite loss), a per-step
    budget and, given a ``seed``, per-step seeding of the global RNG (`StepSeed`)."""
    trainer = Engine(TrainStep(model, objective, optimizer, grad_clip, torch.device(device), amp, tuple(loss_terms)))
    if seed is not None:
        trainer.add_event_handler(Events.ITERATION_STARTED, StepSeed(seed, idist.get_rank()))
    trainer.add_event_handler(Events.ITERATION_STARTED, MultiBudget(*budgets))
    return trainer


class MetricsLog:
    """Every step's metrics in ``metrics.csv``, appended every ``every`` steps and before each checkpoint
    (so the file always covers the newest checkpoint); a resume first cuts it back to the checkpoint."""

    def __init__(self, path: Path, every: int):
        self.path, self.every, self.pending, self.columns = path, every, [], None
        self._t0 = time.perf_counter()

    def resume(self, step: int) -> None:
        """Keep the rows up to ``step``; ``seconds`` keeps counting training time across restarts."""
        rows = read_metrics(self.path, step)
        if rows:
            frame = pd.DataFrame(rows)
            atomic_write(self.path, lambda tmp: frame.to_csv(tmp, index=False))
            self.columns = list(frame.columns)
            self._t0 = time.perf_counter() - rows[-1]["seconds"]
        else:
            self.path.unlink(missing_ok=True)

    def __call__(self, engine: Engine) -> None:
        step = engine.state.iteration
        self.pending.append({"step": step, **engine.state.output, "lr": engine.state.lr,
                             "seconds": time.perf_counter() - self._t0})
        if step % self.every == 0:
            self.flush()

    def flush(self) -> None:
        """Append the pending rows; rewrite the file (atomically) when a new column appears."""
        if not self.pending:
            return
        new = [k for row in self.pending for k in row if k not in (self.columns or [])]
        if self.columns is None or new:
            frame = pd.DataFrame((read_metrics(self.path) if self.columns else []) + self.pending)
            atomic_write(self.path, lambda tmp: frame.to_csv(tmp, index=False))
            self.columns = list(frame.columns)
        else:
            with open(self.path, "a") as f:
                pd.DataFrame(self.pending, columns=self.columns).to_csv(f, header=False, index=False)
        self.pending = []

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(read_metrics(self.path))


def read_metrics(path: Path, upto: int | None = None) -> list[dict]:
    """The rows of a metrics CSV with increasing steps up to ``upto``; a row a killed run left half-written
    is dropped."""
    try:
        records = pd.read_csv(path, on_bad_lines="skip").to_dict("records")
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return []
    rows, last = [], 0
    for row in records:
        step = row.get("step")
        if not isinstance(step, (int, float)) or not math.isfinite(step) or step <= last:
            continue
        if upto is not None and step > upto:
            break
        rows.append({**row, "step": int(step)})
        last = step
    return rows


class RunSaver(BaseSaveHandler):
    """Checkpoint files for ignite's `Checkpoint`: written atomically by rank 0, only with finite weights;
    then all but the newest ``keep`` checkpoints on disk are deleted (so the limit holds across restarts,
    and a file goes only once a newer one is complete). Other files are left alone."""

    def __init__(self, dirname: Path, keep: int):
        self.dirname, self.keep = Path(dirname), keep

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        for key in ("model", "ema"):
            if bad := non_finite(checkpoint[key]):
                raise Diverged(f"refusing to save {filename}: {len(bad)} non-finite {key} tensors (e.g. {bad[0]})")
        if idist.get_rank() == 0:
            atomic_save(checkpoint, self.dirname / filename)
            for old in checkpoints(self.dirname.parent)[:-self.keep]:
                old.unlink(missing_ok=True)

    def remove(self, filename: str) -> None:
        """Unused: retention is by what is on disk (see `__call__`)."""


@gin.configurable(denylist=["run_dir", "allow_config_change", "prepared"])
def train(
    run_dir: str | Path,
    dataset: str = "procedural",
    objective: str = "gaussian",
    steps: int = 1000,
    batch_size: int = 32,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    grad_clip: float = 1.0,
    ema_decay: float = 0.9999,
    checkpoint_every: int = 500,
    keep_checkpoints: int = 2,
    log_every: int = 10,
    seed: int = 0,
    num_workers: int = 0,
    device: str = "auto",
    progress: bool = True,
    allow_config_change: bool = False,
    prepared: bool = False,
    eval_every: int = 0,
    extension: TrainingExtension | None = None,
) -> dict:
    """Train ``DiffusionTransformer()`` (configured by gin) on a registered dataset; resumes if possible.

    Every setting is checked first and nothing is written when one is wrong. The run directory's config
    is fixed: a different one is refused unless it only extends ``steps`` (or changes `OPERATIONAL`
    bindings), or ``allow_config_change``. ``prepared``: a launcher has done the checks and holds the run
    directory (its worker processes pass it). ``keep_checkpoints``: how many newest checkpoints stay.
    ``extension``: a fine-tuning recipe (`finetune.TrainingExtension`, e.g. ``@fine_tune()``).
    """
    run_dir = Path(run_dir)
    settings = {k: v for k, v in locals().items() if k not in ("run_dir", "allow_config_change", "prepared")}
    if prepared:
        return _train(run_dir, settings)
    world = idist.get_world_size()
    data = check_run(run_dir, settings, world)
    holder = open_run(run_dir, gin.config_str(), allow_config_change, steps, processes=world,
                      backend=idist.backend()) if idist.get_rank() == 0 else contextlib.nullcontext()
    with holder:
        if world > 1:
            idist.barrier()  # the other ranks start once rank 0 holds the run directory
        return _train(run_dir, settings, data)


def check_run(run_dir: Path, settings: dict, world: int):
    """Everything checked before a run starts, nothing written: training settings, model, data, the
    run directory. Returns the dataset."""
    check_training(settings, world)
    model = check_model(bound_arguments(DiffusionTransformer, "DiffusionTransformer"))
    data = check_data(settings["dataset"], model)
    check_run_dir(run_dir)
    return data


@contextlib.contextmanager
def open_run(run_dir: Path, config_text: str, allow_config_change: bool, steps: int, **info):
    """Hold the run directory for a run: lock it, refuse a changed config, clean up after killed runs
    (temp files; bad checkpoints renamed aside), fix ``config.gin`` and record the start in the history;
    record how the run ended."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        changes = config_changes(run_dir, config_text)
        check_config_change(run_dir, changes, OPERATIONAL, "train.steps", allow_config_change)
        (run_dir / CHECKPOINT_DIR).mkdir(exist_ok=True)
        clean_temp_files(run_dir)
        try:
            path, state = load_good_checkpoint(run_dir, CHECKPOINT_KEYS, quarantine=True, mmap=True)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; move the checkpoints away (or use another --run-dir) to train from "
                                  "scratch") from e
        start = state["trainer"]["iteration"] if state else 0
        del state
        atomic_write_text(config_text, run_dir / CONFIG_FILE)
        record(run_dir, "resume" if path else "start", step=start, steps=steps,
               changes={k: list(v) for k, v in changes.items()}, **info)
        try:
            yield
        except BaseException as e:  # a kill leaves no record: the next start's "resume" says so
            last = latest_checkpoint(run_dir)
            record(run_dir, "stopped", error=one_line(e), checkpoint=last.name if last else None)
            if isinstance(e, Diverged) and last is not None:
                raise Diverged(f"{one_line(e)}; the newest checkpoint, {last.name}, is finite") from e
            raise
        last = latest_checkpoint(run_dir)
        record(run_dir, "finished", step=checkpoint_step(last) if last else 0)


def adamw(params, **settings) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where every parameter allows it (CPU and CUDA floating point): one
    pass over all parameters per step instead of a loop of small kernels per tensor (~10x faster on a CPU)."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)
    return torch.optim.AdamW(groups, fused=fused or None, **settings)


def _train(run_dir: Path, s: dict, data=None) -> dict:
    """The training itself, on this process; the run directory is held and checked (`open_run`)."""
    rank = idist.get_rank()
    torch.manual_seed(s["seed"])  # every rank builds the same initial model
    dev = resolve_device(s["device"])
    data = data if data is not None else DATASETS.build(s["dataset"])
    model = DiffusionTransformer().to(dev)
    extension = s["extension"] or TrainingExtension()
    extension.setup(model)
    obj = make_objective(s["objective"], learn_sigma=model.learn_sigma)
    optimizer = adamw(extension.param_groups(model), lr=s["lr"], weight_decay=s["weight_decay"])
    holder: dict = {}  # the sample stream reads the trainer's position when an iterator starts
    loader = build_loader(data, s["batch_size"], s["seed"], lambda: holder["trainer"].state.iteration,
                          s["num_workers"], dev)
    trainer = create_trainer(idist.auto_model(model), obj, idist.auto_optim(optimizer), s["grad_clip"], dev,
                             amp=dev.type == "cuda", budgets=model.tokenizer.training_budgets(), seed=s["seed"],
                             loss_terms=extension.loss_terms(model))
    trainer.add_event_handler(Events.ITERATION_STARTED, _schedule_reducers, model)
    holder["trainer"] = trainer
    ema = EMAHandler(model, momentum=1.0 - s["ema_decay"])
    ema.attach(trainer, name="ema_momentum", event=Events.ITERATION_COMPLETED)
    _attach_lr_warmup(trainer, optimizer, s["lr"], s["warmup_steps"])
    extension.attach(trainer, model, ema.ema_model, run_dir)
    if s["eval_every"]:  # before the logger, so each evaluated step's row carries the metrics
        attach_evaluator(trainer, ema.ema_model, obj, s["dataset"], s["eval_every"])
    metrics = _attach_logging(trainer, run_dir, s["log_every"], s["progress"] and rank == 0)
    to_save = {"model": model, "ema": ema.ema_model, "optimizer": optimizer, "trainer": trainer}
    _attach_checkpoints(trainer, to_save, run_dir, s["checkpoint_every"], s["keep_checkpoints"], metrics)
    _restore(run_dir, to_save, metrics)
    steps = s["steps"]
    if trainer.state.iteration < steps:
        trainer.state.max_iters = steps  # a resumed run may be extended to more steps
        epoch_length = max(1, len(data) // s["batch_size"])
        if trainer.state.epoch_length:  # a batch size changed with allow_config_change changes it
            trainer.state.epoch_length = epoch_length
        try:
            trainer.run(loader, max_iters=steps, epoch_length=epoch_length)
        finally:
            if rank == 0:
                metrics.flush()  # rows past the newest checkpoint are cut again on resume
    return {"run_dir": str(run_dir), "steps": trainer.state.iteration, "model": model, "ema": ema.ema_model,
            "metrics": metrics.frame() if rank == 0 else pd.DataFrame()}


def _schedule_reducers(engine: Engine, model) -> None:
    for reducer in model.reducers:
        reducer.schedule(engine.state.iteration - 1)


def _restore(run_dir: Path, to_save: dict, metrics: MetricsLog) -> None:
    """Load the newest good checkpoint (if any) and cut the metrics back to it."""
    _, state = load_good_checkpoint(run_dir, CHECKPOINT_KEYS)
    if state is not None:
        try:
            Checkpoint.load_objects(to_load=to_save, checkpoint=state)
        except (RuntimeError, KeyError, ValueError) as e:  # a config changed with --allow-config-change
            raise ConfigError(f"the newest checkpoint of {run_dir} does not fit this config: "
                              f"{str(e).splitlines()[0]}") from e
    if idist.get_rank() == 0:
        metrics.resume(to_save["trainer"].state.iteration)


def _attach_checkpoints(trainer: Engine, to_save: dict, run_dir: Path, every: int, keep: int,
                        metrics: MetricsLog) -> None:
    """Checkpoints every ``every`` steps and at the end, the newest ``keep`` kept (across restarts too);
    the metrics are flushed first, so ``metrics.csv`` always reaches the newest checkpoint."""
    saver = Checkpoint(to_save, RunSaver(run_dir / CHECKPOINT_DIR, keep), n_saved=None,
                       global_step_transform=lambda e, _: e.state.iteration)
    saved = {"step": None}

    def checkpoint(engine: Engine) -> None:
        if saved["step"] == engine.state.iteration:  # COMPLETED right after a periodic save
            return
        if idist.get_rank() == 0:
            metrics.flush()
        saver(engine)
        saved["step"] = engine.state.iteration

    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=every) | Events.COMPLETED, checkpoint)


def build_loader(data, batch_size: int, seed: int, position, num_workers: int, device: torch.device):
    """A loader over this rank's share of a resumable `SampleStream`."""
    world = idist.get_world_size()
    if batch_size % world:
        raise ConfigError(f"train.batch_size = {batch_size} is not divisible by the {world} processes")
    per_rank = batch_size // world
    stream = SampleStream(len(data), per_rank, seed, position, idist.get_rank(), world)
    # the loader draws worker seeds from its own generator, never from the global RNG
    return torch.utils.data.DataLoader(data, batch_size=per_rank, sampler=stream, num_workers=num_workers,
                                       pin_memory=device.type == "cuda",
                                       generator=torch.Generator().manual_seed(seed))


def _attach_logging(trainer: Engine, run_dir: Path, log_every: int, progress: bool) -> MetricsLog:
    """Metrics CSV and the operative config (rank 0 only: one writer per run directory), progress bar."""
    metrics = MetricsLog(run_dir / METRICS_FILE, log_every)
    if idist.get_rank() == 0:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, metrics)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda _: atomic_write_text(
            gin.operative_config_str(), run_dir / "operative_config.gin"))
    if progress:
        StepProgress().attach(trainer)
    return metrics


class StepProgress:
    """One progress bar over the whole run in optimisation steps (ignite's `ProgressBar` counts
    iterations within an epoch, and the endless sample stream has no epochs worth showing)."""

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.STARTED, self._open)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        trainer.add_event_handler(Events.COMPLETED | Events.TERMINATE, self._close)

    def _open(self, engine: Engine) -> None:
        self.bar = tqdm(total=engine.state.max_iters, initial=engine.state.iteration, desc="train", unit="step",
                        leave=False, dynamic_ncols=True)

    def _update(self, engine: Engine) -> None:
        self.bar.set_postfix(loss=f"{engine.state.output['loss']:.4f}", refresh=False)
        self.bar.update(engine.state.iteration - self.bar.n)

    def _close(self, engine: Engine) -> None:
        self.bar.close()


def _train_here(local_rank: int, config: str, bindings: list[str], run_dir: str, allow_config_change: bool) -> None:
    """This process trains: alone, or as one rank under an external launcher (torchrun)."""
    with scoped([config], bindings):  # gin state is per process: every process parses the config itself
        train(run_dir, allow_config_change=allow_config_change)


def _train_in_worker(local_rank: int, config: str, bindings: list[str], run_dir: str, launcher: int, errors) -> None:
    """One spawned process of a multi-process run; the launcher has checked the config and holds the run."""
    with processes.worker(launcher, errors), scoped([config], bindings):
        progress = bound_arguments(train, "train")["progress"] and idist.get_rank() == 0
        train(run_dir, progress=progress, prepared=True)


def launch(config: str, bindings: list[str], run_dir: str, backend: str | None = None,
           nproc_per_node: int | None = None, allow_config_change: bool = False) -> int:
    """Train from a gin file on one process or, with a backend, on several (ignite.distributed).

    With ``nproc_per_node`` everything is checked here before any process starts or anything is
    written; this process holds the run directory while its workers train, and they die with it.
    Returns the step of the newest checkpoint.
    """
    run_dir = Path(run_dir)
    nproc = check_processes(backend, nproc_per_node)
    args = (config, list(bindings), str(run_dir))
    if nproc_per_node is None:
        if backend is None:
            _train_here(0, *args, allow_config_change)
        else:
            with idist.Parallel(backend=backend) as parallel:
                parallel.run(_train_here, *args, allow_config_change)
    else:
        processes.start_method([__name__])  # the workers' fork server imports while this process checks
        with scoped([config], bindings):
            settings = bound_arguments(train, "train")
            check_run(run_dir, settings, nproc)
            config_text = gin.config_str()
        with open_run(run_dir, config_text, allow_config_change, settings["steps"], processes=nproc,
                      backend=backend):
            processes.run(_train_in_worker, args, backend, nproc)
    last = latest_checkpoint(run_dir)
    return checkpoint_step(last) if last else 0


def _attach_lr_warmup(trainer: Engine, optimizer, lr: float, warmup_steps: int) -> None:
    """Linear warm-up to ``lr`` (DiT trains at a constant lr; warm-up helps tiny CPU runs)."""

    @trainer.on(Events.ITERATION_STARTED)
    def _set_lr(engine: Engine) -> None:
        scale = min(1.0, engine.state.iteration / warmup_steps) if warmup_steps else 1.0
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0) * max(scale, 1e-3)
        engine.state.lr = optimizer.param_groups[0]["lr"]


def run_objective(run_dir: str | Path) -> str:
    """The training objective a run directory's config names (``train.objective``)."""
    if not (Path(run_dir) / CONFIG_FILE).is_file():
        raise RunDirError(f"{run_dir} is not a run directory (no {CONFIG_FILE}): train first")
    with scoped([Path(run_dir) / CONFIG_FILE]):
        return gin.query_parameter("train.objective") if _is_bound("train.objective") else "gaussian"


def _is_bound(name: str) -> bool:
    try:
        gin.query_parameter(name)
        return True
    except ValueError:
        return False
