"""Training with pytorch-ignite: trainer engine, EMA, atomic resumable checkpoints, metrics CSV.

A run directory holds ``config.gin`` (every binding of the run), ``operative_config.gin`` (what was
actually used), ``checkpoints/`` (ignite `Checkpoint`, atomic) and ``metrics.csv``. Calling
``train`` on a run directory that has checkpoints resumes from the latest one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import gin
import ignite.distributed as idist
import pandas as pd
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver, EMAHandler, ProgressBar, TerminateOnNan

from .diffusion import make_objective
from .evaluation.heldout import attach_evaluator
from .io import atomic_write, atomic_write_text, load_checkpoint
from .model import DiffusionTransformer
from .registry import DATASETS

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.csv"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return idist.device()
    return torch.device(device)


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


class RNGState:
    """The global torch RNG (timesteps, noise, label dropout), checkpointed for an exact resume."""

    def state_dict(self) -> dict:
        return {"torch": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])


@dataclass
class TrainStep:
    """One optimisation step: diffusion loss + the tokenizer's auxiliary losses, clipped gradients."""

    model: torch.nn.Module
    objective: object
    optimizer: torch.optim.Optimizer
    grad_clip: float
    device: torch.device
    amp: bool = False  # bfloat16 autocast (CUDA): no loss scaling needed

    def __call__(self, engine: Engine, batch: dict) -> dict:
        self.model.train()
        x = batch["x"].to(self.device, non_blocking=True)
        y = batch["y"].to(self.device, non_blocking=True)
        t = self.objective.sample_timesteps(x.shape[0], device=self.device)
        infos = []

        def model_fn(x_t, t_, **kw):
            out, info = self.model(x_t, t_, return_info=True, **kw)
            infos.append(info)
            return out

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            terms = self.objective.training_losses(model_fn, x, t, model_kwargs={"y": y})
            aux = dict(infos[0].aux_losses)
            loss = terms["loss"].mean() + sum(aux.values(), torch.zeros((), device=self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        out = {"loss": loss.item(), "grad_norm": grad_norm.item()}
        out.update({k: v.mean().item() for k, v in terms.items() if k != "loss"})
        out.update({f"aux_{k}": v.item() for k, v in aux.items()})
        out["tokens_per_sample"] = sum(infos[0].tokens_per_sample) / len(infos[0].tokens_per_sample)
        return out


def create_trainer(model, objective, optimizer, grad_clip: float = 1.0, device="cpu", amp: bool = False) -> Engine:
    trainer = Engine(TrainStep(model, objective, optimizer, grad_clip, torch.device(device), amp))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, TerminateOnNan(lambda out: out["loss"]))
    return trainer


class MetricsLog:
    """Rows of step metrics, rewritten atomically as CSV (a resumed run keeps the earlier rows)."""

    def __init__(self, path: Path, every: int):
        self.path, self.every, self.rows = path, every, []
        self._t0 = time.perf_counter()

    def resume(self, step: int) -> None:
        """Keep the rows up to ``step``; ``seconds`` keeps counting training time across restarts."""
        if self.path.exists() and step > 0:
            self.rows = [r for r in pd.read_csv(self.path).to_dict("records") if r["step"] <= step]
            if self.rows:
                self._t0 = time.perf_counter() - self.rows[-1]["seconds"]

    def __call__(self, engine: Engine) -> None:
        step = engine.state.iteration
        row = {"step": step, **engine.state.output, "lr": engine.state.lr,
               "seconds": time.perf_counter() - self._t0}
        self.rows.append(row)
        if step % self.every == 0 or step == engine.state.max_iters:
            self.flush()

    def flush(self) -> None:
        df = pd.DataFrame(self.rows)
        atomic_write(self.path, lambda tmp: df.to_csv(tmp, index=False))


@gin.configurable(denylist=["run_dir"])
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
    log_every: int = 10,
    seed: int = 0,
    num_workers: int = 0,
    device: str = "auto",
    progress: bool = True,
    eval_every: int = 0,
) -> dict:
    """Train ``DiffusionTransformer()`` (configured by gin) on a registered dataset; resumes if possible.

    ``eval_every`` > 0 evaluates the EMA model on held-out data every that many steps (metrics.csv columns).
    """
    run_dir = Path(run_dir)
    (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    if idist.get_rank() == 0:
        atomic_write_text(gin.config_str(), run_dir / "config.gin")
    torch.manual_seed(seed)
    dev = resolve_device(device)
    data = DATASETS.build(dataset)
    model = DiffusionTransformer().to(dev)
    if (data.channels, data.size) != (model.in_channels, model.input_size):
        raise ValueError(f"dataset gives {data.channels}x{data.size}x{data.size} images but the model expects "
                         f"{model.in_channels}x{model.input_size}x{model.input_size}")
    obj = make_objective(objective, **({"learn_sigma": model.learn_sigma} if objective == "gaussian" else {}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    holder: dict = {}  # the sample stream reads the trainer's position when an iterator starts
    loader = build_loader(data, batch_size, seed, lambda: holder["trainer"].state.iteration, num_workers, dev)
    trainer = create_trainer(idist.auto_model(model), obj, idist.auto_optim(optimizer), grad_clip, dev,
                             amp=dev.type == "cuda")
    holder["trainer"] = trainer
    torch.manual_seed(seed + idist.get_rank())  # ranks share the init (DDP broadcasts it), not the noise
    ema = EMAHandler(model, momentum=1.0 - ema_decay)
    ema.attach(trainer, name="ema_momentum", event=Events.ITERATION_COMPLETED)
    _attach_lr_warmup(trainer, optimizer, lr, warmup_steps)
    to_save = {"model": model, "ema": ema.ema_model, "optimizer": optimizer,
               "trainer": trainer, "rng": RNGState()}
    saver = Checkpoint(to_save, DiskSaver(run_dir / CHECKPOINT_DIR, require_empty=False, atomic=True),
                       n_saved=2, global_step_transform=lambda e, _: e.state.iteration)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=checkpoint_every) | Events.COMPLETED, saver)
    if eval_every:  # before the logger, so each evaluated step's row carries the metrics
        attach_evaluator(trainer, ema.ema_model, obj, dataset, eval_every)
    metrics = _attach_logging(trainer, run_dir, log_every, progress)

    last = latest_checkpoint(run_dir)
    if last is not None:
        Checkpoint.load_objects(to_load=to_save, checkpoint=load_checkpoint(last))
        metrics.resume(trainer.state.iteration)
    if trainer.state.iteration < steps:
        trainer.state.max_iters = steps  # a resumed run may be extended to more steps
        trainer.run(loader, max_iters=steps, epoch_length=max(1, len(data) // batch_size))
    return {"run_dir": str(run_dir), "steps": trainer.state.iteration, "model": model, "ema": ema.ema_model,
            "metrics": pd.DataFrame(metrics.rows)}


def build_loader(data, batch_size: int, seed: int, position, num_workers: int, device: torch.device):
    """A loader over this rank's share of a resumable `SampleStream`."""
    world = idist.get_world_size()
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world} processes")
    per_rank = batch_size // world
    stream = SampleStream(len(data), per_rank, seed, position, idist.get_rank(), world)
    # the loader draws worker seeds from its own generator, never from the global RNG that the
    # checkpoint restores (else where ignite restarts an iterator would shift every later draw)
    return torch.utils.data.DataLoader(data, batch_size=per_rank, sampler=stream, num_workers=num_workers,
                                       pin_memory=device.type == "cuda",
                                       generator=torch.Generator().manual_seed(seed))


def _attach_logging(trainer: Engine, run_dir: Path, log_every: int, progress: bool) -> MetricsLog:
    """Metrics CSV and the operative config (rank 0 only: one writer per run directory), progress bar."""
    metrics = MetricsLog(run_dir / METRICS_FILE, log_every)
    if idist.get_rank() == 0:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, metrics)
        trainer.add_event_handler(Events.COMPLETED, lambda _: metrics.flush())
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda _: atomic_write_text(
            gin.operative_config_str(), run_dir / "operative_config.gin"))
    if progress:
        ProgressBar(persist=False).attach(trainer, output_transform=lambda out: {"loss": out["loss"]})
    return metrics


def _train_from_config(local_rank: int, config: str, bindings: list[str], run_dir: str) -> None:
    from .config import scoped  # gin state is per process: every worker parses the config itself

    with scoped([config], bindings):
        train(run_dir, progress=idist.get_rank() == 0)


def launch(config: str, bindings: list[str], run_dir: str, backend: str | None = None,
           nproc_per_node: int | None = None) -> int:
    """Train from a gin file on one process or, with a backend, on several (ignite.distributed).

    Returns the step of the latest checkpoint written.
    """
    with idist.Parallel(backend=backend, nproc_per_node=nproc_per_node) as parallel:
        parallel.run(_train_from_config, config, list(bindings), run_dir)
    last = latest_checkpoint(run_dir)
    return int(last.stem.rsplit("_", 1)[-1]) if last else 0


def _attach_lr_warmup(trainer: Engine, optimizer, lr: float, warmup_steps: int) -> None:
    """Linear warm-up to ``lr`` (DiT trains at a constant lr; warm-up helps tiny CPU runs)."""

    @trainer.on(Events.ITERATION_STARTED)
    def _set_lr(engine: Engine) -> None:
        scale = min(1.0, engine.state.iteration / warmup_steps) if warmup_steps else 1.0
        for group in optimizer.param_groups:
            group["lr"] = lr * max(scale, 1e-3)
        engine.state.lr = optimizer.param_groups[0]["lr"]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = sorted((Path(run_dir) / CHECKPOINT_DIR).glob("checkpoint_*.pt"),
                   key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    return ckpts[-1] if ckpts else None
