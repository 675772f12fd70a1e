"""Held-out evaluation at fixed timesteps: denoising loss and router diagnostics, as an ignite evaluator.

Held-out images come from the run's own dataset configuration drawn with a seed training never uses
(``HELDOUT_SEED``); each is noised at every timestep of ``timesteps`` on DiT's integer scale (0 = clean,
999 = pure noise) with noise from a generator seeded per batch, so two evaluations of a model agree
exactly. Flow-matching runs take timestep k as flow time 1 - k / 1000 (their t = 0 is pure noise).
Metrics, per timestep k (columns ``<name>_t<k>``): ``denoising_mse`` (the objective's per-sample MSE
term: epsilon for Gaussian diffusion, velocity for flow matching), and with a router
``router_auroc`` and ``kept_fraction``; over all timesteps ``kept_vs_noise_spearman``.

`attach_evaluator` runs the evaluator every K training steps; its metrics join that step's row of
``metrics.csv``.
"""
from __future__ import annotations

import inspect

import gin
import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Average, EpochMetric

from ..diffusion.transport import Transport
from ..registry import DATASETS
from .router import auroc, has_router, masks_on_grid, own_rng, router_maps, spearman

TIMESTEPS = (0, 20, 50, 100, 250, 500, 750, 999)
NUM_TIMESTEPS = 1000  # DiT's scale, on which timesteps are given for every objective
HELDOUT_SEED = 9_101  # the held-out (reference) set
SECOND_SEED = 9_102  # a second, disjoint held-out set (the real-vs-real FID floor)


def heldout_dataset(name: str, length: int, seed: int = HELDOUT_SEED):
    """``length`` items of dataset ``name`` (configured by the active gin bindings) drawn with ``seed``.

    The training seed of the run (``datasets.<name>.seed``) must differ: held-out means never trained on.
    """
    if seed == _training_seed(name):
        raise ValueError(f"held-out seed {seed} is the run's training seed (datasets.{name}.seed)")
    try:
        return DATASETS.build(name, seed=seed, length=length)
    except TypeError as e:
        raise ValueError(f"held-out evaluation draws a fresh split by seed; dataset {name!r} cannot: {e}") from e


def _training_seed(name: str):
    """The run's ``datasets.<name>.seed`` binding, else the dataset's default (None: it has no seed)."""
    try:
        return gin.query_parameter(f"datasets.{name}.seed")
    except ValueError:
        param = inspect.signature(DATASETS.get(name)).parameters.get("seed")
        return None if param is None else param.default


def model_time(objective, k: int, n: int, device) -> torch.Tensor:
    """Timestep k (0 = clean, 999 = noise) as the model's time input for ``objective``."""
    if not 0 <= k < NUM_TIMESTEPS:
        raise ValueError(f"evaluation timesteps lie in [0, {NUM_TIMESTEPS}), got {k}")
    if isinstance(objective, Transport):  # flow time runs from noise (0) to data (1)
        return torch.full((n,), 1.0 - k / NUM_TIMESTEPS, device=device)
    if k >= objective.num_timesteps:
        raise ValueError(f"timestep {k} is outside this diffusion's {objective.num_timesteps} steps")
    return torch.full((n,), k, dtype=torch.long, device=device)


def denoise(model, objective, x0: torch.Tensor, y: torch.Tensor, k: int, noise: torch.Tensor,
            model_kwargs: dict | None = None):
    """One forward on x0 noised at timestep k: (per-sample MSE term (B,), the forward's ForwardInfo);
    ``model_kwargs`` (e.g. a sampling budget) go to the model."""
    infos = []

    def model_fn(x_t, t, **kwargs):
        out, info = model(x_t, t, return_info=True, **kwargs, **(model_kwargs or {}))
        infos.append(info)
        return out

    t = model_time(objective, k, len(x0), x0.device)
    terms = objective.training_losses(model_fn, x0, t, model_kwargs={"y": y}, noise=noise)
    return terms["mse"], infos[0]


class HeldoutStep:
    """Evaluator process function: a batch of held-out images -> per-timestep losses and router maps."""

    def __init__(self, model, objective, timesteps, seed: int, router: bool, model_kwargs: dict | None = None):
        self.model, self.objective, self.timesteps = model, objective, tuple(timesteps)
        self.seed, self.router, self.model_kwargs = seed, router, model_kwargs

    def __call__(self, engine: Engine, batch: dict) -> dict:
        device = next(self.model.parameters()).device
        x0, y = batch["x"].to(device), batch["y"].to(device)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + engine.state.iteration)
        out = {}
        for k in self.timesteps:
            noise = torch.randn(x0.shape, generator=g).to(device)
            mse, info = denoise(self.model, self.objective, x0, y, k, noise, self.model_kwargs)
            row = {"mse": mse.float()[:, None].cpu()}  # (B, 1): ignite's Average counts B samples
            if self.router:
                p, kept = router_maps(self.model, info)
                row["p"] = p.flatten().cpu()
                row["mask"] = masks_on_grid(batch["mask"], p.shape[-2:]).flatten().float()
                row["kept"] = kept.flatten(1).float().mean(1)[:, None].cpu()
            out[k] = row
        return out


def create_heldout_evaluator(model, objective, timesteps=TIMESTEPS, seed: int = 0,
                             model_kwargs: dict | None = None) -> Engine:
    """An ignite evaluator with every held-out metric attached (router metrics only for a router);
    ``model_kwargs`` (e.g. a sampling budget) go to every forward."""
    router = has_router(model)
    engine = Engine(HeldoutStep(model, objective, timesteps, seed, router, model_kwargs))
    for k in timesteps:
        Average(lambda o, k=k: o[k]["mse"]).attach(engine, f"denoising_mse_t{k}")
        if router:
            EpochMetric(auroc, lambda o, k=k: (o[k]["p"], o[k]["mask"]),
                        check_compute_fn=False).attach(engine, f"router_auroc_t{k}")
            Average(lambda o, k=k: o[k]["kept"]).attach(engine, f"kept_fraction_t{k}")
    if router and len(timesteps) > 1:
        EpochMetric(spearman, lambda o: _kept_and_noise(o, timesteps),
                    check_compute_fn=False).attach(engine, "kept_vs_noise_spearman")
    return engine


def _kept_and_noise(output: dict, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (image, timestep) pair: its kept fraction and its noise level (the timestep)."""
    kept = torch.cat([output[k]["kept"][:, 0] for k in timesteps])
    level = torch.cat([torch.full((len(output[k]["kept"]),), float(k)) for k in timesteps])
    return kept, level


def evaluate_heldout(evaluator: Engine, model, loader) -> dict[str, float]:
    """Run the evaluator in eval mode without gradients, leaving the caller's RNG and mode untouched."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), own_rng(next(model.parameters()).device):
            metrics = evaluator.run(loader).metrics
    finally:
        model.train(was_training)
    return {name: float(value) for name, value in metrics.items()}


def heldout_loader(data, batch_size: int):
    """This process's share of the held-out items (ignite metrics all-reduce across processes)."""
    share = torch.utils.data.Subset(data, range(idist.get_rank(), len(data), idist.get_world_size()))
    return torch.utils.data.DataLoader(share, batch_size=batch_size, shuffle=False)


@gin.configurable("train_evaluator", denylist=["trainer", "model", "objective", "dataset", "every"])
def attach_evaluator(trainer: Engine, model, objective, dataset: str, every: int, num_images: int = 32,
                     batch_size: int = 32, timesteps=TIMESTEPS) -> Engine:
    """Every ``every`` steps, evaluate ``model`` on a cheap held-out subset; the metrics join the step's output.

    Attach before the metrics logger, so the step's row in ``metrics.csv`` carries them.
    """
    loader = heldout_loader(heldout_dataset(dataset, num_images), batch_size)
    evaluator = create_heldout_evaluator(model, objective, timesteps)

    @trainer.on(Events.ITERATION_COMPLETED(every=every))
    def _evaluate(engine: Engine) -> None:
        engine.state.output = {**engine.state.output, **evaluate_heldout(evaluator, model, loader)}

    return evaluator


@torch.no_grad()
def router_maps_at(model, objective, x0: torch.Tensor, y: torch.Tensor, timesteps=TIMESTEPS, seed: int = 0):
    """(p, kept), each (T, B, H, W) on CPU, of ``x0`` noised at each timestep (for figures)."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    x0, y = x0.to(device), y.to(device)
    ps, kepts = [], []
    with own_rng(device):
        for k in timesteps:
            _, info = denoise(model, objective, x0, y, k, torch.randn(x0.shape, generator=g).to(device))
            p, kept = router_maps(model, info)
            ps.append(p.cpu())
            kepts.append(kept.cpu())
    return torch.stack(ps), torch.stack(kepts)


def nest(metrics: dict[str, float]) -> dict:
    """``{"router_auroc_t20": v, ...}`` -> ``{"router_auroc": {"20": v, ...}, ...}`` (other names kept)."""
    out: dict = {}
    for name, value in metrics.items():
        base, _, k = name.rpartition("_t")
        if base and k.isdigit():
            out.setdefault(base, {})[k] = value
        else:
            out[name] = value
    return out
