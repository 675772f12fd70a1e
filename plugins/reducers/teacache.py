"""``teacache``: TeaCache (Liu et al. 2025, "Timestep Embedding Tells: It's Time to Cache for Video
Diffusion Model"), at the step hook.

Every evaluation computes block 0's timestep-modulated input (the *indicator*) and its relative L1
change to the previous evaluation's, ``|m_t - m_prev|_1 / |m_prev|_1``; a 4th-order polynomial fitted
for the model rescales that change into an estimate of the change of the backbone's output, and the
estimates accumulate. While the sum stays under ``threshold`` the backbone is skipped and the
residual it added at the last computed evaluation (output tokens minus input tokens) is added to the
current tokens instead; once it reaches the threshold the backbone runs and the sum restarts at 0.
The first and the last evaluation always compute (the last is known when the sampler plans its
evaluations; adaptive ODE solvers do not, so there only the first is forced). Rescaled changes are
clamped at 0 (a change cannot be negative), which makes a higher threshold never compute more on a
given sequence of changes.

Batches and guidance: the change is one number per evaluation, over the whole batch (as the original
does), so every sample and both CFG halves (which are one evaluation) skip or compute together.
Changing tokens (DC-DiT): the indicator and the residual are kept with their grid positions and read
back through the nearest stored token (`layout`).

Coefficients: ``dyncompute calibrate teacache RUN_DIR`` runs the model uncached (this reducer with
``calibrating = True``: it never skips and reports the change of the indicator and of the backbone's
output on the grid per evaluation), fits the polynomial with numpy and writes
``RUN_DIR/teacache.gin`` with the coefficients and the fingerprint of the weights they were fitted
on. Without coefficients the reducer refuses; with another model's fingerprint it refuses at the first
evaluation (``fingerprint = 'unchecked'`` borrows coefficients deliberately).

Accounting: the indicator (block 0's adaLN modulation and first norm, every evaluation) is reported as
work; a skipped evaluation costs the rest of the model plus the indicator.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dyncompute.errors import ConfigError
from dyncompute.flops import count_macs
from dyncompute.io import atomic_write_text
from dyncompute.reducer import Reducer, StepContext
from dyncompute.registry import REDUCERS
from dyncompute.tokens import Tokens

from .layout import Layout, mapped, read_rows

CALIBRATE = "dyncompute calibrate teacache RUN_DIR"
UNCHECKED = "unchecked"


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    current, previous = current.detach(), previous.detach()
    return float((current - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12))


def model_fingerprint(model: torch.nn.Module) -> str:
    """A digest of the weights (a strided sample of every floating tensor of the state dict)."""
    digest = hashlib.sha1()
    for name, value in sorted(model.state_dict().items()):
        if not value.is_floating_point():
            continue
        flat = value.detach().reshape(-1)
        digest.update(name.encode())
        digest.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def indicator(model, tokens: Tokens, c: torch.Tensor) -> torch.Tensor:
    """Block 0's adaLN-modulated attention input, packed (T, D)."""
    x = model.backbone.blocks[0].modulated_input(tokens.batched(), c, tokens)
    return x.reshape(-1, x.shape[-1])


@REDUCERS.register("teacache")
class TeaCache(Reducer):
    """Skip the backbone while the accumulated rescaled change of block 0's modulated input stays under
    ``threshold``; reuse the backbone's last residual meanwhile."""

    hook_points = ("step",)

    def __init__(self, threshold: float = 0.1, coefficients: Sequence[float] | None = None,
                 fingerprint: str | None = None, calibrating: bool = False):
        super().__init__()
        if not threshold >= 0:
            raise ConfigError(f"reducers.teacache.threshold must be >= 0, got {threshold!r}")
        if not calibrating:
            if coefficients is None:
                raise ConfigError(f"teacache needs rescaling coefficients fitted for this model: run `{CALIBRATE}` "
                                 "and include the gin file it writes (reducers.teacache.coefficients)")
            if len(coefficients) != 5:
                raise ConfigError(f"reducers.teacache.coefficients must be the 5 coefficients of a 4th-order "
                                 f"polynomial (highest power first), got {list(coefficients)}")
            if not fingerprint:
                raise ConfigError("reducers.teacache.fingerprint is missing: coefficients belong to the model they "
                                 f"were fitted on (`{CALIBRATE}` writes both); set it to '{UNCHECKED}' to use "
                                 "them on any model deliberately")
        self.threshold, self.fingerprint, self.calibrating = float(threshold), fingerprint, calibrating
        self.coefficients = None if coefficients is None else tuple(float(a) for a in coefficients)

    def new_cache(self) -> dict:
        return {"accumulated": 0.0}

    def rescaled(self, change: float) -> float:
        return max(0.0, float(np.polyval(self.coefficients, change)))

    def step(self, run, ctx: StepContext) -> torch.Tensor:
        cache = ctx.cache
        if cache is None:
            return run()
        self._check_fingerprint(ctx.model, cache)
        layout = Layout.of(ctx.tokens)
        now = indicator(ctx.model, ctx.tokens, ctx.c).detach()
        ctx.scratch["work"] = [[("indicator", (n,))] for n in ctx.tokens.lengths]
        change = None
        if "indicator" in cache:
            before, where = cache["indicator"]
            change = relative_l1(now, read_rows(before, mapped(where, layout, ctx.scratch)))
        cache["indicator"] = (now, layout)
        compute = self._decide(cache, change, ctx.step.is_last)
        ctx.scratch.update(computed=compute, input_change=change, accumulated=cache["accumulated"])
        if not compute:
            residual, where = cache["residual"]
            skipped = ctx.tokens.with_x(ctx.tokens.x + read_rows(residual, mapped(where, layout, ctx.scratch)))
            return ctx.to_grid(skipped)
        cache["accumulated"] = 0.0
        out = ctx.backbone(ctx.tokens)
        cache["residual"] = ((out.x - ctx.tokens.x).detach(), layout)
        grid = ctx.to_grid(out)
        if self.calibrating:
            ctx.scratch["output_change"] = relative_l1(grid, cache["grid"]) if "grid" in cache else None
            cache["grid"] = grid.detach()
        return grid

    def _decide(self, cache: dict, change: float | None, last: bool) -> bool:
        """Compute on the first and last evaluation, when calibrating, and once the sum reaches the threshold."""
        if change is None or last or self.calibrating or "residual" not in cache:
            return True
        cache["accumulated"] += self.rescaled(change)
        return cache["accumulated"] >= self.threshold

    def _check_fingerprint(self, model, cache: dict) -> None:
        if cache.get("checked") or self.calibrating or self.fingerprint == UNCHECKED:
            return
        mine = model_fingerprint(model)
        if mine != self.fingerprint:
            raise ConfigError(f"teacache coefficients were fitted for the model with fingerprint {self.fingerprint}, "
                             f"not this one ({mine}): run `{CALIBRATE}` for this model")
        cache["checked"] = True

    def report(self, cache, scratch: dict) -> dict:
        return {k: scratch[k] for k in ("computed", "input_change", "output_change", "accumulated", "work")
                if k in scratch}

    def work_macs(self, model, kind: str, size: tuple) -> int:
        if kind != "indicator":
            return super().work_macs(model, kind, size)
        n, width = size[0], model.config.hidden_size
        tokens = Tokens.from_lengths(torch.zeros(n, width), [n], torch.zeros(n, 2, dtype=torch.long))
        return count_macs(lambda x, c: indicator(model, tokens.with_x(x), c), tokens.x, torch.zeros(1, width),
                          owner=model)

    @classmethod
    def calibrate(cls, run_dir: str, out: str | None = None, sampler: str = "ddim", num_steps: int = 50,
                  num_samples: int = 16, cfg_scale: float = 1.0, seed: int = 0, weights: str = "ema",
                  bindings: Sequence[str] = (), clip_denoised: bool | None = None) -> dict:
        """Fit the rescaling polynomial on the run's own uncached trajectories; write it as a gin file."""
        model, reports = uncached_changes(run_dir, weights, bindings, sampler=sampler, num_steps=num_steps,
                                          num_samples=num_samples, batch_size=num_samples, cfg_scale=cfg_scale,
                                          seed=seed, clip_denoised=clip_denoised)
        pairs = [(r["input_change"], r["output_change"]) for r in reports
                 if r.get("input_change") is not None and r.get("output_change") is not None]
        if len(pairs) < 5:
            raise ConfigError(f"only {len(pairs)} consecutive evaluations to fit 5 coefficients: sample more steps")
        x, y = np.array(pairs).T
        coefficients = np.polyfit(x, y, 4)
        rms = float(np.sqrt(np.mean((np.polyval(coefficients, x) - y) ** 2)))
        fingerprint = model_fingerprint(model)
        path = Path(out) if out else Path(run_dir) / "teacache.gin"
        text = "\n".join([
            "# TeaCache rescaling polynomial (relative L1 change of block 0's modulated input -> of the backbone's",
            f"# output on the grid), fitted by `dyncompute calibrate teacache` on {len(pairs)} consecutive",
            f"# evaluations of {num_samples} samples ({sampler}-{num_steps}, cfg {cfg_scale:g}, seed {seed}) of the",
            f"# {weights} weights of {run_dir}. Input change range [{x.min():.4g}, {x.max():.4g}], output change",
            f"# range [{y.min():.4g}, {y.max():.4g}], fit RMS {rms:.3g}.",
            f"reducers.teacache.coefficients = [{', '.join(repr(float(a)) for a in coefficients)}]",
            f"reducers.teacache.fingerprint = '{fingerprint}'",
        ]) + "\n"
        atomic_write_text(text, path)
        return {"gin": str(path), "coefficients": coefficients.tolist(), "pairs": len(pairs), "fit_rms": rms,
                "fingerprint": fingerprint}


def uncached_changes(run_dir: str, weights: str, bindings: Sequence[str], **generate_kwargs):
    """The run's model (EMA weights by default) sampled with teacache calibrating: (model, each
    evaluation's teacache report)."""
    from dyncompute.engine import run_objective
    from dyncompute.runs import load_run
    from dyncompute.sampling import generate

    model = load_run(run_dir, weights, bindings=[*bindings, "DiffusionTransformer.reducers = ['teacache']",
                                                 "reducers.teacache.calibrating = True"])
    reports = []
    generate(model, observers=[lambda ev: reports.append(ev.info.reducers["teacache"])],
             objective=run_objective(run_dir), **generate_kwargs)
    return model, reports
