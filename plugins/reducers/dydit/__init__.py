"""`dydit`: DyDiT's timestep-wise dynamic width and spatial-wise dynamic tokens as a trained reducer."""
from .losses import flops_ratio
from .reducer import DyDiT

__all__ = ["DyDiT", "flops_ratio"]
