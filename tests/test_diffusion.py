"""Gaussian diffusion (DiT semantics), respacing, flow matching and the sampler plugins."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dyncompute import registry
from dyncompute.diffusion import (
    Transport,
    create_diffusion,
    get_named_beta_schedule,
    make_objective,
    samplers,  # noqa: F401  (registers ddpm/ddim/ode)
    space_timesteps,
)
from dyncompute.diffusion.gaussian import discretized_gaussian_log_likelihood, normal_kl
from dyncompute.diffusion.samplers import DDIMSampler, DDPMSampler, ODESampler
from dyncompute.errors import ConfigError
from dyncompute.registry import SAMPLERS

T = 1000
SHAPE = (3, 2, 4, 4)


def ho_betas(steps=T):
    """DDPM's linear schedule, written out independently of the package."""
    return np.linspace(1e-4 * 1000 / steps, 2e-2 * 1000 / steps, steps)


def ho_alphas_cumprod(steps=T):
    return np.cumprod(1.0 - ho_betas(steps))


def gather(arr, t, ndim=4):
    return torch.tensor(arr)[t].float().view(-1, *([1] * (ndim - 1)))


def eps_oracle(x0, learn_sigma=True):
    """ε-model that knows the single data point x0: ε = (x_t − √ᾱ_t x0) / √(1 − ᾱ_t)."""
    abar = ho_alphas_cumprod()

    def model(x, t, **_):
        a = gather(abar, t)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learn_sigma else eps

    return model


@pytest.fixture
def x0():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)


@pytest.fixture
def noise():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------ schedule and q


def test_linear_schedule_matches_dit():
    np.testing.assert_array_equal(get_named_beta_schedule("linear", T), ho_betas())
    d = create_diffusion("")  # like DiT, re-derives β from ᾱ even when keeping every step
    assert d.betas.dtype == np.float64 and len(d.betas) == T
    np.testing.assert_allclose(d.betas, ho_betas(), rtol=1e-11)
    assert d.alphas_cumprod[-1] == pytest.approx(4.0358e-5, rel=1e-4)
    assert d.timestep_map == list(range(T))
    assert d.learn_sigma and d.loss_type == "mse"


def test_q_sample_closed_form(x0, noise):
    d = create_diffusion("")
    t = torch.tensor([0, 500, 999])
    a = gather(ho_alphas_cumprod(), t)
    expected = a.sqrt() * x0 + (1 - a).sqrt() * noise
    torch.testing.assert_close(d.q_sample(x0, t, noise=noise), expected)
    mean, var, log_var = d.q_mean_variance(x0, t)
    torch.testing.assert_close(mean, a.sqrt() * x0)
    torch.testing.assert_close(var, (1 - a).expand_as(x0))
    log_1m_a = gather(np.log(1 - ho_alphas_cumprod()), t)  # float64 first: ᾱ_0 ≈ 1
    torch.testing.assert_close(log_var, log_1m_a.expand_as(x0))


def test_posterior_closed_form(x0, noise):
    d = create_diffusion("")
    betas, abar = ho_betas(), ho_alphas_cumprod()
    abar_prev = np.append(1.0, abar[:-1])
    tilde_beta = betas * (1 - abar_prev) / (1 - abar)
    coef1 = np.sqrt(abar_prev) * betas / (1 - abar)
    coef2 = np.sqrt(1 - betas) * (1 - abar_prev) / (1 - abar)
    t = torch.tensor([0, 1, 700])
    x_t = d.q_sample(x0, t, noise=noise)
    mean, var, log_var = d.q_posterior_mean_variance(x0, x_t, t)
    torch.testing.assert_close(mean, gather(coef1, t) * x0 + gather(coef2, t) * x_t)
    torch.testing.assert_close(var, gather(tilde_beta, t).expand_as(x0))
    assert var[0].abs().max() == 0  # β̃_0 = 0 ...
    clipped = np.log(np.append(tilde_beta[1], tilde_beta[1:]))
    torch.testing.assert_close(log_var, gather(clipped, t).expand_as(x0))  # ... so log is clipped


# ------------------------------------------------------------------------------ p and the VLB


def test_normal_kl_hand_computed():
    # KL(N(0, 1) || N(1, 2²)) = log 2 + (1 + 1) / (2·4) − 1/2
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), math.log(4.0))
    assert kl.item() == pytest.approx(math.log(2.0) - 0.25, abs=1e-6)
    same = normal_kl(torch.tensor(0.3), torch.tensor(-1.0), torch.tensor(0.3), torch.tensor(-1.0))
    assert same.item() == pytest.approx(0.0, abs=1e-7)


def _phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_discretized_likelihood_known_values():
    sigma = 0.01
    log_scales = torch.full((3,), math.log(sigma))
    x = torch.tensor([0.0, 1.0, -1.0])
    means = torch.tensor([0.0, 1.0, 0.99])
    got = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    half_bin = 1 / 255
    expected = [
        math.log(_phi(half_bin / sigma) - _phi(-half_bin / sigma)),  # interior bin
        math.log(1 - _phi(-half_bin / sigma)),  # top bin absorbs [1 − 1/255, ∞)
        math.log(_phi((-1 + half_bin - 0.99) / sigma) + 1e-12),  # far tail, clamped at 1e-12
    ]
    torch.testing.assert_close(got, torch.tensor(expected), atol=2e-3, rtol=1e-3)


def test_learned_range_interpolates_log_variance(x0):
    d = create_diffusion("")
    t = torch.tensor([10, 10, 10])
    v = torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1).expand_as(x0)
    out = d.p_mean_variance(lambda x, t: torch.cat([torch.zeros_like(x), v], 1), x0, t)
    lo, hi = math.log(d.posterior_variance[10]), math.log(d.betas[10])
    got = out["log_variance"][:, 0, 0, 0]
    torch.testing.assert_close(got, torch.tensor([lo, (lo + hi) / 2, hi]).float())


def test_exact_posterior_gives_zero_kl_and_mse(x0, noise):
    """ε = the true noise and v = −1 (β̃_t) make p_θ equal the true posterior."""
    d = create_diffusion("")
    model = lambda x, t: torch.cat([noise, -torch.ones_like(noise)], 1)  # noqa: E731
    t = torch.tensor([1, 400, 999])
    losses = d.training_losses(model, x0, t, noise=noise)
    assert set(losses) == {"loss", "mse", "vb"}
    assert losses["mse"].abs().max() < 1e-10
    assert losses["vb"].abs().max() < 1e-5
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])


def test_t0_term_is_decoder_nll(x0, noise):
    """At t = 0 the VLB term is −log p(x_0 | x_1) in bits/dim, with mean exactly x_0."""
    d = create_diffusion("")
    x0 = torch.round(x0 * 127.5) / 127.5  # on the 8-bit grid
    model = lambda x, t: torch.cat([noise, -torch.ones_like(noise)], 1)  # noqa: E731
    t = torch.zeros(SHAPE[0], dtype=torch.long)
    x_t = d.q_sample(x0, t, noise=noise)
    out = d.vb_terms_bpd(model, x0, x_t, t, clip_denoised=False)["output"]
    sigma = math.sqrt(d.posterior_variance[1])  # clipped σ_0² = β̃_1
    per_pixel = []
    for xv in x0.flatten().tolist():
        if xv > 0.999:
            p = 1 - _phi(-1 / 255 / sigma)
        elif xv < -0.999:
            p = _phi(1 / 255 / sigma)
        else:
            p = _phi(1 / 255 / sigma) - _phi(-1 / 255 / sigma)
        per_pixel.append(-math.log(p) / math.log(2))
    expected = torch.tensor(per_pixel).view(SHAPE).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out, expected, atol=5e-3, rtol=5e-3)


def test_vb_term_only_trains_the_variance(x0, noise):
    """DiT's hybrid loss detaches ε inside L_vlb: only L_simple reaches the ε channels."""
    d = create_diffusion("")
    out = torch.randn(SHAPE[0], 2 * SHAPE[1], *SHAPE[2:], requires_grad=True)
    losses = d.training_losses(lambda x, t: out, x0, torch.tensor([3, 300, 900]), noise=noise)
    (grad,) = torch.autograd.grad(losses["vb"].sum(), out)
    assert grad[:, : SHAPE[1]].abs().max() == 0
    assert grad[:, SHAPE[1]:].abs().max() > 0


def test_fixed_sigma_is_plain_mse(x0, noise):
    d = create_diffusion("", learn_sigma=False)
    assert d.var_type == "fixed_large"
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    t = torch.tensor([0, 5, 9])
    losses = d.training_losses(zero, x0, t, noise=noise)
    assert set(losses) == {"loss", "mse"}
    torch.testing.assert_close(losses["loss"], (noise**2).mean(dim=(1, 2, 3)))
    log_var = d.p_mean_variance(zero, x0, t)["log_variance"][:, 0, 0, 0]
    expected = np.log([d.posterior_variance[1], d.betas[5], d.betas[9]])
    torch.testing.assert_close(log_var, torch.tensor(expected).float())
    small = create_diffusion("", learn_sigma=False, sigma_small=True)
    assert small.var_type == "fixed_small"


def test_wrong_channel_count_is_a_clear_error(x0):
    with pytest.raises(ValueError, match="expects 4 output channels"):
        create_diffusion("").training_losses(lambda x, t: x, x0, torch.tensor([1, 2, 3]))


def test_sample_timesteps_uniform_ints():
    g = torch.Generator().manual_seed(0)
    t = create_diffusion("").sample_timesteps(4096, "cpu", generator=g)
    assert t.dtype == torch.long and t.min() >= 0 and t.max() < T
    assert len(t.unique()) > 900


# ------------------------------------------------------------------------------ respacing


def test_space_timesteps_forms():
    assert sorted(space_timesteps(T, "ddim50")) == list(range(0, T, 20))
    steps = sorted(space_timesteps(T, "250"))
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == T - 1
    two = sorted(space_timesteps(T, "10,20"))
    assert len(two) == 30 and sum(s < 500 for s in two) == 10
    assert space_timesteps(T, "") == set(range(T))
    assert space_timesteps(T, [T]) == set(range(T))


@pytest.mark.parametrize("spec", ["abc", "ddimX", "ddim999", "0", "2000", "10,,20", "-5", "ddim0"])
def test_bad_respacing_raises(spec):
    with pytest.raises(ValueError):
        space_timesteps(T, spec)


def test_respaced_alphas_cumprod_match_original():
    base, spaced = create_diffusion(""), create_diffusion("250")
    assert spaced.num_timesteps == 250 and spaced.original_num_steps == T
    np.testing.assert_allclose(
        spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-12
    )


def test_respaced_model_sees_original_timesteps(x0):
    seen = []
    d = create_diffusion("ddim10")
    model = lambda x, t: (seen.append(t.tolist()), torch.zeros(3, 4, 4, 4))[1]  # noqa: E731
    d.p_mean_variance(model, x0, torch.tensor([0, 5, 9]))
    assert seen == [[0, 500, 900]]


# ------------------------------------------------------------------------------ DDPM / DDIM


def test_ddim_eta0_is_deterministic(x0, noise):
    model = lambda x, t: torch.cat([0.5 * x, torch.zeros_like(x)], 1)  # noqa: E731
    sampler = DDIMSampler(num_steps=10, eta=0.0)
    a = sampler.sample(model, SHAPE, noise=noise, generator=torch.Generator().manual_seed(1))
    b = sampler.sample(model, SHAPE, noise=noise, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("cls, steps", [(DDIMSampler, 50), (DDPMSampler, 25)])
def test_oracle_model_recovers_x0(cls, steps, x0):
    sampler = cls(num_steps=steps)
    out = sampler.sample(eps_oracle(x0), SHAPE, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    assert sampler.nfe == steps == len(sampler.timesteps_seen)
    respacing = f"ddim{steps}" if cls is DDIMSampler else str(steps)
    assert sampler.timesteps_seen == sorted(space_timesteps(T, respacing), reverse=True)


@pytest.mark.parametrize("cls", [DDIMSampler, DDPMSampler])
@pytest.mark.parametrize("steps", [1, 0, 2.5])
def test_gaussian_samplers_need_two_steps(cls, steps):
    """One step has no posterior variance: it failed deep in the schedule with an IndexError."""
    with pytest.raises(ConfigError, match="num_steps >= 2"):
        cls(num_steps=steps)
    cls(num_steps=2).sample(lambda x, t: torch.zeros(*x.shape[:1], 2 * x.shape[1], *x.shape[2:]), SHAPE)


def test_sampler_passes_model_kwargs_and_recounts(x0):
    calls = []

    def model(x, t, y=None):
        calls.append(y)
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    sampler = DDPMSampler(num_steps=4)
    sampler.sample(model, SHAPE, model_kwargs={"y": 7})
    sampler.sample(model, SHAPE, model_kwargs={"y": 7})
    assert calls == [7] * 8 and sampler.nfe == 4


# ------------------------------------------------------------------------------ flow matching


def test_transport_path_and_loss(x0, noise):
    tr = Transport()
    t = torch.tensor([0.0, 0.5, 1.0])
    x_t, u = tr.interpolate(x0, noise, t)
    torch.testing.assert_close(x_t[0], noise[0])
    torch.testing.assert_close(x_t[2], x0[2])
    torch.testing.assert_close(u, x0 - noise)
    oracle = lambda x, t: x0 - noise  # noqa: E731
    assert tr.training_losses(oracle, x0, t, noise=noise)["loss"].abs().max() < 1e-12
    ts = tr.sample_timesteps(1000, "cpu", generator=torch.Generator().manual_seed(0))
    assert ts.dtype == torch.float32 and 0 <= ts.min() and ts.max() < 1


def gaussian_target_velocity(m, s):
    """Exact marginal velocity for data N(m, s²I): x_t = t·m + σ_t z, σ_t² = t²s² + (1−t)²."""

    def model(x, t, **_):
        assert t.dtype.is_floating_point and 0 <= t.min() and t.max() <= 1
        t = t.view(-1, 1, 1, 1)
        var = t**2 * s**2 + (1 - t) ** 2
        return m + (t * s**2 - (1 - t)) / var * (x - t * m)

    return model


@pytest.mark.parametrize(
    "method, steps, kw, tol, nfe",
    [
        ("euler", 100, {}, 0.03, 100),
        ("heun", 50, {}, 5e-3, 100),
        ("dopri5", 0, {"atol": 1e-7, "rtol": 1e-6}, 1e-3, None),
    ],
)
def test_ode_oracle_reaches_target(method, steps, kw, tol, nfe, noise):
    """A near-point target N(m, 0.1²): the ODE maps noise z to m + 0.1·z."""
    m = torch.full(SHAPE, 0.7)
    sampler = ODESampler(num_steps=steps, method=method, **kw)
    out = sampler.sample(gaussian_target_velocity(m, 0.1), SHAPE, noise=noise)
    torch.testing.assert_close(out, m + 0.1 * noise, atol=tol, rtol=0)
    assert sampler.nfe == len(sampler.timesteps_seen) > 0
    if nfe is not None:
        assert sampler.nfe == nfe
    assert sampler.timesteps_seen[0] == 0.0


def test_ode_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match="euler.*heun.*dopri5"):
        ODESampler(method="leapfrog")


def test_transport_drops_learned_sigma_half(x0, noise):
    model = lambda x, t: torch.cat([x0 - noise, torch.full_like(x0, 9.0)], 1)  # noqa: E731
    losses = Transport().training_losses(model, x0, torch.rand(SHAPE[0]), noise=noise)
    assert losses["loss"].abs().max() < 1e-12


# ------------------------------------------------------------------------------ registry


def test_registry_builds_samplers_and_lists_names(monkeypatch):
    # Only this package's registrations matter here; don't import other plugins.
    monkeypatch.setattr(registry, "_plugins_loaded", True)
    assert {"ddpm", "ddim", "ode"} <= set(SAMPLERS.names())
    with pytest.raises(registry.UnknownPluginError, match="ddim, ddpm.*ode"):
        SAMPLERS.get("nope")
    ddim = SAMPLERS.build("ddim", num_steps=5, eta=0.5)
    assert isinstance(ddim, DDIMSampler) and ddim.diffusion.num_timesteps == 5
    assert ddim.objective().num_timesteps == T and isinstance(ddim.objective(), ddim.trains_with)
    assert isinstance(SAMPLERS.build("ode").objective(), Transport)


def test_make_objective():
    assert make_objective("gaussian").num_timesteps == T
    assert make_objective("gaussian", learn_sigma=False).var_type == "fixed_large"
    assert isinstance(make_objective("flow"), Transport)
    with pytest.raises(ValueError, match="gaussian, flow"):
        make_objective("score")


def test_sampler_arguments_are_gin_bindable():
    import gin

    try:
        gin.parse_config("samplers.ddim.num_steps = 7\nsamplers.ode.method = 'heun'")
        assert DDIMSampler().num_steps == 7 and SAMPLERS.build("ode").method == "heun"
    finally:
        gin.clear_config()
