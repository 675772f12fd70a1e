"""Datasets: every item is ``{"x": (C, H, W) float, "y": long scalar, "mask": (H, W) bool}``.

Importing this package registers them in ``dyncompute.registry.DATASETS``.
"""
from dyncompute.data.latents import LatentFolder
from dyncompute.data.procedural import ProceduralShapes

__all__ = ["LatentFolder", "ProceduralShapes"]
