"""Feature extractors for sample-quality metrics: the plugin interface and the image contract.

Every metric takes images as float (N, C, H, W) in [-1, 1], the models' pixel range; anything else is
an error naming what is wrong. A `FeatureExtractor` plugin maps such images to pool features (for
FID) and class logits (for IS and, when the classes are the dataset's own, CAS) in one pass, and
names the metrics computed on it: plain ``fid``/``is`` only for the standard Inception network.
"""
from __future__ import annotations

import abc

import torch
from torch import nn

RANGE_TOLERANCE = 1e-3  # float round-off around [-1, 1]


class ImageError(ValueError):
    """Images given to a metric are not float (N, C, H, W) in [-1, 1]."""


def check_images(images, what: str = "images") -> None:
    """Raise `ImageError` unless ``images`` is a finite float tensor (N, C, H, W), C in 1/3/4, in [-1, 1]."""
    if not torch.is_tensor(images):
        raise ImageError(f"{what} must be a torch.Tensor (N, C, H, W) in [-1, 1], got {type(images).__name__}")
    if not images.is_floating_point():
        raise ImageError(f"{what} must be floating point in [-1, 1], got dtype {images.dtype} "
                         "(uint8 pixels: x / 127.5 - 1)")
    if images.dim() != 4 or images.shape[0] == 0 or images.shape[1] not in (1, 3, 4):
        raise ImageError(f"{what} must have shape (N, C, H, W) with N >= 1 and C in (1, 3, 4), "
                         f"got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ImageError(f"{what} contain NaN or infinite values")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ImageError(f"{what} must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}] "
                         "(images in [0, 1] or [0, 255] must be mapped to [-1, 1])")


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> uint8 (N, 3, H, W), quantised exactly as the ``.npz`` samples are written."""
    from ..sampling import to_uint8_nhwc

    return torch.from_numpy(to_uint8_nhwc(images.detach().float().cpu())).permute(0, 3, 1, 2).to(images.device)


class FeatureExtractor(nn.Module, abc.ABC):
    """Base class of feature-extractor plugins (registry ``FEATURE_EXTRACTORS``).

    Built with the keyword ``dataset`` (the run's held-out dataset, so extractors trained on the data
    can match its configuration; others ignore it) plus their own gin-bound settings. ``fid_name``,
    ``is_name`` and ``cas_name`` label the metrics on this extractor; ``cas_name`` is None unless the
    logits are over the dataset's own classes.
    """

    fid_name: str = "fid"
    is_name: str = "is"
    cas_name: str | None = None
    num_features: int  # width of the pool features (FID)
    num_classes: int  # width of the logits (IS, CAS)
    heldout_accuracy: float | None = None  # a dataset classifier's accuracy on held-out real images

    @abc.abstractmethod
    def extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked [-1, 1] images -> (features (N, num_features), logits (N, num_classes))."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_images(images)
        with torch.no_grad():
            return self.extract(images)
