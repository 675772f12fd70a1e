"""A cell's quality metrics: the one place the sweep asks "how good is this model and sampling setup?".

`evaluate_cell` is the seam to `dyncompute.evaluation`: it returns metric values with their goals
("min" or "max"), and reports plot every metric that has a goal.

- ``fid_shapes`` / ``is_shapes`` / ``cas`` (or another extractor's names, ``CellSettings.quality_features``):
  the cell's samples against as many held-out real images of the run's dataset; ``fid_shapes_real`` is
  the real-vs-real floor at that sample count. FID needs more samples than the extractor has features.
- ``heldout_denoise_mse``: the objective's MSE term on held-out images (never trained on) at
  ``CellSettings.heldout_timesteps`` evenly spaced timesteps with fixed noise, the cell's sampling
  budget applied; compares models, not samplers. With a router also ``router_auroc`` (mean over those
  timesteps; no goal).
- ``psnr_vs_reference_dB``: mean per-image PSNR (peak-to-peak 2 on [-1, 1] pixels) of the cell's
  samples against reference samples of the same trained model from the same noise and labels
  (``sweep.reference``, e.g. DDIM-50 without reducers). Compares samplers and reducers of one model;
  ``mse_vs_reference`` is the mean squared difference itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import gin
import torch

from ..diffusion import make_objective
from ..evaluation.heldout import (
    NUM_TIMESTEPS,
    SECOND_SEED,
    create_heldout_evaluator,
    evaluate_heldout,
    heldout_dataset,
    heldout_loader,
)
from ..evaluation.metrics import quality_against
from ..registry import FEATURE_EXTRACTORS

GOALS = {"heldout_denoise_mse": "min", "psnr_vs_reference_dB": "max", "mse_vs_reference": "min"}
DESCRIPTIONS = {
    "heldout_denoise_mse": "the objective's MSE term on held-out images at fixed, evenly spaced timesteps with "
                           "fixed noise (the cell's sampling budget applies); compares models, not samplers",
    "psnr_vs_reference_dB": "mean per-image PSNR of the cell's samples against the same trained model's reference "
                            "samples (sweep.reference) from the same noise and labels; compares samplers and "
                            "reducers of one model",
    "mse_vs_reference": "mean squared difference of the cell's samples to the reference samples (pixels in [-1, 1])",
    "router_auroc": "AUROC of the router's boundary probability against the data's detail mask, held-out images, "
                    "mean over the held-out timesteps",
}


@gin.configurable
@dataclass
class CellSettings:
    """How much a cell samples and measures (sampling bindings: changing them never retrains)."""

    num_samples: int = 16  # images sampled for the metrics and the wall-clock (one batch)
    seed: int = 0  # noise and labels of those samples, and of the reference
    count_images: int = 4  # images whose whole trajectory is counted in MACs
    heldout_images: int = 32
    heldout_timesteps: int = 8
    views_samples: int = 8  # boundary maps (data-dependent tokenizers only)
    views_steps: int = 25
    quality_features: tuple = ()  # feature extractors for FID / IS / CAS, e.g. ('shapes_classifier',); () skips


@dataclass
class Evaluation:
    metrics: dict[str, float]
    goals: dict[str, str]  # "min" or "max": every metric with a goal gets a Pareto panel in reports
    descriptions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def evaluate_cell(model, samples, settings: CellSettings, budget: dict, reference=None) -> Evaluation:
    """Metrics of a trained model (gin config of the cell active) and of its ``samples`` (`SampleResult`)."""
    dataset = _query("train.dataset", "procedural")
    notes, goals, descriptions, metrics = [], dict(GOALS), dict(DESCRIPTIONS), {}
    try:
        heldout_dataset(dataset, 1)
    except ValueError as e:  # e.g. a latent folder: no held-out split to draw
        notes.append(f"no held-out metrics: {e}")
    else:
        metrics.update(heldout_metrics(model, dataset, settings, budget))
        for name in settings.quality_features:
            metrics.update(sample_quality(name, dataset, samples, goals, descriptions, notes))
    if reference is not None:
        metrics["psnr_vs_reference_dB"] = psnr(samples.images, reference)
        metrics["mse_vs_reference"] = float((samples.images.float() - reference.float()).pow(2).mean())
    return Evaluation(metrics, {k: goals[k] for k in metrics if k in goals},
                      {k: descriptions[k] for k in metrics if k in descriptions}, notes)


def sample_quality(name: str, dataset: str, samples, goals: dict, descriptions: dict, notes: list) -> dict:
    """FID / IS / CAS of the samples on feature extractor ``name`` against held-out real images."""
    n = len(samples.images)
    real = heldout_dataset(dataset, n)
    extractor = FEATURE_EXTRACTORS.build(name, dataset=real)
    if n <= extractor.num_features:
        notes.append(f"{extractor.fid_name}: not measured, it needs more samples than the extractor's "
                     f"{extractor.num_features} features (CellSettings.num_samples = {n})")
        return {}
    names = {extractor.fid_name: "min", extractor.is_name: "max"}
    if extractor.cas_name:
        names[extractor.cas_name] = "max"
        descriptions[extractor.cas_name] = f"accuracy of the {name} classifier on the samples' labels"
    goals.update(names)
    descriptions[extractor.fid_name] = (f"FID on {name} features, {n} samples vs {n} held-out real images (not "
                                        f"comparable with Inception FIDs); {extractor.fid_name}_real: two real sets")
    descriptions[extractor.is_name] = f"Inception Score on {name} class probabilities, {n} samples"
    second = heldout_dataset(dataset, n, SECOND_SEED)
    return quality_against([extractor], samples.images, samples.labels, real, second)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean per-image PSNR in dB of [-1, 1] images (peak-to-peak 2); inf when they are identical."""
    if images.shape != reference.shape:
        raise ValueError(f"samples {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape")
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(4.0 / mse)).mean())


def heldout_metrics(model, dataset: str, settings: CellSettings, budget: dict) -> dict[str, float]:
    """Held-out denoising MSE (and router AUROC) through `dyncompute.evaluation`'s held-out evaluator."""
    kind = _query("train.objective", "gaussian")
    objective = make_objective(kind, **({"learn_sigma": model.learn_sigma} if kind == "gaussian" else {}))
    k = settings.heldout_timesteps
    timesteps = [round(v) for v in torch.linspace(0, NUM_TIMESTEPS - 1, k).tolist()]
    evaluator = create_heldout_evaluator(model, objective, timesteps, settings.seed, model_kwargs=budget)
    data = heldout_dataset(dataset, settings.heldout_images)
    held = evaluate_heldout(evaluator, model, heldout_loader(data, batch_size=settings.heldout_images))
    out = {"heldout_denoise_mse": sum(held[f"denoising_mse_t{t}"] for t in timesteps) / k}
    auroc = [held[f"router_auroc_t{t}"] for t in timesteps if f"router_auroc_t{t}" in held]
    if auroc:
        out["router_auroc"] = sum(auroc) / len(auroc)
    return out


def _query(key: str, default):
    try:
        value = gin.query_parameter(key)
    except ValueError:
        return default
    return default if value is None else value
