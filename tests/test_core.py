"""The core with plugins defined here: a model, its accounting and the reducer seam know no first-party
plugin, so a dummy tokenizer and dummy reducers exercise every contract."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dyncompute import flops
from dyncompute.layers import grid_positions
from dyncompute.model import DiffusionTransformer
from dyncompute.reducer import Reducer
from dyncompute.sampling import generate
from dyncompute.tokenizer import Tokenizer
from dyncompute.tokens import Tokens
from dyncompute.trajectory import count_trajectory


class PixelTokens(Tokenizer):
    """Every pixel is a token (P = 1); the head is one linear map."""

    flop_components = {"embed": "embeddings", "out": "head"}

    def __init__(self, hidden_size, in_channels, out_channels, input_size, cond_dim=None):
        super().__init__()
        self.embed = nn.Linear(in_channels, hidden_size)
        self.out = nn.Linear(hidden_size, out_channels)
        self.register_buffer("pos", grid_positions(input_size), persistent=False)
        self.size = input_size

    def encode(self, x, c, **budget):
        self.check_budget(budget)
        return Tokens.from_batched(self.embed(x.flatten(2).transpose(1, 2)), self.pos), None

    def to_grid(self, tokens, state, c):
        return tokens.batched()

    def head(self, h, state, c):
        return self.out(h).transpose(1, 2).reshape(h.shape[0], -1, self.size, self.size)


def tiny(reducers=()):
    torch.manual_seed(0)
    tok = PixelTokens(32, 3, 6, 4)
    model = DiffusionTransformer(input_size=4, in_channels=3, num_classes=5, hidden_size=32, depth=2, num_heads=2,
                                 tokenizer=tok, reducers=reducers)
    for p in model.parameters():  # leave DiT's zero init: every block contributes
        nn.init.normal_(p, std=0.05)
    return model.eval()


def inputs(n=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 4, 4, generator=g), torch.tensor([10, 500][:n]), torch.arange(n) % 5


def test_model_and_accounting_run_with_a_tokenizer_defined_here():
    model = tiny()
    x, t, y = inputs()
    out, info = model(x, t, y, return_info=True)
    assert out.shape == (2, 6, 4, 4) and info.tokens_per_sample == [16, 16] and info.backbone_ran
    count = flops.count_forward(model, x, t, y)
    assert count.unsupported_ops == {}
    assert list(count.by_component)[:2] == ["embeddings", "head"] and count.by_component["head"] == 2 * 16 * 32 * 6
    assert sum(count.by_component.values()) == count.useful_macs
    assert count.by_component["embeddings"] > 2 * 16 * 3 * 32  # the tokenizer's embed plus t/y embedders


class Recorder(Reducer):
    """Token hooks that record what they saw and call the op unchanged."""

    hook_points = ("attention", "mlp")

    def __init__(self):
        super().__init__()
        self.seen = []

    def attention(self, op, h, ctx):
        self.seen.append(("attention", ctx.block, ctx.tokens.lengths))
        return op(h, ctx.tokens)

    def mlp(self, op, h, ctx):
        self.seen.append(("mlp", ctx.block, ctx.tokens.lengths))
        return op(h, ctx.tokens)


class ReuseEveryOther(Reducer):
    """A step hook: run on even evaluations, reuse the cached grid features on odd ones."""

    hook_points = ("step",)

    def new_cache(self):
        return {"grid": None, "runs": 0}

    def step(self, run, ctx):
        cache = ctx.cache
        if cache is None:  # a forward outside a sampling call
            return run()
        if cache["grid"] is None or ctx.step.evaluation % 2 == 0:
            cache["grid"], cache["runs"] = run(), cache["runs"] + 1
        return cache["grid"]

    def report(self, cache, scratch):
        return {"runs": cache["runs"]} if cache else {}


def test_token_hooks_see_every_block_and_change_nothing():
    rec = Recorder()
    model, plain = tiny([rec]), tiny()
    x, t, y = inputs()
    out, info = model(x, t, y, return_info=True)
    assert torch.equal(out, plain(x, t, y))
    assert rec.seen == [("attention", 0, (16, 16)), ("mlp", 0, (16, 16)), ("attention", 1, (16, 16)),
                        ("mlp", 1, (16, 16))]
    assert [(b.attention, b.mlp) for b in info.blocks] == [((16, 16), (16, 16))] * 2


def test_step_hook_skips_the_backbone_and_reports_it():
    model = tiny([ReuseEveryOther()])
    x, t, y = inputs()
    cache = model.new_step_cache(4)
    ran = [model(x, t, y, return_info=True, step_cache=cache)[1].backbone_ran for _ in range(4)]
    assert ran == [True, False, True, False] and cache.states[0]["runs"] == 2
    assert model(x, t, y, return_info=True)[1].backbone_ran  # no trajectory: nothing to reuse


def test_each_sampling_call_has_its_own_cache_and_the_accounting_reads_skips():
    model = tiny([ReuseEveryOther()])
    count, _ = count_trajectory(model, num_samples=2, sampler="ddim", num_steps=4)
    again, _ = count_trajectory(model, num_samples=2, sampler="ddim", num_steps=4)
    assert list(count.steps.backbone_ran) == list(again.steps.backbone_ran) == [True, False, True, False]
    full, _ = count_trajectory(tiny(), num_samples=2, sampler="ddim", num_steps=4)
    backbone = flops.backbone_macs(model, 16)
    assert full.useful_macs_per_image - count.useful_macs_per_image == pytest.approx(2 * backbone)
    images = generate(model, num_samples=2, sampler="ddim", num_steps=4, device="cpu").images
    assert torch.isfinite(images).all()


def test_reducers_declare_known_hook_points():
    with pytest.raises(TypeError, match="unknown hook point"):
        type("Bad", (Reducer,), {"hook_points": ("attn",)})
