"""Discrete-time Gaussian diffusion (DDPM, Ho et al. 2020; IDDPM, Nichol & Dhariwal 2021).

Numerically this follows facebookresearch/DiT ``diffusion/gaussian_diffusion.py`` so official DiT
checkpoints train and sample identically: schedules are built in float64 numpy, gathered per
timestep and only then cast to float32; random draws happen in the same order as DiT's.

Only ε-prediction is supported (DiT's only mode). The variance is either learned in the
IDDPM "learned range" parametrisation (the model returns 2C channels: ε and v) or fixed.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

VAR_TYPES = ("learned_range", "fixed_small", "fixed_large")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")


# --------------------------------------------------------------------------------------------
# Elementwise helpers


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every non-batch dimension: per-sample losses, shape (B,)."""
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    tensor = next(a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, Tensor))
    logvar1, logvar2 = (
        v if isinstance(v, Tensor) else torch.tensor(v).to(tensor) for v in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of Φ used by DDPM's decoder (kept for bit-compatibility)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """log p(x) for data in [-1, 1] quantised to 256 bins (DDPM's L_0 decoder term), in nats.

    The edge bins absorb the tails, so x = ±1 gets the mass of (-∞, -1+1/255] / [1-1/255, ∞).
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


# --------------------------------------------------------------------------------------------
# Noise schedules


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """β_1..β_T in float64. "linear" is DDPM's, stretched so any T has the same endpoints' scale."""
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(
            num_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise ValueError(f"unknown noise schedule {name!r}; known: linear, squaredcos_cap_v2")


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float], max_beta=0.999):
    """Discretise a continuous ᾱ(t), t ∈ [0, 1], into betas (IDDPM's cosine schedule)."""
    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.array(betas, dtype=np.float64)


# --------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """Forward process q, reverse process p_θ, the hybrid IDDPM loss and DDPM/DDIM samplers.

    ``model(x_t, t, **model_kwargs)`` receives integer timesteps t ∈ [0, T) and returns ε
    (C channels) or ε and v (2C channels) when ``var_type == "learned_range"``.
    """


    def __init__(self, *, betas, var_type: str = "learned_range", loss_type: str = "mse"):
        if var_type not in VAR_TYPES:
            raise ValueError(f"unknown var_type {var_type!r}; known: {', '.join(VAR_TYPES)}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; known: {', '.join(LOSS_TYPES)}")
        self.var_type, self.loss_type = var_type, loss_type
        self.betas = betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.num_timesteps = len(betas)
        self._init_tables(betas)
        self._device_cache: dict = {}

    @property
    def learn_sigma(self) -> bool:
        return self.var_type == "learned_range"

    def _init_tables(self, betas: np.ndarray) -> None:
        """Every per-timestep coefficient, in float64 (DDPM eqs. 4, 6, 7)."""
        alphas = 1.0 - betas
        acp = self.alphas_cumprod = np.cumprod(alphas)
        acp_prev = self.alphas_cumprod_prev = np.append(1.0, acp[:-1])
        self.alphas_cumprod_next = np.append(acp[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(acp)
        self.one_minus_alphas_cumprod = 1.0 - acp
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - acp)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1)
        # Posterior q(x_{t-1} | x_t, x_0). Its variance is 0 at t = 0, so the log is clipped
        # by repeating the t = 1 value there.
        self.posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = (
            np.log(np.append(pv[1], pv[1:])) if len(pv) > 1 else np.array([])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(acp_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)
        self.log_betas = np.log(betas)
        # "fixed_large" uses β_t, except σ_0² = β̃_1 for a better decoder likelihood.
        self.large_variance = np.append(pv[1], betas[1:]) if len(pv) > 1 else betas.copy()
        self.log_large_variance = np.log(self.large_variance)

    def _extract(self, name: str, t: Tensor, shape) -> Tensor:
        """Gather table[t] in float64, cast to float32, broadcast to ``shape`` (as DiT does)."""
        key = (name, t.device)
        if key not in self._device_cache:
            self._device_cache[key] = torch.from_numpy(getattr(self, name)).to(t.device)
        out = self._device_cache[key][t].float()
        return out.view(-1, *([1] * (len(shape) - 1))).expand(shape)

    def _wrap_model(self, model):
        """Hook for respacing: the un-spaced diffusion passes timesteps through unchanged."""
        return model

    def sample_timesteps(self, n: int, device="cpu", generator=None) -> Tensor:
        """Uniform training timesteps in [0, T), as DiT's train.py draws them."""
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)

    # ---------------------------------------------------------------------------- forward q

    def q_mean_variance(self, x_start: Tensor, t: Tensor):
        """q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I): (mean, variance, log_variance)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) with the reparametrisation √ᾱ_t x_0 + √(1 − ᾱ_t) ε."""
        if noise is None:
            noise = torch.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor):
        """q(x_{t-1} | x_t, x_0) = N(μ̃, β̃_t I): (mean, variance, clipped log variance)."""
        assert x_start.shape == x_t.shape
        shape = x_t.shape
        mean = (
            self._extract("posterior_mean_coef1", t, shape) * x_start
            + self._extract("posterior_mean_coef2", t, shape) * x_t
        )
        variance = self._extract("posterior_variance", t, shape)
        log_variance = self._extract("posterior_log_variance_clipped", t, shape)
        return mean, variance, log_variance

    # ---------------------------------------------------------------------------- reverse p

    def _predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        assert x_t.shape == eps.shape
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def _predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape)

    def _model_log_variance(self, var_values: Tensor | None, t: Tensor, shape):
        """(variance, log variance) of p_θ(x_{t-1} | x_t).

        Learned range (IDDPM eq. 15): v ∈ [-1, 1] interpolates log β̃_t (v = −1) and
        log β_t (v = 1).
        """
        if self.var_type == "learned_range":
            min_log = self._extract("posterior_log_variance_clipped", t, shape)
            max_log = self._extract("log_betas", t, shape)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            return torch.exp(log_variance), log_variance
        if self.var_type == "fixed_large":
            names = ("large_variance", "log_large_variance")
        else:
            names = ("posterior_variance", "posterior_log_variance_clipped")
        return tuple(self._extract(n, t, shape) for n in names)

    def _split_output(self, output: Tensor, x: Tensor):
        """Model output → (ε, v or None), checking the channel count matches var_type."""
        B, C = x.shape[:2]
        if self.learn_sigma:
            if output.shape != (B, 2 * C, *x.shape[2:]):
                raise ValueError(
                    f"learned-sigma diffusion expects {2 * C} output channels (ε and v) "
                    f"for input {tuple(x.shape)}, got {tuple(output.shape)}"
                )
            return torch.split(output, C, dim=1)
        if output.shape != x.shape:
            raise ValueError(f"model output {tuple(output.shape)} != input {tuple(x.shape)}")
        return output, None

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Run the model once: mean/variance of p_θ(x_{t-1} | x_t) and the implied x̂_0."""
        model = self._wrap_model(model)
        assert t.shape == (x.shape[0],)
        output = model(x, t, **(model_kwargs or {}))
        output, extra = output if isinstance(output, tuple) else (output, None)
        eps, var_values = self._split_output(output, x)
        variance, log_variance = self._model_log_variance(var_values, t, x.shape)
        pred_xstart = self._predict_xstart_from_eps(x, t, eps)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "extra": extra,
        }

    # ---------------------------------------------------------------------------- losses

    def vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One VLB term in bits/dim: KL(q(x_{t-1}|x_t,x_0) ‖ p_θ) for t > 0, −log p_θ(x_0|x_1) at 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        nll = mean_flat(nll) / math.log(2.0)
        return {"output": torch.where(t == 0, nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None) -> dict:
        """Per-sample losses: {"loss", "mse"[, "vb"]}, each (B,).

        With a learned variance the loss is IDDPM's hybrid L_simple + L_vlb, where L_vlb sees a
        detached ε so that it only trains the variance head (DiT uses exactly this, unscaled).
        """
        model_kwargs = model_kwargs or {}
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise=noise)
        model = self._wrap_model(model)
        if self.loss_type in ("kl", "rescaled_kl"):
            loss = self.vb_terms_bpd(model, x_start, x_t, t, False, model_kwargs)["output"]
            scale = self.num_timesteps if self.loss_type == "rescaled_kl" else 1
            return {"loss": loss * scale}
        output = model(x_t, t, **model_kwargs)
        eps, var_values = self._split_output(output, x_t)
        terms = {"mse": mean_flat((noise - eps) ** 2)}
        if var_values is not None:
            frozen = torch.cat([eps.detach(), var_values], dim=1)
            vb = self.vb_terms_bpd(lambda *a, **k: frozen, x_start, x_t, t, False)["output"]
            if self.loss_type == "rescaled_mse":
                vb = vb * (self.num_timesteps / 1000.0)
            terms["vb"] = vb
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # ---------------------------------------------------------------------------- sampling

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                 generator=None) -> dict:
        """Ancestral step x_t → x_{t-1} ~ p_θ (no noise added at t = 0)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = _randn_like(x, generator)
        nonzero = _nonzero_mask(t, x)
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                    eta=0.0, generator=None) -> dict:
        """DDIM step (Song et al. 2021, eq. 12); η = 0 is deterministic, η = 1 is DDPM-like."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        per_sample = (len(t),) + (1,) * (x.ndim - 1)  # coefficients stay per sample; the products broadcast
        abar = self._extract("alphas_cumprod", t, per_sample)
        abar_prev = self._extract("alphas_cumprod_prev", t, per_sample)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = (
            out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
        )
        if eta == 0:  # deterministic: the noise would be multiplied by 0, so none is drawn
            return {"sample": mean, "pred_xstart": out["pred_xstart"]}
        noise = _randn_like(x, generator)
        sample = mean + _nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                      model_kwargs=None, device=None, progress=False, generator=None) -> Tensor:
        """Ancestral sampling over all (possibly respaced) steps, T−1 → 0."""
        step = lambda x, t: self.p_sample(  # noqa: E731
            model, x, t, clip_denoised, denoised_fn, model_kwargs, generator
        )
        return _last(self._loop(step, model, shape, noise, device, progress, generator))

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0,
                         generator=None) -> Tensor:
        """DDIM sampling over all (possibly respaced) steps, T−1 → 0."""
        step = lambda x, t: self.ddim_sample(  # noqa: E731
            model, x, t, clip_denoised, denoised_fn, model_kwargs, eta, generator
        )
        return _last(self._loop(step, model, shape, noise, device, progress, generator))

    def _loop(self, step, model, shape, noise, device, progress, generator) -> Iterator[dict]:
        """Shared reverse-time loop; yields each step's output dict."""
        device = _infer_device(model, noise, device)
        if noise is not None:
            x = noise
        elif generator is None:
            x = torch.randn(*shape, device=device)
        else:
            x = torch.randn(*shape, device=device, generator=generator)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        for i in indices:
            t = torch.tensor([i] * x.shape[0], device=device)
            with torch.no_grad():
                out = step(x, t)
            yield out
            x = out["sample"]


def _randn_like(x: Tensor, generator) -> Tensor:
    if generator is None:
        return torch.randn_like(x)  # DiT's draw, so seeded runs match it
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _nonzero_mask(t: Tensor, x: Tensor) -> Tensor:
    return (t != 0).float().view(-1, *([1] * (x.ndim - 1)))


def _infer_device(model, noise, device):
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    params = getattr(model, "parameters", None)
    first = next(params(), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


def _last(outs: Iterator[dict]) -> Tensor:
    out = None
    for out in outs:  # noqa: B007  (only the last step's output is wanted)
        pass
    return out["sample"]
