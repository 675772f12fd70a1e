"""DC-DiT as the `dynamic_chunking` tokenizer plugin: official reference, routing, chunking, losses."""
from pathlib import Path

import pytest
import torch

from dyncompute import DiffusionTransformer, UnknownPluginError
from dyncompute_plugins.tokenizers.dynamic_chunking import DynamicChunking, load_official_dcdit, to_official_dcdit
from dyncompute_plugins.tokenizers.dynamic_chunking.chunking import drop_tail, nearest_kept, pad_packed
from dyncompute_plugins.tokenizers.dynamic_chunking.losses import ratio_loss

REF = Path(__file__).resolve().parent / "reference" / "dcdit_ref_small.pt"  # copied from shared/reference


def tiny(**kw) -> DiffusionTransformer:
    torch.manual_seed(0)
    tok = dict(router=kw.pop("router", "predictability"), dechunk=kw.pop("dechunk", "gaussian_nearest"))
    tok.update(kw)
    tokenizer = DynamicChunking(hidden_size=64, in_channels=4, out_channels=8, input_size=8, **tok)
    model = DiffusionTransformer(input_size=8, in_channels=4, num_classes=10, hidden_size=64, depth=2,
                                 num_heads=4, tokenizer=tokenizer)
    for p in model.tokenizer.final_layer.parameters():  # zero-init output would hide every gradient
        torch.nn.init.normal_(p, std=0.02)
    for blk in model.backbone.blocks:
        torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.02)
    return model


def batch(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.arange(n) % 10


def test_official_reference_matches():
    ref = torch.load(REF, weights_only=True)
    model = load_official_dcdit(ref["state_dict"], ref["config"]).eval()
    x, t, y = (ref["inputs"][k] for k in "xty")
    for rho, exp in ref["expected"].items():
        with torch.no_grad():
            out, info = model(x, t, y, tail_drop=rho, return_info=True)
        assert (out - exp["out"]).abs().max() < 1e-4
        assert (info.state.p - exp["p"]).abs().max() < 1e-5
        assert torch.equal(info.state.mask, exp["mask"]) and torch.equal(info.state.mask_natural, exp["mask_natural"])
    exported = to_official_dcdit(model)
    assert set(exported) == set(ref["state_dict"])


def test_ratio_loss_is_one_at_target_and_grows_away():
    for N in (4, 16, 2.5):
        L = 400
        k = round(L / N)
        mask = torch.zeros(2, L, dtype=torch.bool)
        mask[:, :k] = True
        p = torch.full((2, L), k / L)
        assert ratio_loss(p, mask, N).item() == pytest.approx(1.0, abs=1e-6)
        for f in (0.02, 0.6, 0.9):  # F = G away from 1/N
            m = torch.zeros(2, L, dtype=torch.bool)
            m[:, : int(f * L)] = True
            assert ratio_loss(torch.full((2, L), int(f * L) / L), m, N) > 1.0


def test_gradients_reach_router_through_ste_and_ratio_loss():
    model = tiny().train()
    x, t, y = batch()
    out, info = model(x, t, y, return_info=True)
    router = model.tokenizer.router
    params = list(router.parameters())
    grads = torch.autograd.grad(out.square().mean(), params + [info.state.confidence], retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads)  # the confidence gets its gradient through the STE
    grads = torch.autograd.grad(info.aux_losses["ratio"], list(router.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_ste_forward_is_identity_and_passes_gradient():
    from dyncompute_plugins.tokenizers.dynamic_chunking.chunking import STE
    c = torch.rand(5, requires_grad=True)
    z = torch.randn(5)
    (z * STE.apply(c)).sum().backward()
    assert torch.equal(c.grad, z)


def test_all_boundaries_chunk_dechunk_is_exact():
    model = tiny().eval()
    tok = model.tokenizer
    torch.nn.init.constant_(tok.router.residual_scorer[-1].bias, 60.0)  # p == 1 everywhere
    x, t, y = batch()
    with torch.no_grad():
        c = model.condition(t, y)
        tokens, state = tok.encode(x, c)
        assert state.mask.all() and tokens.uniform
        h = tok.encoder(tok.stem(x.contiguous(memory_format=torch.channels_last)), c)  # as encode runs it
        assert torch.equal(tokens.batched(), h + tok.pos_embed)
        from dyncompute.layers import grid_positions
        assert torch.equal(tokens.pos, grid_positions(8).repeat(3, 1))
        assert torch.equal(nearest_kept(state.mask, 8), torch.arange(64).expand(3, -1))
        # the whole path equals a dense computation over the full grid
        z = tok.backbone_norm(model.backbone(tokens, c).batched())
        pk = state.p.clamp(1e-4, 1 - 1e-4)
        from dyncompute.layers import grid_positions as gp
        pos = gp(8).float()
        w = torch.exp(-torch.cdist(pos, pos) ** 2 / 2)[None] * pk[:, None]
        dense = pk[..., None] * z + (1 - pk[..., None]) * torch.bmm(w / (w.sum(-1, keepdim=True) + 1e-8), z)
        hd = tok.decoder((dense + state.residual).transpose(1, 2).reshape(3, 64, 8, 8), c)
        expected = tok.final_layer(hd, c).transpose(1, 2).reshape(3, 8, 8, 8)
        assert torch.allclose(model(x, t, y), expected, atol=1e-6)


def test_nearest_plug_back_hand_made_mask():
    mask = torch.zeros(1, 16, dtype=torch.bool)  # 4x4 grid, kept: (0,0) (0,3) (2,1) (3,3)
    for r, c in [(0, 0), (0, 3), (2, 1), (3, 3)]:
        mask[0, r * 4 + c] = True
    # squared distances worked by hand; (1,2) is 2 from k1 and from k2: the tie goes to k1
    expected = torch.tensor([[0, 0, 1, 1],
                             [0, 2, 1, 1],
                             [2, 2, 2, 3],
                             [2, 2, 3, 3]])
    assert torch.equal(nearest_kept(mask, 4).view(4, 4), expected)


def test_batch_of_different_lengths_matches_single_samples():
    model = tiny().eval()
    torch.nn.init.constant_(model.tokenizer.router.residual_scorer[-1].bias, 0.0)
    x, t, y = batch(4, seed=3)
    x = x * torch.tensor([0.2, 1.0, 3.0, 0.5])[:, None, None, None]
    with torch.no_grad():
        out, info = model(x, t, y, return_info=True)
        assert len(set(info.tokens_per_sample)) > 1, info.tokens_per_sample
        for i in range(4):
            alone = model(x[i:i + 1], t[i:i + 1], y[i:i + 1])
            assert (alone - out[i:i + 1]).abs().max() < 1e-5


def test_tail_drop_rule_and_per_sample_fraction():
    p = torch.tensor([[1.0, 0.9, 0.6, 0.7, 0.2, 1.0], [1.0, 0.8, 0.1, 0.55, 0.3, 1.0]])
    mask = p > 0.5
    out = drop_tail(p, mask, torch.tensor([0.0, 0.5]))
    assert torch.equal(out[0], mask[0])
    assert torch.equal(out[1], torch.tensor([True, False, False, False, False, True]))  # floor(0.5*4)=2
    assert torch.equal(drop_tail(p, mask, 0.3), torch.tensor([[1, 1, 0, 1, 0, 1], [1, 1, 0, 0, 0, 1]]).bool())


def test_budgets_multi_budget_and_lite_cfg():
    from dyncompute.engine import MultiBudget

    model = tiny(budget_set=(0.0, 0.5), budget_warmup_steps=2).train()
    x, t, y = batch(2)
    draw = MultiBudget(*model.tokenizer.training_budgets())  # the trainer's per-step handler
    drops = []
    for step in range(8):
        _, info = model(x, t, y, return_info=True, **draw.draw(step))
        drops.append(float(info.state.tail_drop))
    assert drops[:2] == [0.0, 0.0] and set(drops[2:]) == {0.0, 0.5}
    model.eval()
    with torch.no_grad():
        xx = torch.cat([x, x])
        yy = torch.cat([y, torch.full_like(y, 10)])
        tt = torch.cat([t, t])
        out, info = model.forward_with_cfg(xx, tt, yy, cfg_scale=4.0, uncond_budget={"tail_drop": 0.6},
                                           return_info=True)
        n = info.tokens_per_sample
        assert out.shape == (4, 8, 8, 8) and all(n[i + 2] < n[i] for i in range(2))


@pytest.mark.parametrize("router,dechunk", [("cosine", "gaussian_nearest"), ("random", "gaussian_nearest"),
                                            ("predictability", "ema_raster")])
def test_other_routers_and_dechunkers_train(router, dechunk):
    model = tiny(router=router, dechunk=dechunk).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t, y = batch(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        out, info = model(x, t, y, return_info=True)
        loss = (out[:, :4] - x).square().mean() + sum(info.aux_losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k]) and "router" in k]
    assert router == "random" or changed


def test_ema_raster_repeats_until_next_boundary():
    from dyncompute.tokens import Tokens
    from dyncompute_plugins.tokenizers.dynamic_chunking.dechunk import EmaRaster
    mask = torch.tensor([[True, False, True, False]])
    p = torch.tensor([[1.0, 0.1, 0.5, 0.2]])
    z = torch.tensor([[1.0], [3.0]])
    tokens = Tokens.from_lengths(z, [2], torch.tensor([[0, 0], [0, 2]]))
    out = EmaRaster()(z, tokens, p, mask, (1, 4))[0, :, 0]
    h0 = 1 - 1e-4
    h1 = 0.5 * 3 + 0.5 * h0
    assert torch.allclose(out, torch.tensor([h0, h0, h1, h1]))


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="target_ratio"):
        tiny(target_ratio=1.0)
    with pytest.raises(ValueError, match="tail_drop"):
        tiny(tail_drop=1.0)
    with pytest.raises(ValueError, match="tail_drop"):
        tiny(budget_set=(0.2, -0.1))
    with pytest.raises(UnknownPluginError, match="predictability"):
        tiny(router="nope")
    with pytest.raises(UnknownPluginError, match="gaussian_nearest"):
        tiny(dechunk="nope")
    model = tiny().eval()
    x, t, y = batch(2)
    with pytest.raises(ValueError, match="tail_drop"):
        model(x, t, y, tail_drop=torch.tensor([0.1, 1.2]))
    with pytest.raises(TypeError, match="tail_drop"):
        model(x, t, y, budget=0.3)


def test_registered_and_gin_configurable():
    from dyncompute.registry import TOKENIZERS
    assert TOKENIZERS.get("dynamic_chunking") is DynamicChunking
    model = DiffusionTransformer(input_size=8, in_channels=4, num_classes=10, hidden_size=64, depth=1,
                                 num_heads=4, tokenizer="dynamic_chunking")
    x, t, y = batch(2)
    out, info = model(x, t, y, return_info=True)
    assert out.shape == (2, 8, 8, 8) and info.state.p.shape == (2, 64) and info.state.mask.dtype == torch.bool
    assert model.tokenizer.token_map(info.state).shape == (2, 8, 8)


def test_views_record_and_plot(tmp_path):
    from dyncompute.views import record_trajectory, write_views

    model = tiny().eval()
    files = write_views(model, tmp_path, num_samples=2, steps=3)
    assert Path(files["boundary_maps"]).exists() and Path(files["kept_vs_timestep"]).exists()
    patch = DiffusionTransformer(input_size=8, in_channels=4, num_classes=10, hidden_size=64, depth=1,
                                 num_heads=4, tokenizer="patchify")
    traj = record_trajectory(patch, num_samples=2, num_steps=2)
    assert traj.maps.shape == (2, 2, 4, 4) and traj.maps.all()


def test_nearest_dechunk_is_gaussian_nearest_without_smoothing():
    """The no-smoothing ablation copies the nearest kept token: Gaussian smoothing as sigma -> 0."""
    from dyncompute.tokens import Tokens
    from dyncompute_plugins.tokenizers.dynamic_chunking.dechunk import GaussianNearest, Nearest
    mask = torch.tensor([[True, False, False, True, False, True]])
    p = torch.tensor([[0.9, 0.2, 0.1, 0.7, 0.3, 0.6]])
    z = torch.tensor([[1.0], [2.0], [3.0]])
    tokens = Tokens.from_lengths(z, [3], torch.tensor([[0, 0], [1, 0], [1, 2]]))
    out = Nearest()(z, tokens, p, mask, (2, 3))[0, :, 0]
    assert torch.equal(out, torch.tensor([1.0, 1.0, 3.0, 2.0, 2.0, 3.0]))
    assert torch.allclose(GaussianNearest(sigma=1e-3)(z, tokens, p, mask, (2, 3))[0, :, 0], out)
    model = tiny(dechunk="nearest")
    assert torch.isfinite(model(*batch(2))).all()


def test_dechunk_weights_drop_only_what_is_below_float32_resolution():
    """Far pairs (weights that would be subnormal floats, slow on x86) get weight 0: the Gaussian smoothing
    equals the one over every pair, and the raster EMA its recurrence, to float32 rounding, on a grid where
    such pairs exist."""
    from dyncompute.tokens import Tokens
    from dyncompute_plugins.tokenizers.dynamic_chunking.chunking import nearest_kept, previous_kept
    from dyncompute_plugins.tokenizers.dynamic_chunking.dechunk import P_CLAMP, EmaRaster, GaussianNearest

    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 1024, generator=g) < 0.3
    mask[:, 0] = True
    p = torch.rand(2, 1024, generator=g).clamp(P_CLAMP, 1 - P_CLAMP)
    idx = torch.arange(1024)
    pos = torch.cat([torch.stack([idx[m] // 32, idx[m] % 32], -1) for m in mask])
    lengths = mask.sum(1).tolist()
    z = torch.randn(sum(lengths), 8, generator=g)
    tokens = Tokens.from_lengths(z, lengths, pos)
    out, ema = GaussianNearest()(z, tokens, p, mask, (32, 32)), EmaRaster()(z, tokens, p, mask, (32, 32))
    for b, (zb, m) in enumerate(zip(z.split(lengths), mask)):  # every pair, written out per sample
        q, pk = pos[sum(lengths[:b]):][:lengths[b]].float(), p[b, m]
        w = torch.exp(-torch.cdist(q, q).square() / 2) * pk[None]
        assert ((w > 0) & (w < torch.finfo(torch.float32).tiny)).any()  # the case the cut is for
        smoothed = pk[:, None] * zb + (1 - pk[:, None]) * (w / (w.sum(-1, keepdim=True) + 1e-8)) @ zb
        ref = smoothed[nearest_kept(m[None], 32)[0]]
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-6)
        h = [pk[0] * zb[0]]
        for j in range(1, len(zb)):
            h.append(pk[j] * zb[j] + (1 - pk[j]) * h[-1])
        torch.testing.assert_close(ema[b], torch.stack(h)[previous_kept(m[None])[0]], rtol=1e-4, atol=1e-5)


def test_router_and_dechunk_run_in_float32_under_autocast():
    """As the official fp32_router_dechunk: inside a bfloat16 autocast region the router's probabilities
    equal its float32 ones on the same (bfloat16) encoder output, and the de-chunker returns float32."""
    model = tiny()
    tok = model.tokenizer
    x, t, y = batch()
    seen = {}
    hooks = [tok.router.register_forward_hook(lambda m, i, o: seen.update(h=i[0], p=o)),
             tok.dechunker.register_forward_hook(lambda m, i, o: seen.update(dechunked=o.dtype))]
    with torch.no_grad():
        c = model.condition(t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens, state = tok.encode(x, c)
            tok.to_grid(tokens, state, c)
        for hook in hooks:
            hook.remove()
        assert seen["h"].dtype == torch.bfloat16  # the encoder did run in bfloat16
        assert torch.equal(seen["p"], tok.router(seen["h"], state.grid))
    assert seen["p"].dtype == torch.float32 and seen["dechunked"] == torch.float32


def test_pad_packed_puts_each_sample_at_the_start_of_its_row():
    """Padding from the device's cu_seqlens (no boolean indexing) on lengths with an empty sample."""
    from dyncompute.tokens import Tokens

    lengths = [3, 0, 5, 1]
    x = torch.arange(9.0)[:, None].expand(9, 2)
    tokens = Tokens.from_lengths(x, lengths, torch.zeros(9, 2, dtype=torch.long))
    out, valid = pad_packed(x, tokens)
    assert out.shape == (4, 5, 2) and valid.tolist() == [[n > i for i in range(5)] for n in lengths]
    assert torch.equal(out[valid], x) and not out[~valid].any()
