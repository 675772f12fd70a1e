"""Reducer benchmarks, registered as `dyncompute bench` cases (subject and reference interleaved, medians):

- ``tome_attention``: ToMe r = 0.5 on an attention-heavy patchify model (P = 1 on 32x32, D = 128) vs the
  same weights without it, one forward; target: speed-up >= 0.7 x the useful-MAC reduction.
- ``fora_ddim50``, ``taylorseer_ddim50``: FORA interval 2 and TaylorSeer interval 3 on the trained
  quickstart DiT/2, whole DDIM-50 sampling calls of 32 images vs uncached; target: speed-up >= 0.9 x the per-image
  MAC reduction; the row also gives the mean squared difference of the final samples to the uncached
  ones (same seed, pixels in [-1, 1]). They sample the DiT/2 that the reducer sweep trained
  (``dyncompute sweep experiments/sweeps/reducers.gin --out runs/reducers``), or ``--arg run=RUN_DIR``.
- ``taylorseer_reuse_ddim50``: TaylorSeer's schedule at order 0 (reuse, no forecast): the ceiling of
  ``taylorseer_ddim50``'s ratio on this model.
- ``dcdit_tome``: DC-DiT (N = 4) + ToMe r = 0.5 vs DC-DiT alone, one forward; target: faster.

    dyncompute bench tome_attention fora_ddim50 taylorseer_ddim50 taylorseer_reuse_ddim50 dcdit_tome
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dyncompute.bench import BenchPair, Timed, register_case
from dyncompute.errors import UserError
from dyncompute.flops import count_forward
from dyncompute.model import DiffusionTransformer

from .variants import load_variant, sampling_call, trajectory_macs

BATCH = 8


def _forward_pair(case: str, make, reducers: list, batch: int, target: str, check, label: str) -> list[BenchPair]:
    """A model with ``reducers`` vs the same weights without: one no-grad forward of a batch each."""
    torch.manual_seed(0)
    plain = make(())
    with_reducers = make(reducers)
    with_reducers.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, plain.in_channels, plain.input_size, plain.input_size, generator=g)
    t, y = torch.randint(0, 1000, (batch,), generator=g), torch.randint(0, plain.num_classes, (batch,), generator=g)
    for model in (plain, with_reducers):
        model.eval()

    def fwd(model):
        with torch.no_grad():
            return model(x, t, y)

    macs = {m: count_forward(m, x, t, y).useful_macs for m in (plain, with_reducers)}
    return [BenchPair(case, Timed(f"{label} + {reducers} fwd (B={batch})", lambda: fwd(with_reducers),
                                  macs[with_reducers]),
                      Timed(f"{label} fwd (B={batch})", lambda: fwd(plain), macs[plain]), target=target, check=check)]


def _patchify_p1(reducers):
    return DiffusionTransformer(input_size=32, in_channels=3, num_classes=10, hidden_size=128, depth=4, num_heads=2,
                                tokenizer="patchify", tokenizer_kwargs={"patch_size": 1}, reducers=reducers)


@register_case("tome_attention")
def tome_attention_case(batch: int = BATCH) -> list[BenchPair]:
    """ToMe r = 0.5 (2x2 random cells, proportional attention) on 1024 tokens of width 128."""
    return _forward_pair("tome_attention", _patchify_p1, ["token_merging"], batch,
                         "speed-up >= 0.7 x useful-MAC reduction",
                         lambda r: 1 / r["time_ratio"] >= 0.7 / r["mac_ratio"], "DiT P=1 32x32 D=128 depth 4")


def _dcdit(reducers):
    from dyncompute_plugins.tokenizers.dynamic_chunking.bench import calibrate_router

    torch.manual_seed(0)
    model = DiffusionTransformer(input_size=32, in_channels=4, num_classes=1000, hidden_size=256, depth=6,
                                 num_heads=4, tokenizer="dynamic_chunking", reducers=reducers)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(BATCH, 4, 32, 32, generator=g), torch.randint(0, 1000, (BATCH,), generator=g), \
        torch.randint(0, 1000, (BATCH,), generator=g)
    calibrate_router(model, x, t, y, 0.25)  # an untrained router keeps ~nothing: keep 1/N = 1/4
    return model


@register_case("dcdit_tome")
def dcdit_tome_case(batch: int = BATCH) -> list[BenchPair]:
    """DC-DiT (D = 256, depth 6, ~1/4 of 32x32 kept) with and without ToMe r = 0.5 around attention."""
    return _forward_pair("dcdit_tome", _dcdit, ["token_merging"], batch, "time ratio < 1 (faster)",
                         lambda r: r["time_ratio"] < 1, "DC-DiT N=4 D=256 depth 6")


SWEEP = Path("runs/reducers")  # dyncompute sweep experiments/sweeps/reducers.gin --out runs/reducers


def trained_run(run: str | None = None, model: str = "DiT/2") -> Path:
    """``run``, or the reducer sweep's trained run of ``model`` (found through its sweep.json)."""
    if run is None and (SWEEP / "sweep.json").is_file():
        cells = json.loads((SWEEP / "sweep.json").read_text())["cells"]
        ids = {c["train_id"] for c in cells if c["labels"].get("model") == model}
        run = SWEEP / "runs" / ids.pop() if len(ids) == 1 else None
    if run is None or not (Path(run) / "checkpoints").is_dir():
        raise UserError(f"no trained {model} at {run or SWEEP}: run `dyncompute sweep experiments/sweeps/reducers.gin "
                        f"--out {SWEEP}` first, or pass --arg run=RUN_DIR")
    return Path(run)


def _cache_pair(case: str, reducers: list[str], bindings: list[str], run: str | None = None, images: int = 32,
                steps: int = 50):
    run = trained_run(run)
    plain = load_variant(run, [], [])
    cached = load_variant(run, reducers, bindings)
    reference, subject = sampling_call(plain, images, steps), sampling_call(cached, images, steps)
    mse = float(((subject() - reference()) ** 2).mean())
    macs = {id(m): trajectory_macs(m, images, steps) for m in (plain, cached)}
    label = f"quickstart DiT/2, DDIM-{steps}, {images} images"
    return [BenchPair(case, Timed(f"{bindings} ({label})", subject, macs[id(cached)] * images),
                      Timed(f"uncached ({label})", reference, macs[id(plain)] * images),
                      target="speed-up >= 0.9 x per-image MAC reduction",
                      check=lambda r: 1 / r["time_ratio"] >= 0.9 / r["mac_ratio"],
                      extra={"mse_to_uncached": mse})]


@register_case("fora_ddim50")
def fora_case(run: str | None = None, images: int = 32) -> list[BenchPair]:
    return _cache_pair("fora_ddim50", ["fora"], ["reducers.fora.interval = 2"], run, images)


@register_case("taylorseer_ddim50")
def taylorseer_case(run: str | None = None, images: int = 32) -> list[BenchPair]:
    return _cache_pair("taylorseer_ddim50", ["taylorseer"], ["reducers.taylorseer.interval = 3",
                                                             "reducers.taylorseer.order = 2"], run, images)


@register_case("taylorseer_reuse_ddim50")
def taylorseer_reuse_case(run: str | None = None, images: int = 32) -> list[BenchPair]:
    """TaylorSeer's schedule (interval 3, two warm-up evaluations) at order 0: every skipped evaluation
    reuses the stored outputs, no forecast arithmetic. The ceiling of any interval-3 cache on this model:
    what the uncached parts of a skipped evaluation (embedding, adaLN, gated adds, final layer) cost."""
    return _cache_pair("taylorseer_reuse_ddim50", ["taylorseer"], ["reducers.taylorseer.interval = 3",
                                                                   "reducers.taylorseer.order = 0"], run, images)
