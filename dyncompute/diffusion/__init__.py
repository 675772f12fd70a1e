"""Training objectives and samplers: DiT-compatible Gaussian diffusion and SiT-style flow matching.

Samplers live in :mod:`dyncompute.diffusion.samplers` and register themselves in
``dyncompute.registry.SAMPLERS`` ("ddpm", "ddim", "ode") when that module is imported.
"""
from __future__ import annotations

from .gaussian import GaussianDiffusion, get_named_beta_schedule
from .respace import SpacedDiffusion, create_diffusion, space_timesteps
from .transport import ODE_METHODS, Transport

OBJECTIVES = ("gaussian", "flow")


def make_objective(kind: str = "gaussian", **kwargs):
    """The trainer's objective: ``create_diffusion(**kwargs)`` or ``Transport(**kwargs)``."""
    if kind == "gaussian":
        return create_diffusion(**kwargs)
    if kind == "flow":
        return Transport(**kwargs)
    raise ValueError(f"unknown objective kind {kind!r}; valid: {', '.join(OBJECTIVES)}")


__all__ = [
    "GaussianDiffusion",
    "SpacedDiffusion",
    "Transport",
    "ODE_METHODS",
    "OBJECTIVES",
    "create_diffusion",
    "get_named_beta_schedule",
    "make_objective",
    "space_timesteps",
]
