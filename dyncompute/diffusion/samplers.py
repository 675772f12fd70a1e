"""Samplers as registry plugins: ``SAMPLERS.build("ddim", num_steps=50)``.

Every sampler counts its model evaluations (``nfe``) and records the timestep each evaluation
saw (``timesteps_seen``, original 1000-step indices for Gaussian samplers, floats in [0, 1] for
the ODE sampler), so compute can be accounted per sample call. One call of ``model_fn`` is one
evaluation, even when it runs a doubled classifier-free-guidance batch.
"""
from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import Tensor

from dyncompute.errors import ConfigError
from dyncompute.observe import Observed, Timesteps
from dyncompute.registry import SAMPLERS

from .gaussian import GaussianDiffusion
from .respace import SpacedDiffusion, create_diffusion
from .transport import Transport, resolve_ode_method

SPACINGS = ("fractional", "ddim")


class Sampler(abc.ABC):
    """Shared bookkeeping: ``nfe`` and ``timesteps_seen`` describe the last ``sample`` call.

    ``trains_with`` is the objective class a model must have been trained with; `for_objective`
    builds a sampler for a model's own objective and refuses a mismatch.
    """

    trains_with: ClassVar[type]
    _observed: Observed | None = None
    _timesteps: Timesteps | None = None

    @classmethod
    def for_objective(cls, objective, **settings) -> Sampler:
        if not isinstance(objective, cls.trains_with):
            raise ValueError(f"sampler {cls.__name__} needs a model trained with {cls.trains_with.__name__}, "
                             f"but this model was trained with {type(objective).__name__}")
        return cls(objective=objective, **settings)

    @property
    def nfe(self) -> int:
        return self._observed.count if self._observed else 0

    @property
    def timesteps_seen(self) -> list:
        return self._timesteps.seen if self._timesteps else []

    @property
    def planned_nfe(self) -> int | None:
        """Evaluations one ``sample`` call will make (None when an adaptive solver decides)."""
        return None

    @abc.abstractmethod
    def objective(self):
        """The training objective a model must have been trained with to use this sampler."""

    @abc.abstractmethod
    def sample(self, model_fn, shape, model_kwargs=None, noise=None, device="cpu",
               progress=False, generator=None) -> Tensor:
        """Samples of ``shape`` from noise; counts every ``model_fn`` call."""

    def _count(self, model_fn) -> Observed:
        self._timesteps = Timesteps()
        self._observed = Observed(model_fn, [self._timesteps], with_info=False)
        return self._observed

    @staticmethod
    def _initial_noise(shape, noise, device, generator) -> Tensor:
        if noise is not None:
            return noise.to(device)
        return torch.randn(*shape, device=device, generator=generator)


class _GaussianSampler(Sampler):
    """Common set-up of DDPM/DDIM: a respaced copy of DiT's diffusion."""

    trains_with = SpacedDiffusion

    def __init__(self, num_steps, spacing, learn_sigma, noise_schedule, diffusion_steps,
                 clip_denoised, objective: SpacedDiffusion | None = None):
        if spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
            # a one-step schedule has no posterior variance (q(x_{t-1} | x_t, x_0) needs a t - 1)
            raise ConfigError(f"DDPM and DDIM sampling need num_steps >= 2, got {num_steps!r}")
        self.num_steps, self.clip_denoised = num_steps, clip_denoised
        self._objective = objective or create_diffusion(
            "", noise_schedule=noise_schedule, learn_sigma=learn_sigma, diffusion_steps=diffusion_steps)
        self.diffusion = self._objective.respace(f"ddim{num_steps}" if spacing == "ddim" else str(num_steps))

    def objective(self) -> GaussianDiffusion:
        return self._objective

    @property
    def planned_nfe(self) -> int:
        return self.diffusion.num_timesteps

    def sample(self, model_fn, shape, model_kwargs=None, noise=None, device="cpu",
               progress=False, generator=None) -> Tensor:
        x = self._initial_noise(shape, noise, device, generator)
        return self._loop(self._count(model_fn), tuple(shape), x, model_kwargs, progress, generator)


@SAMPLERS.register("ddpm")
class DDPMSampler(_GaussianSampler):
    """Ancestral DDPM sampling on ``num_steps`` respaced steps (DiT's sample.py: 250).

    ``clip_denoised`` defaults to False because DiT samples in (unbounded) VAE latent space.
    """

    def __init__(self, num_steps: int = 250, spacing: str = "fractional", learn_sigma: bool = True,
                 noise_schedule: str = "linear", diffusion_steps: int = 1000,
                 clip_denoised: bool = False, objective: SpacedDiffusion | None = None):
        super().__init__(num_steps, spacing, learn_sigma, noise_schedule, diffusion_steps,
                         clip_denoised, objective)

    def _loop(self, model, shape, x, model_kwargs, progress, generator):
        return self.diffusion.p_sample_loop(
            model, shape, noise=x, clip_denoised=self.clip_denoised, model_kwargs=model_kwargs,
            device=x.device, progress=progress, generator=generator,
        )


@SAMPLERS.register("ddim")
class DDIMSampler(_GaussianSampler):
    """DDIM sampling (Song et al. 2021); ``eta=0`` is deterministic given the initial noise."""

    def __init__(self, num_steps: int = 50, eta: float = 0.0, spacing: str = "ddim",
                 learn_sigma: bool = True, noise_schedule: str = "linear",
                 diffusion_steps: int = 1000, clip_denoised: bool = False,
                 objective: SpacedDiffusion | None = None):
        super().__init__(num_steps, spacing, learn_sigma, noise_schedule, diffusion_steps,
                         clip_denoised, objective)
        self.eta = eta

    def _loop(self, model, shape, x, model_kwargs, progress, generator):
        return self.diffusion.ddim_sample_loop(
            model, shape, noise=x, clip_denoised=self.clip_denoised, model_kwargs=model_kwargs,
            device=x.device, progress=progress, eta=self.eta, generator=generator,
        )


@SAMPLERS.register("ode")
class ODESampler(Sampler):
    """Flow-matching ODE sampling with torchdiffeq (SiT's defaults: atol 1e-6, rtol 1e-3).

    ``num_steps`` is the number of solver steps for fixed-grid methods (euler: 1 NFE per step,
    heun/midpoint: 2, rk4: 4); dopri5 ignores it and adapts its steps to atol/rtol.
    """

    trains_with = Transport

    def __init__(self, num_steps: int = 50, method: str = "euler", atol: float = 1e-6,
                 rtol: float = 1e-3, objective: Transport | None = None):
        resolve_ode_method(method)  # fail at construction, not mid-evaluation
        self.num_steps, self.method, self.atol, self.rtol = num_steps, method, atol, rtol
        self.transport = objective or Transport()

    def objective(self) -> Transport:
        return self.transport

    @property
    def planned_nfe(self) -> int | None:
        return self.num_steps if self.method == "euler" else None  # other solvers: stages per step vary

    def sample(self, model_fn, shape, model_kwargs=None, noise=None, device="cpu",
               progress=False, generator=None) -> Tensor:
        model = self._count(model_fn)
        x = self._initial_noise(shape, noise, device, generator)
        with _progress_bar(progress) as bar:
            return self.transport.sample_ode(
                _ticking(model, bar), x, num_steps=self.num_steps, method=self.method,
                atol=self.atol, rtol=self.rtol, model_kwargs=model_kwargs,
            )


def _progress_bar(enabled: bool):
    """A tqdm bar counting evaluations (adaptive solvers have no step count known up front)."""
    from tqdm.auto import tqdm

    return tqdm(unit="nfe", disable=not enabled)


def _ticking(model, bar):
    def call(x, t, **kwargs):
        bar.update()
        return model(x, t, **kwargs)

    return call
