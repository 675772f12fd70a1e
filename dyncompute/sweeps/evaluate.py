"""A cell's quality metrics: the one place the sweep asks "how good is this model and sampling setup?".

`evaluate_cell` is the seam to the evaluation module: it returns metric values with their goals
("min" or "max"), and reports plot every metric that has a goal, so a new metric appears in
results.csv and the Pareto figures by being returned here. It measures:

- ``heldout_denoise_mse``: the objective's noise-prediction MSE on held-out images (never seen in
  training) at fixed, evenly spaced timesteps with fixed noise; the cell's sampling budget applies.
  Compares models, not samplers.
- ``psnr_vs_reference_dB``: mean per-image PSNR (peak-to-peak 2 on [-1, 1] pixels) of the cell's
  samples against reference samples of the same trained model from the same noise and labels
  (``sweep.reference``, e.g. DDIM-50 without reducers). Compares samplers and reducers of one model;
  ``mse_vs_reference`` is the mean squared difference itself.
- with ``CellSettings.quality_features`` (e.g. ``['shapes_classifier']``): the evaluation module's sample
  quality of the cell's samples against as many held-out real images (``fid_shapes``, ``is_shapes``,
  ``cas``, and the real-data references ``fid_shapes_real``, ``is_shapes_real``, ``cas_real``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import gin
import torch

from ..diffusion import make_objective
from ..registry import DATASETS, FEATURE_EXTRACTORS

GOALS = {"heldout_denoise_mse": "min", "psnr_vs_reference_dB": "max", "mse_vs_reference": "min",
         "fid_shapes": "min", "is_shapes": "max", "cas": "max", "fid": "min", "is": "max"}
DESCRIPTIONS = {
    "heldout_denoise_mse": "noise-prediction MSE on held-out images at fixed, evenly spaced timesteps with fixed "
                           "noise (the cell's sampling budget applies); compares models, not samplers",
    "psnr_vs_reference_dB": "mean per-image PSNR of the cell's samples against the same trained model's reference "
                            "samples (sweep.reference) from the same noise and labels; compares samplers and "
                            "reducers of one model",
    "mse_vs_reference": "mean squared difference of the cell's samples to the reference samples (pixels in [-1, 1])",
    "fid_shapes": "FID on the shapes classifier's pool features against as many held-out real images (not "
                  "comparable with Inception FIDs); fid_shapes_real in results.csv: two disjoint real sets",
    "is_shapes": "Inception Score on the shapes classifier's class probabilities (is_shapes_real: real images)",
    "cas": "classification accuracy score: the shapes classifier's accuracy on the samples' conditioning labels",
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
    quality_features: tuple = ()  # feature extractors for sample quality (fid_shapes, ...); () skips it


@dataclass
class Evaluation:
    metrics: dict[str, float]
    goals: dict[str, str]  # "min" or "max": every metric with a goal gets a Pareto panel in reports
    descriptions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def evaluate_cell(model, samples, settings: CellSettings, budget: dict, reference=None) -> Evaluation:
    """Metrics of a trained model (gin config of the cell active) and of its ``samples`` (`SampleResult`)."""
    notes = []
    metrics = {"heldout_denoise_mse": heldout_denoise_mse(model, settings, budget, notes)}
    if reference is not None:
        metrics["psnr_vs_reference_dB"] = psnr(samples.images, reference)
        metrics["mse_vs_reference"] = float((samples.images.float() - reference.float()).pow(2).mean())
    if settings.quality_features:
        metrics.update(sample_quality(samples, settings.quality_features))
    return Evaluation(metrics, {k: GOALS[k] for k in metrics if k in GOALS},
                      {k: DESCRIPTIONS[k] for k in metrics if k in DESCRIPTIONS}, notes)


def sample_quality(samples, features) -> dict[str, float]:
    """The evaluation module's metrics of ``samples`` against held-out real images of the cell's dataset."""
    from ..evaluation.heldout import SECOND_SEED
    from ..evaluation.heldout import heldout_dataset as real_dataset
    from ..evaluation.metrics import quality

    n = len(samples.images)
    reference = real_dataset(_query("train.dataset", "procedural"), n)
    second = real_dataset(_query("train.dataset", "procedural"), n, SECOND_SEED)
    extractors = [FEATURE_EXTRACTORS.build(name, dataset=reference) for name in features]
    real = [torch.stack([reference[i][k] for i in range(n)]) for k in ("x", "y")]
    real_b = torch.stack([second[i]["x"] for i in range(n)])
    return quality(extractors, samples.images.cpu(), samples.labels.cpu(), real[0], real[1], real_b)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean per-image PSNR in dB of [-1, 1] images (peak-to-peak 2); inf when they are identical."""
    if images.shape != reference.shape:
        raise ValueError(f"samples {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape")
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(4.0 / mse)).mean())


@torch.no_grad()
def heldout_denoise_mse(model, settings: CellSettings, budget: dict, notes: list) -> float:
    name = _query("train.dataset", "procedural")
    kind = _query("train.objective", "gaussian")
    data = heldout_dataset(name, notes)
    n = min(settings.heldout_images, len(data))
    items = [data[i] for i in range(n)]
    x0, y = torch.stack([it["x"] for it in items]), torch.as_tensor([int(it["y"]) for it in items])
    device = next(model.parameters()).device
    x0, y = x0.to(device), y.to(device)
    objective = make_objective(kind, **({"learn_sigma": model.learn_sigma} if kind == "gaussian" else {}))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(settings.seed)).to(device)
    model.eval()
    total = 0.0
    for t in fixed_timesteps(objective, settings.heldout_timesteps):
        tt = torch.full((n,), t, device=device, dtype=torch.long if isinstance(t, int) else torch.float32)
        terms = objective.training_losses(lambda x, s, **kw: model(x, s, **kw, **budget), x0, tt,
                                          model_kwargs={"y": y}, noise=noise)
        total += float(terms["mse"].mean())
    return total / settings.heldout_timesteps


def fixed_timesteps(objective, k: int) -> list:
    """k evenly spaced timesteps: integers over the Gaussian chain, fractions inside (0, 1) for flows."""
    steps = getattr(objective, "num_timesteps", None)
    if steps:
        return [round(v) for v in torch.linspace(0, steps - 1, k).tolist()]
    return [(i + 0.5) / k for i in range(k)]


def heldout_dataset(name: str, notes: list):
    """The training dataset at another seed when it is procedural (disjoint images), else itself."""
    cls = DATASETS.get(name)
    data = DATASETS.build(name)
    if "seed" in inspect.signature(cls).parameters and hasattr(data, "seed"):
        return DATASETS.build(name, seed=data.seed + 1)  # items hash (seed, index): disjoint from training
    notes.append(f"dataset {name!r} has no seed: held-out MSE is measured on its first images (training data)")
    return data


def _query(key: str, default):
    try:
        value = gin.query_parameter(key)
    except ValueError:
        return default
    return default if value is None else value
