"""Timestep respacing (IDDPM §4): sample a T-step model with a subset of its timesteps.

A respaced process keeps ᾱ at the kept steps and recomputes β between them, so it is a valid
shorter diffusion. The model is always called with the *original* timestep indices, exactly like
facebookresearch/DiT ``diffusion/respace.py``.
"""
from __future__ import annotations

import numpy as np
import torch

from .gaussian import GaussianDiffusion, get_named_beta_schedule


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """Which of ``num_timesteps`` original steps to keep.

    ``section_counts`` is
      * ``"ddimN"``: N steps with one integer stride, ``range(0, T, stride)`` (DDIM's spacing);
      * ``"N"`` or ``"N1,N2,..."``: split [0, T) into equal sections and take N_i evenly spaced
        (fractional stride, rounded) steps from section i — DiT's ``"250"``;
      * a list/tuple of ints with the same meaning, an int, or ``""``/None for all steps.
    """
    counts = _parse_section_counts(num_timesteps, section_counts)
    if isinstance(counts, set):
        return counts
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        steps += _fractional_stride(start, stride, count)
        start += size
    return set(steps)


def _fractional_stride(start: int, stride: float, count: int) -> list[int]:
    """Accumulate the float index (not ``stride * j``) so rounding matches DiT bit for bit."""
    idx, out = 0.0, []
    for _ in range(count):
        out.append(start + round(idx))
        idx += stride
    return out


def _parse_section_counts(num_timesteps: int, spec):
    """Normalise a respacing spec to a list of section counts (or a final set for "ddimN")."""
    if spec is None or spec == "":
        return [num_timesteps]
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, str):
        spec = spec.strip()
        if spec.startswith("ddim"):
            return _ddim_steps(num_timesteps, _parse_int(spec[4:], spec))
        spec = [_parse_int(part, spec) for part in spec.split(",")]
    counts = list(spec)
    if not counts or any(int(c) != c or c < 1 for c in counts):
        raise ValueError(f"respacing section counts must be positive integers, got {spec!r}")
    return [int(c) for c in counts]


def _parse_int(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"bad timestep respacing {spec!r}; expected e.g. '250', 'ddim50', '10,20' or ''"
        ) from None


def _ddim_steps(num_timesteps: int, count: int) -> set[int]:
    """The integer stride that gives exactly ``count`` steps from 0."""
    if count < 1:
        raise ValueError(f"ddim respacing needs a positive step count, got {count}")
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == count:
            return set(range(0, num_timesteps, stride))
    if count == 1:  # only reachable when num_timesteps == 1
        return {0}
    raise ValueError(
        f"cannot create exactly {count} steps out of {num_timesteps} with an integer stride"
    )


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over a subset of the base steps; the model sees original indices."""

    def __init__(self, use_timesteps, *, betas, **kwargs):
        self.base_betas = np.asarray(betas, dtype=np.float64)
        base_alphas_cumprod = np.cumprod(1.0 - self.base_betas)
        self.use_timesteps = set(use_timesteps)
        self.timestep_map: list[int] = []
        self.original_num_steps = len(base_alphas_cumprod)
        new_betas, last = [], 1.0
        for i, abar in enumerate(base_alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - abar / last)  # so that ᾱ is unchanged at kept steps
                last = abar
                self.timestep_map.append(i)
        super().__init__(betas=np.array(new_betas), **kwargs)

    def respace(self, timestep_respacing: str) -> SpacedDiffusion:
        """The same diffusion (schedule, variance, loss) over other steps, e.g. ``"250"`` or ``"ddim50"``."""
        return SpacedDiffusion(space_timesteps(self.original_num_steps, timestep_respacing), betas=self.base_betas,
                               var_type=self.var_type, loss_type=self.loss_type)

    def _wrap_model(self, model):
        if isinstance(model, _OriginalTimesteps):
            return model
        return _OriginalTimesteps(model, self.timestep_map)


class _OriginalTimesteps:
    """Calls ``model`` with respaced indices mapped back to original timesteps."""

    def __init__(self, model, timestep_map):
        self.model, self.timestep_map = model, timestep_map

    def __call__(self, x, ts, **kwargs):
        table = torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        return self.model(x, table[ts], **kwargs)


def create_diffusion(
    timestep_respacing="",
    *,
    noise_schedule: str = "linear",
    learn_sigma: bool = True,
    diffusion_steps: int = 1000,
    sigma_small: bool = False,
    use_kl: bool = False,
    rescale_learned_sigmas: bool = False,
) -> SpacedDiffusion:
    """DiT's ``create_diffusion``: ε-prediction, learned-range σ, hybrid loss by default.

    ``timestep_respacing=""`` trains on all ``diffusion_steps``; ``"250"``/``"ddim50"`` sample.
    Without ``learn_sigma`` the variance is fixed: β_t (large) or β̃_t (``sigma_small``).
    """
    if use_kl:
        loss_type = "rescaled_kl"
    else:
        loss_type = "rescaled_mse" if rescale_learned_sigmas else "mse"
    if learn_sigma:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if sigma_small else "fixed_large"
    return SpacedDiffusion(
        space_timesteps(diffusion_steps, timestep_respacing),
        betas=get_named_beta_schedule(noise_schedule, diffusion_steps),
        var_type=var_type,
        loss_type=loss_type,
    )
