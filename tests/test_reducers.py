"""Compute reducers: token merging, FORA, TeaCache, TaylorSeer (tiny models, each test a few seconds).

Identities (the neutral setting of every reducer is bit-identical to no reducer), isolation of samples
under merging, TeaCache's monotonicity, clear errors, composition with every tokenizer, sampler and
guidance mode, and exact accounting (composed per-evaluation MACs against fvcore traces and against
hand-derived formulas).
"""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from test_engine import TINY  # the tiny trainable config

from dyncompute import flops
from dyncompute.backbone import Backbone
from dyncompute.cli import main
from dyncompute.config import build_model, scoped
from dyncompute.diffusion import make_objective
from dyncompute.engine import train
from dyncompute.layers import grid_positions
from dyncompute.model import DiffusionTransformer
from dyncompute.reducer import Hooks, Reducer, StepCache
from dyncompute.registry import REDUCERS, SAMPLERS, TOKENIZERS
from dyncompute.runs import load_run
from dyncompute.sampling import generate
from dyncompute.tokens import Tokens
from dyncompute.trajectory import SampleCost, count_trajectory, row_signatures

COEFFS = {"coefficients": [0.0, 0.0, 0.0, 1.0, 0.0], "fingerprint": "unchecked"}  # identity rescaling
NEUTRAL = {"token_merging": {"ratio": 0.0}, "fora": {"interval": 1}, "taylorseer": {"interval": 1},
           "teacache": dict(threshold=0.0, **COEFFS)}


def reducer(name: str, **settings) -> Reducer:
    r = REDUCERS.build(name, **settings)
    r.name = name
    return r


def _randomise_zero_layers(model):
    """adaLN-Zero starts at exactly zero: give every zero tensor small values so outputs depend on it."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def dit(reducers=(), hidden=32, depth=2, heads=2, size=8, patch=2, learn_sigma=True):
    torch.manual_seed(0)
    return _randomise_zero_layers(DiffusionTransformer(
        input_size=size, in_channels=3, num_classes=10, hidden_size=hidden, depth=depth, num_heads=heads,
        tokenizer="patchify", tokenizer_kwargs={"patch_size": patch}, reducers=reducers, learn_sigma=learn_sigma))


def dcdit(reducers=(), hidden=32, depth=2, heads=2, size=8):
    torch.manual_seed(0)
    return _randomise_zero_layers(DiffusionTransformer(
        input_size=size, in_channels=3, num_classes=10, hidden_size=hidden, depth=depth, num_heads=heads,
        tokenizer="dynamic_chunking", tokenizer_kwargs={"router": "cosine"}, reducers=reducers))


def same_weights(model, reference):
    model.load_state_dict(reference.state_dict())
    return model


def sample(model, n=2, steps=4, sampler="ddim", **kw):
    return generate(model, num_samples=n, sampler=sampler, num_steps=steps, device="cpu", **kw).images


def inputs(n=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.arange(n)


# --------------------------------------------------------------------------- registration and gin


def test_reducers_are_registered_plugins():
    assert {"token_merging", "fora", "teacache", "taylorseer"} <= set(REDUCERS.names())


def test_gin_lists_and_configures_reducers():
    with scoped([], ["DiffusionTransformer.input_size = 8", "DiffusionTransformer.in_channels = 3",
                     "DiffusionTransformer.hidden_size = 32", "DiffusionTransformer.depth = 2",
                     "DiffusionTransformer.num_heads = 2",
                     "DiffusionTransformer.reducers = ['token_merging', 'fora']",
                     "reducers.token_merging.ratio = 0.5", "reducers.fora.interval = 2"]):
        model = DiffusionTransformer()
    tome, fora = model.reducers
    assert (tome.name, tome.ratio, fora.name, fora.interval) == ("token_merging", 0.5, "fora", 2)
    assert model.config.reducers == ("token_merging", "fora")


# --------------------------------------------------------------------------- identities


@pytest.mark.parametrize("name", sorted(NEUTRAL))
def test_neutral_settings_are_bit_identical(name):
    base = dit()
    model = same_weights(dit([reducer(name, **NEUTRAL[name])]), base)
    x, t, y = inputs()
    cache = model.new_step_cache(2)
    for _ in range(2):  # inside a sampling call, twice
        assert torch.equal(model(x, t, y, step_cache=cache), base(x, t, y))
    assert torch.equal(sample(model, steps=5), sample(base, steps=5))


# --------------------------------------------------------------------------- token merging


def packed_tokens(lengths, size=8, width=16, seed=0):
    """Mixed-length packed tokens on an 8x8 grid: each sample keeps a random subset in raster order."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.cat([grid_positions(size)[torch.randperm(size * size, generator=g)[:n].sort().values] for n in lengths])
    return Tokens.from_lengths(torch.randn(sum(lengths), width, generator=g), lengths, pos)


@pytest.mark.parametrize("split", ["alternate", "random_cell"])
def test_merging_stays_within_samples_and_unmerge_restores_every_token(split):
    from dyncompute_plugins.reducers.token_merging import bipartite_plan, destinations

    tokens = packed_tokens([30, 11, 64])
    prio = torch.randperm(64, generator=torch.Generator().manual_seed(0)).view(8, 8)
    is_dst = destinations(tokens, split, 2, prio)
    metric = torch.nn.functional.normalize(tokens.x, dim=-1)
    plan = bipartite_plan(metric, tokens, is_dst, 0.5)
    merged = plan.merge(tokens.x)
    groups = merged.batch[plan.group]
    assert torch.equal(groups, tokens.batch)  # a token's group belongs to its own sample
    sources = torch.bincount(tokens.batch[~is_dst], minlength=3).tolist()
    assert merged.lengths == tuple(n - min(math.floor(0.5 * n), s) for n, s in zip(tokens.lengths, sources))
    assert merged.lengths[0] == 15  # 30 tokens: 15 merge
    restored = plan.unmerge(merged.x)
    assert restored.shape == tokens.x.shape
    for g in plan.group.unique():  # every token gets its group's mean
        members = plan.group == g
        assert torch.allclose(restored[members], tokens.x[members].mean(0).expand(int(members.sum()), -1), atol=1e-6)
    if split == "random_cell":  # one destination per occupied 2x2 cell
        cells = tokens.batch * 16 + (tokens.pos[:, 0] // 2) * 4 + tokens.pos[:, 1] // 2
        occupied = (torch.bincount(cells, minlength=48) > 0).long()
        assert torch.equal(torch.bincount(cells[is_dst], minlength=48), occupied)


def test_merge_plan_of_a_sample_is_the_same_alone_and_in_a_batch():
    from dyncompute_plugins.reducers.token_merging import bipartite_plan, destinations

    tokens = packed_tokens([30, 11, 64])
    prio = torch.randperm(64, generator=torch.Generator().manual_seed(3)).view(8, 8)
    metric = torch.nn.functional.normalize(tokens.x, dim=-1)
    plan = bipartite_plan(metric, tokens, destinations(tokens, "random_cell", 2, prio), 0.5)
    for _b, (lo, hi) in enumerate(zip(tokens.cu_seqlens[:-1].tolist(), tokens.cu_seqlens[1:].tolist())):
        alone = Tokens.from_lengths(tokens.x[lo:hi], [hi - lo], tokens.pos[lo:hi])
        own = bipartite_plan(metric[lo:hi], alone, destinations(alone, "random_cell", 2, prio), 0.5)
        offset = int(plan.group[lo:hi].min())
        assert torch.equal(plan.group[lo:hi] - offset, own.group)


@pytest.mark.parametrize("settings", [{"ratio": 0.5},
                                      {"ratio": 0.5, "split": "alternate", "metric": "keys", "mlp": True},
                                      {"ratio": 0.75, "mlp": True, "proportional_attention": False}])
def test_a_sample_merges_the_same_alone_and_in_a_mixed_length_batch(settings):
    """Backbone with token merging on packed mixed-length tokens vs each sample alone."""
    torch.manual_seed(0)
    backbone = Backbone(16, 2, 2).eval()
    tokens = packed_tokens([30, 11, 64])
    c = torch.randn(3, 16)
    tome = reducer("token_merging", **settings)
    tome.grid = (8, 8)
    with torch.no_grad():
        batch = backbone(tokens, c, Hooks([tome], None, torch.zeros(3), c))
        for b, (lo, hi) in enumerate(zip(tokens.cu_seqlens[:-1].tolist(), tokens.cu_seqlens[1:].tolist())):
            alone = Tokens.from_lengths(tokens.x[lo:hi], [hi - lo], tokens.pos[lo:hi])
            own = backbone(alone, c[b:b + 1], Hooks([tome], None, torch.zeros(1), c[b:b + 1]))
            assert torch.allclose(batch.x[lo:hi], own.x, atol=1e-5)


def test_merging_randomness_is_seeded_per_call_not_global():
    model = dit([reducer("token_merging", ratio=0.5)])
    x, t, y = inputs()
    state = torch.get_rng_state()
    a = model(x, t, y)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(model(x, t, y), a)
    cache = model.new_step_cache()
    cache.evaluation = 4  # another evaluation of the trajectory draws other destinations
    assert not torch.equal(model(x, t, y, step_cache=cache), a)


def test_proportional_attention_bias():
    from dyncompute.attention import PackedAttention

    torch.manual_seed(0)
    attn = PackedAttention(16, num_heads=2, qkv_bias=True).eval()
    tokens = packed_tokens([5, 9], width=16)
    with torch.no_grad():
        plain = attn(tokens.x, tokens)
        assert torch.allclose(attn(tokens.x, tokens, log_size=torch.zeros(14)), plain, atol=1e-6)
        bias = torch.rand(14).log()
        packed = attn(tokens.x, tokens, log_size=bias)
        for lo, hi in ((0, 5), (5, 14)):  # uniform fast path == packed path
            alone = Tokens.from_lengths(tokens.x[lo:hi], [hi - lo], tokens.pos[lo:hi])
            assert torch.allclose(attn(tokens.x[lo:hi][None], alone, log_size=bias[lo:hi]), packed[lo:hi][None],
                                  atol=1e-5)
        lengths = [3, 5] * 6  # alternating lengths: the grouped path permutes samples (and biases) together
        many = packed_tokens(lengths, width=16)
        bias = torch.rand(len(many.x)).log()
        packed, lo = attn(many.x, many, log_size=bias), 0
        for n in lengths:
            alone = Tokens.from_lengths(many.x[lo:lo + n], [n], many.pos[lo:lo + n])
            assert torch.allclose(attn(many.x[lo:lo + n][None], alone, log_size=bias[lo:lo + n])[0],
                                  packed[lo:lo + n], atol=1e-5)
            lo += n
        # a key of size s acts like s copies of itself
        k = Tokens.from_lengths(tokens.x[:5], [5], tokens.pos[:5])
        dup = Tokens.from_lengths(torch.cat([tokens.x[:5], tokens.x[4:5]]), [6], tokens.pos[:6])
        sized = attn(tokens.x[:5][None], k, log_size=torch.tensor([0, 0, 0, 0, math.log(2)]))
        assert torch.allclose(sized[0], attn(dup.x[None], dup)[0, :5], atol=1e-5)


# --------------------------------------------------------------------------- feature caches


def _cache_ctx(cache, evaluation, tokens):
    from dyncompute.reducer import BlockContext

    step = StepCache({}, 20)
    step.evaluation = evaluation
    return BlockContext(0, tokens, None, None, cache, step, scratch={})


def test_taylorseer_forecasts_by_the_originals_finite_differences():
    """TaylorSeer-DiT: differences divided by the distance between full evaluations, forecast
    F + D1 k + D2 k^2 / 2 at k evaluations after the last full one; exact on a line at order 1."""
    tokens = packed_tokens([4, 6], width=3)
    F = [torch.randn(10, 3, generator=torch.Generator().manual_seed(e)) for e in range(12)]
    ts, cache, ran, outs = reducer("taylorseer", interval=3, order=2, warmup=2), None, [], {}
    cache = ts.new_cache()
    for e in range(12):
        op = lambda h, tk, e=e: (ran.append(e), F[e])[1]
        outs[e] = ts.attention(op, torch.zeros(10, 3), _cache_ctx(cache, e, tokens))
    assert ran == [0, 1, 4, 7, 10]  # warm-up, then every 3rd
    d1_at_4, d1_at_7 = (F[4] - F[1]) / 3, (F[7] - F[4]) / 3
    d2_at_7 = (d1_at_7 - d1_at_4) / 3
    for k in (1, 2):
        assert torch.allclose(outs[7 + k], F[7] + d1_at_7 * k + d2_at_7 * k ** 2 / 2, atol=1e-5)
    assert torch.allclose(outs[2], F[1] + (F[1] - F[0]), atol=1e-6)  # only one difference known yet
    d2_at_4 = (d1_at_4 - (F[1] - F[0])) / 3  # the warm-up's dt = 1 stays in the recursion
    for k in (1, 2):
        assert torch.allclose(outs[4 + k], F[4] + d1_at_4 * k + d2_at_4 * k ** 2 / 2, atol=1e-5)
    line, ts1, cache = (lambda e: F[0] + 0.5 * e * F[1]), reducer("taylorseer", interval=4, order=1), None
    cache = ts1.new_cache()
    for e in range(12):
        out = ts1.mlp(lambda h, tk, e=e: line(e), torch.zeros(10, 3), _cache_ctx(cache, e, tokens))
        assert torch.allclose(out, line(e), atol=1e-5)


def test_taylorseer_order_3_equals_the_recursion_on_tensors():
    """Forecasts against TaylorSeer's recursion written out on the tensors, through the warm-up's irregular
    spacing and past the point where the table holds every order."""
    tokens = packed_tokens([4, 6], width=3)
    F = [torch.randn(10, 3, generator=torch.Generator().manual_seed(e)) for e in range(16)]
    ts = reducer("taylorseer", interval=3, order=3, warmup=2)
    cache, diffs, last = ts.new_cache(), None, None
    for e in range(16):
        out = ts.mlp(lambda h, tk, e=e: F[e], torch.zeros(10, 3), _cache_ctx(cache, e, tokens))
        if ts.is_full(e):
            new = [F[e]]
            for i in range(min(3, len(diffs)) if diffs else 0):
                new.append((new[i] - diffs[i]) / (e - last))
            diffs, last = new, e
        else:
            k = e - last
            expected = sum(d * k ** i / math.factorial(i) for i, d in enumerate(diffs))
            assert torch.allclose(out, expected, atol=1e-4), e


def test_fora_reuses_the_last_full_output():
    fora = reducer("fora", interval=3)
    tokens = packed_tokens([4, 6], width=3)
    cache, seen = fora.new_cache(), []
    for e in range(7):
        out = fora.mlp(lambda h, tk, e=e: torch.full((10, 3), float(e)), torch.zeros(10, 3),
                       _cache_ctx(cache, e, tokens))
        seen.append(out[0, 0].item())
    assert seen == [0, 0, 0, 3, 3, 3, 6]


def test_cached_rows_follow_grid_positions_when_tokens_change():
    from dyncompute_plugins.reducers.layout import Layout, row_map

    a = Layout(torch.tensor([[0, 0], [0, 3], [2, 2], [0, 0], [3, 3]]), (3, 2))
    assert row_map(a, Layout(a.pos.clone(), a.lengths)) is None
    b = Layout(torch.tensor([[0, 1], [2, 3], [3, 2], [0, 1]]), (2, 2))
    assert row_map(a, b).tolist() == [0, 2, 4, 3]  # nearest of the same sample (ties: the earlier)
    with pytest.raises(ValueError, match="one batch"):
        row_map(a, Layout(a.pos[:3], (3,)))


# --------------------------------------------------------------------------- TeaCache


def _computed(model, steps=8, **kw):
    flags = []
    generate(model, num_samples=2, sampler="ddim", num_steps=steps, device="cpu",
             observers=[lambda ev: flags.append(ev.info.reducers["teacache"]["computed"])], **kw)
    return flags


def test_teacache_first_and_last_compute_and_higher_threshold_never_computes_more():
    base = dit()
    counts = []
    for threshold in (0.0, 0.05, 0.2, 0.5, 1.0, 5.0):
        flags = _computed(same_weights(dit([reducer("teacache", threshold=threshold, **COEFFS)]), base))
        assert flags[0] and flags[-1]
        counts.append(sum(flags))
    assert counts[0] == 8 and counts[-1] == 2
    assert counts == sorted(counts, reverse=True)


def test_teacache_decision_rule_is_monotone_in_the_threshold():
    tc = reducer("teacache", threshold=0.1, coefficients=[0.0, 0.0, 1.0, -0.5, 0.01], fingerprint="unchecked")
    rng = np.random.default_rng(0)
    for _ in range(20):
        changes = rng.uniform(0, 1, 30)
        counts = []
        for threshold in (0.01, 0.05, 0.1, 0.3, 1.0):
            tc.threshold, cache = threshold, {"accumulated": 0.0, "residual": 0}
            counts.append(sum(tc._decide(cache, float(d), False) for d in changes))
            for d in changes:
                assert tc.rescaled(float(d)) >= 0
        assert counts == sorted(counts, reverse=True)


def test_teacache_refuses_without_coefficients_and_with_another_models():
    with pytest.raises(ValueError, match="dyncompute calibrate teacache"):
        reducer("teacache")
    with pytest.raises(ValueError, match="fingerprint"):
        reducer("teacache", coefficients=[0, 0, 0, 1, 0])
    model = dit([reducer("teacache", coefficients=[0, 0, 0, 1, 0], fingerprint="0123456789abcdef")])
    with pytest.raises(ValueError, match="calibrate teacache"):
        sample(model)




def test_calibrate_teacache_writes_the_models_own_coefficients(tmp_path, capsys):
    (tmp_path / "tiny.gin").write_text(TINY)
    with scoped([tmp_path / "tiny.gin"]):
        train(tmp_path / "run")
    assert main(["calibrate", "teacache", str(tmp_path / "run"), "--steps", "8", "--num-samples", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    text = (tmp_path / "run" / "teacache.gin").read_text()
    assert "reducers.teacache.coefficients" in text and result["pairs"] == 7  # consecutive pairs of 8 evaluations
    use = ["DiffusionTransformer.reducers = ['teacache']", f"include '{tmp_path / 'run' / 'teacache.gin'}'",
           "reducers.teacache.threshold = 0.5"]
    model = load_run(tmp_path / "run", bindings=use)
    assert sample(model, steps=8).isfinite().all()  # its own fingerprint is accepted
    assert main(["calibrate", "fora", str(tmp_path / "run")]) == 2  # nothing to calibrate


# --------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize("name, settings, match", [
    ("token_merging", {"ratio": 0.8}, r"\[0, 1 - 1/cell\^2 = 0.75\]"),
    ("token_merging", {"ratio": -0.1}, "ratio"),
    ("token_merging", {"ratio": 0.6, "split": "alternate"}, "1/2"),
    ("token_merging", {"ratio": 0.9, "cell": 3}, "0.888889"),
    ("token_merging", {"split": "bands"}, "split"),
    ("token_merging", {"attention": False, "mlp": False}, "neither"),
    ("fora", {"interval": 0}, r"reducers.fora.interval must be an integer >= 1"),
    ("taylorseer", {"interval": 0}, "interval"),
    ("taylorseer", {"order": -1}, r"reducers.taylorseer.order must be an integer >= 0"),
    ("teacache", dict(threshold=-0.1, **COEFFS), "threshold must be >= 0"),
])
def test_bad_settings_are_clear(name, settings, match):
    with pytest.raises(ValueError, match=match):
        REDUCERS.build(name, **settings)


def test_unknown_hook_point_is_clear():
    with pytest.raises(TypeError, match="unknown hook point"):
        type("Bad", (Reducer,), {"hook_points": ("attention", "decoder")})


def test_a_reducer_that_cannot_apply_to_the_tokenizer_is_clear():
    gridless = type("Gridless", (TOKENIZERS.get("patchify"),), {"token_grid": lambda self: None})
    tok = gridless(hidden_size=32, in_channels=3, out_channels=6, input_size=8)
    with pytest.raises(ValueError, match="token grid"):
        DiffusionTransformer(input_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2, tokenizer=tok,
                             reducers=[reducer("token_merging")])
    with pytest.raises(ValueError, match="blocks"):
        dit([reducer("token_merging", blocks=[5])])


def test_a_reducer_listed_twice_is_clear():
    with pytest.raises(ValueError, match="listed once"):
        dit([reducer("fora"), reducer("fora", interval=3)])


def test_bad_reducer_binding_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "m.gin").write_text(TINY)
    code = main(["flops", str(tmp_path / "m.gin"), "-b", "DiffusionTransformer.reducers = ['fora']",
                 "-b", "reducers.fora.interval = 0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "reducers.fora.interval" in err[0]


# --------------------------------------------------------------------------- composition


class _Infos(list):
    def __call__(self, ev):
        self.append(ev.info)


@pytest.mark.parametrize("sampler, cfg", [("ddpm", 1.0), ("ddim", 3.0)])
def test_dcdit_with_token_merging_and_teacache_end_to_end(sampler, cfg):
    model = dcdit([reducer("token_merging", ratio=0.5), reducer("teacache", threshold=0.2, **COEFFS)])
    kw = {"uncond_budget": {"tail_drop": 0.5}} if cfg > 1 else {}  # Lite-CFG: a sparser unconditional half
    infos = _Infos()
    images = sample(model, steps=6, sampler=sampler, cfg_scale=cfg, observers=[infos], **kw)
    assert images.isfinite().all() and images.shape == (2, 3, 8, 8)
    computed = [info.backbone_computed for info in infos]
    assert computed[0] and computed[-1] and 2 <= sum(computed) < 6
    merged = [run.attention for info in infos if info.backbone_computed for run in info.blocks]
    assert all(m < n for runs, info in zip(merged, infos) for m, n in zip(runs, info.tokens_per_sample))
    if cfg > 1:  # the unconditional half keeps fewer tokens
        assert sum(infos[0].tokens_per_sample[2:]) < sum(infos[0].tokens_per_sample[:2])


def test_dcdit_with_token_merging_and_teacache_is_counted():
    model = dcdit([reducer("token_merging", ratio=0.5), reducer("teacache", threshold=0.2, **COEFFS)])
    count, _result = count_trajectory(model, num_samples=2, sampler="ddim", num_steps=5, cfg_scale=2.0,
                                     uncond_budget={"tail_drop": 0.5})
    assert count.nfe == 5 and 2 <= count.backbone_evaluations < 5 and not count.notes
    assert count.by_component["reducer:token_merging"] > 0 and count.by_component["reducer:teacache"] > 0


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "ode"])
def test_dit_with_fora_and_token_merging_end_to_end(sampler):
    for reds in ([reducer("fora", interval=2), reducer("token_merging", ratio=0.5)],
                 [reducer("token_merging", ratio=0.5), reducer("fora", interval=2)]):
        infos = _Infos()
        kw = {"objective": "flow"} if sampler == "ode" else {}
        images = sample(dit(reds), steps=5, sampler=sampler, cfg_scale=2.0, observers=[infos], **kw)
        assert images.isfinite().all()
        assert [info.backbone_computed for info in infos] == [True, False, True, False, True]


def test_taylorseer_follows_dcdit_tokens_and_lite_cfg():
    model = dcdit([reducer("taylorseer", interval=2, order=2)])
    images = sample(model, steps=6, cfg_scale=2.0, uncond_budget={"tail_drop": 0.5})
    assert images.isfinite().all()


def test_two_sampling_calls_never_share_state():
    model = dit([reducer("taylorseer", interval=3, order=2)])
    assert torch.equal(sample(model, steps=7), sample(model, steps=7))


# --------------------------------------------------------------------------- accounting


def test_block_parts_match_hand_formulas_and_sum_to_the_backbone():
    model = dit(hidden=32, depth=3)
    D = 32
    for L in (1, 7, 16):
        base, attn, mlp = (flops.block_part_macs(model, p, L) for p in ("base", "attention", "mlp"))
        assert base == 6 * D * D  # the adaLN projection of the conditioning
        assert attn == 4 * L * D + 4 * L * D * D + 2 * L * L * D  # affine-free layer norm, qkv, proj, QK^T, AV
        assert mlp == 4 * L * D + 8 * L * D * D
        assert 3 * (base + attn + mlp) == flops.backbone_macs(model, L)


def _replayed(model, steps=4, n=2, size=8):
    """Per evaluation: (fvcore trace of the evaluation replayed on a copy of its step cache, the
    accounting's composed count of it, its info); composed after the whole trajectory was seen, as
    `TrajectoryRecorder.count` does."""
    cost, seen = SampleCost(model), []

    def fn(x, t, **kw):
        before = copy.deepcopy(kw["step_cache"])
        y, info = model(x, t, return_info=True, **kw)
        seen.append((flops.trace_forward(model, x, t, kw["y"], {"step_cache": before}).macs, info))
        cost.observe(flops.split_rows(x, t, kw["y"]), info.tokens_per_sample)
        return y

    s = SAMPLERS.get("ddim").for_objective(make_objective("gaussian", learn_sigma=True), num_steps=steps)
    z = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s.sample(fn, z.shape, model_kwargs={"y": torch.arange(n), "step_cache": model.new_step_cache(steps)}, noise=z)
    out = []
    for traced, info in seen:
        L, composed = info.tokens_per_sample, 0.0
        for sig in row_signatures(model, info):
            useful, padded = cost.row(sig)
            waste = cost.waste(sig.length, max(L)) if len(set(L)) > 1 else {}
            composed += sum(useful.values()) + padded + sum(waste.values())
        out.append((traced, composed, info))
    assert not cost.notes, cost.notes
    return out


@pytest.mark.parametrize("make, reds", [
    (dit, [("fora", {"interval": 2})]),
    (dit, [("taylorseer", {"interval": 2, "order": 2})]),
    (dit, [("token_merging", {"ratio": 0.5, "mlp": True, "metric": "keys"})]),
    (dcdit, [("taylorseer", {"interval": 2, "order": 1})]),
    (dcdit, [("token_merging", {"ratio": 0.5})]),
])
def test_composed_evaluation_counts_equal_fvcore_traces(make, reds):
    model = make([reducer(n, **s) for n, s in reds])
    size = model.input_size
    for traced, composed, _info in _replayed(model, size=size):
        assert traced == composed


def test_teacache_indicator_is_counted_where_the_tracer_drops_it():
    """fvcore's tracer drops work whose result only reaches Python (the skip decision): the composed
    count is the trace plus the reported indicator, adaLN projection and first norm per row."""
    model = dit([reducer("teacache", threshold=10.0, **COEFFS)])
    D, L = 32, 16
    rows = _replayed(model)
    assert [info.backbone_computed for _, _, info in rows] == [True, False, False, True]
    for traced, composed, _info in rows:
        assert composed - traced == 2 * (6 * D * D + 4 * L * D)


def test_trajectory_counts_match_hand_derived_formulas():
    D, L, depth, steps = 32, 16, 2, 6
    base = dit()
    full = count_trajectory(base, 1, "ddim", steps)[0]
    per_eval = full.useful_macs_per_image / steps
    adaln, norm = 6 * D * D, 4 * L * D
    rest = per_eval - depth * (adaln + 2 * norm + 4 * L * D * D + 2 * L * L * D + 8 * L * D * D)
    fora = count_trajectory(same_weights(dit([reducer("fora", interval=2)]), base), 1, "ddim", steps)[0]
    assert fora.useful_macs_per_image == 3 * per_eval + 3 * (rest + depth * adaln)  # reuse: no norms either
    ts = count_trajectory(same_weights(dit([reducer("taylorseer", interval=3, order=2)]), base), 1, "ddim", steps)[0]
    # full at 0, 1, 4; forecasts at 2, 3 (order 1) and 5 (order 2): one MAC per difference per cached number
    forecast = 2 * depth * L * D * (1 + 1 + 2)
    assert ts.useful_macs_per_image == 3 * per_eval + 3 * (rest + depth * adaln) + forecast
    assert (ts.nfe, ts.backbone_evaluations) == (6, 3)
    tome = count_trajectory(same_weights(dit([reducer("token_merging", ratio=0.5)]), base), 1, "ddim", steps)[0]
    n = L // 2  # 2x2 cells on the 4x4 patch grid: 4 destinations, 12 sources, 8 merged
    attn = 4 * n * D + 4 * n * D * D + 2 * n * n * D
    matching = L * D + 12 * 4 * D  # normalised metric, similarity of sources with destinations
    assert tome.useful_macs_per_image == steps * (rest + depth * (adaln + attn + norm + 8 * L * D * D + matching))


def test_flops_cli_reports_model_calls_and_backbone_evaluations(tmp_path, capsys):
    (tmp_path / "m.gin").write_text(TINY)
    code = main(["flops", str(tmp_path / "m.gin"), "--json", "--trajectory", "--sampler", "ddim", "--steps", "6",
                 "--repeats", "0", "--samples", "2",
                 "-b", "DiffusionTransformer.reducers = ['token_merging', 'fora']",
                 "-b", "reducers.token_merging.ratio = 0.5", "-b", "reducers.fora.interval = 2"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    traj = out["trajectory"]
    assert (traj["model_calls"], traj["backbone_evaluations"]) == (6, 3)
    assert traj["by_component_per_image"]["reducer:token_merging"] > 0
    assert out["useful_macs"] < flops.count_forward(build_model(tmp_path / "m.gin")[0],
                                                    *flops.measurement_inputs(dit(), 2)).useful_macs / 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA device runs this check")
def test_reducers_on_cuda():
    """Generators, layouts and caches on the GPU: neutral settings stay identical, composition runs."""
    for make in (dit, dcdit):
        base = generate(make().cuda(), num_samples=2, sampler="ddim", num_steps=4, device="cuda").images
        for name, settings in NEUTRAL.items():
            model = make([reducer(name, **settings)]).cuda()
            assert torch.equal(generate(model, num_samples=2, sampler="ddim", num_steps=4, device="cuda").images, base)
        model = make([reducer("fora", interval=2), reducer("token_merging", ratio=0.5),
                      reducer("teacache", threshold=0.2, **COEFFS)]).cuda()
        images = generate(model, num_samples=2, sampler="ddim", num_steps=4, cfg_scale=2.0, device="cuda").images
        assert images.isfinite().all()
