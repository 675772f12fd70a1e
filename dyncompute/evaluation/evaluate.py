"""`dyncompute eval RUN_DIR`: a trained run's numbers, from its own dataset configuration.

    dyncompute eval RUN_DIR [--samples N] [--json] [--sampler ddpm] [--steps 250] [--heldout 128]
                    [--features shapes_classifier [inception]] [--out DIR] [-b BINDING ...]

Sample quality: N class-balanced samples (labels cycle through the classes; x0 clipped to the pixel
range) against N held-out real images of the run's dataset: ``fid_shapes``, ``is_shapes`` and ``cas``
on the shapes classifier (``fid``/``is`` with ``--features inception``), with real-data references
(``fid_shapes_real``: two disjoint real sets of N; ``is_shapes_real``; ``cas_real``). Held-out images
noised at fixed timesteps: ``denoising_mse`` and, for a tokenizer with a router, ``router_auroc``,
``kept_fraction`` (each {timestep: value}) and ``kept_vs_noise_spearman``. Written to OUT (default
RUN_DIR/eval): ``eval.json``, the evaluated samples (``eval_samples.png`` / ``.npz``, the ADM
evaluator's format) and ``router_maps.png``.
"""
from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import torch

from ..config import RUN_CONFIGURABLES, bindings_of, scoped
from ..diffusion import make_objective
from ..io import atomic_write_text
from ..registry import FEATURE_EXTRACTORS
from .heldout import (
    SECOND_SEED,
    TIMESTEPS,
    create_heldout_evaluator,
    evaluate_heldout,
    heldout_dataset,
    heldout_loader,
    nest,
    router_maps_at,
)
from .metrics import check_sample_count, quality_against, stack_items
from .router import plot_router_maps

FIGURE_IMAGES = 6


def evaluate_run(run_dir, num_samples: int = 256, sampler: str = "ddpm", steps: int = 250, cfg_scale: float = 1.0,
                 seed: int = 0, heldout: int = 128, features=("shapes_classifier",), weights: str = "ema",
                 device: str = "auto", out=None, bindings=()) -> dict:
    """Every number of a run (see the module docstring); also writes them and the figures to ``out``."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.gin").is_file():
        raise FileNotFoundError(f"not a run directory (no config.gin): {run_dir}")
    with scoped([run_dir / "config.gin"], bindings, skip_unknown=RUN_CONFIGURABLES):
        trained = _train_settings(run_dir, bindings)
        dataset, kind = trained.get("dataset", "procedural"), trained.get("objective", "gaussian")
        reference = heldout_dataset(dataset, max(num_samples, heldout))
        second = heldout_dataset(dataset, num_samples, SECOND_SEED)
        extractors = [FEATURE_EXTRACTORS.build(name, dataset=reference) for name in features]
    check_sample_count(extractors, num_samples)
    model, samples = _model_and_samples(run_dir, weights, num_samples=num_samples, sampler=sampler,
                                        num_steps=steps, cfg_scale=cfg_scale, seed=seed, device=device)
    objective = make_objective(kind, **({"learn_sigma": model.learn_sigma} if kind == "gaussian" else {}))
    metrics = quality_against(extractors, samples.images, samples.labels, reference, second)
    evaluator = create_heldout_evaluator(model, objective, TIMESTEPS, seed)
    held = nest(evaluate_heldout(evaluator, model, heldout_loader(torch.utils.data.Subset(reference, range(heldout)),
                                                                    batch_size=64)))
    result = {"run_dir": str(run_dir), "num_samples": num_samples, "sampler": sampler, "sampling_steps": steps,
              "cfg_scale": cfg_scale, "weights": weights, "heldout_images": heldout, **metrics,
              **{f"{e.cas_name}_classifier_heldout_accuracy": e.heldout_accuracy for e in extractors if e.cas_name},
              **held}
    _write(out or run_dir / "eval", result, samples.images, model, objective, reference, seed)
    return _finite_or_none(result)


def _model_and_samples(run_dir: Path, weights: str, **generate_kwargs):
    """The run's model and its samples: the one place evaluation uses the sampling API."""
    from ..engine import run_objective
    from ..runs import load_run
    from ..sampling import generate

    model = load_run(run_dir, weights=weights)
    return model, generate(model, clip_denoised=True, objective=run_objective(run_dir), **generate_kwargs)


def _train_settings(run_dir: Path, bindings) -> dict:
    """The run's ``train.*`` settings, read from its config text: evaluating must not need the trainer (or
    an extension such as upcycling) registered with gin, and a fresh `dyncompute eval` process has neither.
    Only literal values (the dataset's and objective's names) are kept."""
    out = {}
    for key, value in bindings_of("\n".join([(run_dir / "config.gin").read_text(), *bindings])).items():
        if key.startswith("train."):
            try:
                out[key[len("train."):]] = ast.literal_eval(value)
            except (ValueError, SyntaxError):  # a reference such as @upcycling()
                pass
    return out


def _write(out: Path, result: dict, images, model, objective, reference, seed: int) -> None:
    from ..sampling import save_samples

    out = Path(out)
    save_samples(images, out, name="eval_samples")
    if "router_auroc" in result:
        x, y, mask = stack_items(reference, FIGURE_IMAGES, ("x", "y", "mask"))
        p, kept = router_maps_at(model, objective, x, y, TIMESTEPS, seed)
        scores = {k: {int(t): v for t, v in result[k].items()} for k in ("router_auroc", "kept_fraction")}
        plot_router_maps(x, mask, p, kept, list(TIMESTEPS), scores, out / "router_maps.png")
    atomic_write_text(json.dumps(_finite_or_none(result), indent=1), out / "eval.json")


def _finite_or_none(value):
    """NaN (e.g. AUROC of a set without detail) is not JSON: null instead."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value
