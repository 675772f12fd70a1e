"""Training objectives and samplers: DiT-compatible Gaussian diffusion and SiT-style flow matching.

Samplers live in :mod:`dyncompute.diffusion.samplers` and register themselves in
``dyncompute.registry.SAMPLERS`` ("ddpm", "ddim", "ode") when that module is imported.
"""
from __future__ import annotations

from .gaussian import GaussianDiffusion, get_named_beta_schedule
from .respace import SpacedDiffusion, create_diffusion, space_timesteps
from .transport import ODE_METHODS, Transport

OBJECTIVES = {"gaussian": create_diffusion, "flow": Transport}


def make_objective(kind: str = "gaussian", **kwargs):
    """The training objective by name: DiT's ``create_diffusion(**kwargs)`` or ``Transport(**kwargs)``.

    Samplers are built from it (``Sampler.for_objective``), so a model is sampled as it was trained.
    """
    if kind not in OBJECTIVES:
        raise ValueError(f"unknown objective {kind!r}; valid: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[kind](**kwargs)


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
