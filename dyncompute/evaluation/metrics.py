"""Sample quality through ignite metrics: FID and IS on a feature extractor's outputs, and CAS.

``ignite.metrics.FID`` and ``InceptionScore`` accumulate (and all-reduce across processes) with the
extractor passed in; CAS (classification accuracy score) is ``ignite.metrics.Accuracy`` of a classifier
on the dataset's classes against the labels the samples were conditioned on. One extraction per batch is
shared by the three. Each metric is named by its extractor (``fid_shapes``, never ``fid``, on our own
classifier); with a second real set, ``<fid>_real`` is the same metric between two disjoint real sets of
the same size: what a perfect generator would score at this sample count.
"""
from __future__ import annotations

import torch
from ignite.engine import Engine
from ignite.metrics import FID, Accuracy, InceptionScore
from torch import nn

from ..errors import UserError
from .features import FeatureExtractor, check_images


class SharedExtraction(nn.Module):
    """Calls the extractor once per batch: FID, IS and CAS each ask for the same batches in turn.

    The last few batches (fake, real, second real) are held with their outputs, so their storage
    cannot be reused by another batch while cached; an in-place change bumps a tensor's version and
    misses the cache.
    """

    def __init__(self, extractor: FeatureExtractor, size: int = 4):
        super().__init__()
        self.extractor, self.size = extractor, size
        self._cache: list[tuple[torch.Tensor, tuple]] = []

    def forward(self, images: torch.Tensor):
        for key, out in self._cache:
            if (images.data_ptr() == key.data_ptr() and images.shape == key.shape
                    and images.stride() == key.stride() and images._version == key._version):
                return out
        out = self.extractor(images)
        self._cache = [*self._cache[-(self.size - 1):], (images, out)]
        return out


class Head(nn.Module):
    """The view of a shared extraction one ignite metric needs: pool features or class probabilities."""

    def __init__(self, shared: SharedExtraction, kind: str):
        super().__init__()
        if kind not in ("features", "probabilities", "logits"):
            raise ValueError(f"unknown head {kind!r}")
        self.shared, self.kind = shared, kind

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features, logits = self.shared(images)
        if self.kind == "features":
            return features
        return logits.softmax(-1) if self.kind == "probabilities" else logits


def attach_quality_metrics(engine: Engine, extractor: FeatureExtractor, floor: bool = False, device="cpu") -> None:
    """FID (fake vs real), IS (fake), CAS (fake vs labels) and their real-data references.

    The engine's output is a dict with ``fake``, ``y`` (conditioning labels), ``real``, ``y_real`` and
    with ``floor``, ``real_b`` (a second, disjoint real set: the FID floor).
    """
    shared = SharedExtraction(extractor)
    feats, probs, logits = Head(shared, "features"), Head(shared, "probabilities"), Head(shared, "logits")
    n, k = extractor.num_features, extractor.num_classes
    FID(n, feats, lambda o: (o["fake"], o["real"]), device).attach(engine, extractor.fid_name)
    InceptionScore(k, probs, lambda o: o["fake"], device).attach(engine, extractor.is_name)
    InceptionScore(k, probs, lambda o: o["real"], device).attach(engine, f"{extractor.is_name}_real")
    if floor:
        FID(n, feats, lambda o: (o["real_b"], o["real"]), device).attach(engine, f"{extractor.fid_name}_real")
    if extractor.cas_name:
        Accuracy(lambda o: (logits(o["fake"]), o["y"]), device=device).attach(engine, extractor.cas_name)
        Accuracy(lambda o: (logits(o["real"]), o["y_real"]), device=device).attach(engine, f"{extractor.cas_name}_real")


def check_sample_count(extractors, n: int) -> None:
    """FID's covariance needs more images than features: say so before anything is sampled."""
    for extractor in extractors:
        if n <= extractor.num_features:
            raise UserError(f"{extractor.fid_name} needs more images than its {extractor.num_features} features "
                            f"(else the covariance is singular); got {n}")


def quality(extractors: list[FeatureExtractor], fake: torch.Tensor, labels: torch.Tensor, real: torch.Tensor,
            real_labels: torch.Tensor, real_b: torch.Tensor | None = None, batch_size: int = 100,
            device="cpu") -> dict[str, float]:
    """Every extractor's metrics over one pass of aligned (fake, real) batches.

    FID compares equally many fake and real images; ``real_b`` adds the real-vs-real floor.
    """
    for name, images in (("generated images", fake), ("real images", real), ("second real set", real_b)):
        if images is not None:
            check_images(images, name)
    if len(real) != len(fake) or (real_b is not None and len(real_b) != len(fake)):
        raise UserError(f"FID needs as many real as generated images: {len(fake)} generated, {len(real)} real"
                         + ("" if real_b is None else f", {len(real_b)} in the second real set"))
    check_sample_count(extractors, len(fake))
    engine = Engine(lambda _, batch: batch)
    for extractor in extractors:
        attach_quality_metrics(engine, extractor.to(device).eval(), real_b is not None, device)
    batches = []
    for i in range(0, len(fake), batch_size):
        s = slice(i, i + batch_size)
        batch = {"fake": fake[s], "y": labels[s], "real": real[s], "y_real": real_labels[s]}
        if real_b is not None:
            batch["real_b"] = real_b[s]
        batches.append({k: v.to(device) for k, v in batch.items()})
    return {name: float(value) for name, value in engine.run(batches).metrics.items()}


def stack_items(data, n: int, keys=("x", "y")) -> tuple[torch.Tensor, ...]:
    """The first ``n`` items of a dataset, each of ``keys`` stacked into one tensor."""
    items = [data[i] for i in range(n)]
    return tuple(torch.stack([torch.as_tensor(it[k]) for it in items]) for k in keys)


def quality_against(extractors: list[FeatureExtractor], fake: torch.Tensor, labels: torch.Tensor, reference,
                    second) -> dict[str, float]:
    """`quality` of ``fake`` (with its ``labels``) against as many images of the held-out dataset
    ``reference``, with the real-vs-real floor from the disjoint held-out dataset ``second``."""
    n = len(fake)
    real, real_y = stack_items(reference, n)
    return quality(extractors, fake.cpu(), labels.cpu(), real, real_y, stack_items(second, n, ("x",))[0])

