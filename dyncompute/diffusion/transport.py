"""Flow matching on the linear path (rectified flow, Liu et al. 2023; SiT, Ma et al. 2024).

Conventions (SiT's "Linear" path with velocity prediction):
  * t ∈ [0, 1]; t = 0 is pure noise ε, t = 1 is data x;
  * x_t = t·x + (1 − t)·ε, and the regression target is the velocity u = x − ε;
  * sampling integrates dx/dt = v_θ(x, t) from t = 0 to t = 1.

The model receives t as a float tensor of shape (B,) in [0, 1], *not* scaled to [0, 1000).
DiT's sinusoidal ``TimestepEmbedder`` accepts floats, and SiT feeds it t ∈ [0, 1] unchanged.
A DiT-shaped model with ``learn_sigma`` returns 2C channels; the second half is ignored here.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchdiffeq import odeint

from .gaussian import mean_flat

# Our solver names → torchdiffeq's. "heun" is Heun's 2nd-order method (2 NFE per step).
_ODE_METHODS = {
    "euler": "euler",
    "heun": "heun2",
    "midpoint": "midpoint",
    "rk4": "rk4",
    "dopri5": "dopri5",
}
ADAPTIVE_METHODS = ("dopri5",)


def _installed_methods() -> dict[str, str]:
    """Our names whose torchdiffeq solver exists in the installed version (heun2 is ≥ 0.2.4)."""
    try:
        from torchdiffeq._impl.odeint import SOLVERS  # private, hence the fallback
    except ImportError:
        return dict(_ODE_METHODS)
    return {ours: theirs for ours, theirs in _ODE_METHODS.items() if theirs in SOLVERS}


ODE_METHODS = tuple(_installed_methods())


def resolve_ode_method(method: str) -> str:
    """Map our solver name to torchdiffeq's, failing loudly on unknown names."""
    methods = _installed_methods()
    if method not in methods:
        raise ValueError(f"unknown ODE method {method!r}; valid: {', '.join(methods)}")
    return methods[method]


class Transport:
    """Linear-path flow matching: training loss and ODE sampling."""

    def __init__(self, learn_sigma: bool = False):
        self.learn_sigma = learn_sigma  # a model with a sigma half: velocity() reads the first half

    def sample_timesteps(self, n: int, device="cpu", generator=None) -> Tensor:
        """Uniform training times t ~ U[0, 1)."""
        return torch.rand(n, device=device, generator=generator)

    def interpolate(self, x_start: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, u_t) on the straight line from noise (t = 0) to data (t = 1)."""
        t = t.view(-1, *([1] * (x_start.ndim - 1))).to(x_start.dtype)
        return t * x_start + (1 - t) * noise, x_start - noise

    def velocity(self, model, x: Tensor, t: Tensor, model_kwargs=None) -> Tensor:
        """v_θ(x, t), dropping a learned-sigma half if the model has one."""
        out = model(x, t, **(model_kwargs or {}))
        out = out[0] if isinstance(out, tuple) else out
        C = x.shape[1]
        if out.shape[1] == 2 * C:
            out = out[:, :C]
        if out.shape != x.shape:
            raise ValueError(f"velocity shape {tuple(out.shape)} != input {tuple(x.shape)}")
        return out

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None) -> dict:
        """Per-sample flow-matching MSE ‖v_θ(x_t, t) − (x − ε)‖², as {"loss", "mse"}, each (B,)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t, target = self.interpolate(x_start, noise, t)
        mse = mean_flat((self.velocity(model, x_t, t, model_kwargs) - target) ** 2)
        return {"loss": mse, "mse": mse}

    def sample_ode(self, model, noise: Tensor, num_steps: int = 50, method: str = "euler",
                   atol: float = 1e-6, rtol: float = 1e-3, model_kwargs=None) -> Tensor:
        """Integrate the probability-flow ODE from noise (t = 0) to data (t = 1).

        Fixed-grid solvers take ``num_steps`` uniform steps; dopri5 adapts with atol/rtol and is
        told to end a step exactly at t = 1 rather than step past it and interpolate back.
        """
        solver = resolve_ode_method(method)
        batch = noise.shape[0]

        def drift(t: Tensor, x: Tensor) -> Tensor:
            # clamp: dopri5's initial step-size probe may still look just past t = 1
            t = t.clamp(0.0, 1.0).expand(batch).to(x.dtype)
            return self.velocity(model, x, t, model_kwargs)

        span = torch.tensor([0.0, 1.0], device=noise.device, dtype=noise.dtype)
        kwargs = {"atol": atol, "rtol": rtol, "options": {"step_t": span[1:]}}
        if method not in ADAPTIVE_METHODS:
            grid = torch.linspace(0.0, 1.0, num_steps + 1, device=noise.device, dtype=noise.dtype)
            kwargs = {"options": {"grid_constructor": lambda *_: grid}}
        with torch.no_grad():
            return odeint(drift, noise, span, method=solver, **kwargs)[-1]
