"""DC-DiT upcycled from a DiT: exact copies, frozen embedders, distillation, clear errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from ignite.engine import Engine

from dyncompute.diffusion import make_objective
from dyncompute.engine import TrainStep
from dyncompute.errors import ConfigError
from dyncompute.finetune import load_shared
from dyncompute.model import DiffusionTransformer
from dyncompute_plugins.tokenizers.dynamic_chunking.upcycle import (
    BlockDistillation,
    Upcycling,
    block_outputs,
    check_upcyclable,
    distillation_loss,
    upcycle,
)
from dyncompute_plugins.tokenizers.patchify import to_official_dit

KW = dict(input_size=8, in_channels=3, num_classes=5, depth=2, num_heads=4)
COPIED = ("backbone.blocks.", "t_embedder.", "y_embedder.")


def dit(hidden=32, patch=2, seed=0):
    torch.manual_seed(seed)
    m = DiffusionTransformer(**KW, hidden_size=hidden, tokenizer="patchify", tokenizer_kwargs={"patch_size": patch})
    for p in m.parameters():  # a "trained" DiT: nothing left at its zero init
        nn.init.normal_(p, std=0.05)
    return m.eval()


def dcdit(hidden=32, depth=2):
    torch.manual_seed(1)
    return DiffusionTransformer(**{**KW, "depth": depth}, hidden_size=hidden, tokenizer="dynamic_chunking",
                                tokenizer_kwargs={"enc_dec_factor": 4, "cond_adaptor": True})


def upcycled(teacher):
    model = dcdit()
    check_upcyclable(model, teacher, "dit.pt")
    upcycle(model, teacher)
    return model


def test_upcycled_blocks_and_embedders_equal_the_checkpoint_and_embedders_get_no_gradient():
    teacher = dit()
    model = upcycled(teacher)
    ours, theirs = model.state_dict(), teacher.state_dict()
    copied = [k for k in theirs if k.startswith(COPIED)]
    assert copied and all(torch.equal(ours[k], theirs[k]) for k in copied)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 4])
    model.train()
    out, info = model(x, t, y, return_info=True)
    (out.square().mean() + sum(info.aux_losses.values())).backward()
    for name, p in model.named_parameters():
        frozen = name.startswith(("t_embedder.", "y_embedder."))
        assert p.requires_grad != frozen and (p.grad is None) == frozen, name
    assert model.tokenizer.cond_norm.weight.grad is not None


def test_the_copied_blocks_get_their_own_learning_rate_scale():
    model = upcycled(dit())
    groups = Upcycling(source="unused", block_lr_scale=0.1).param_groups(model)
    blocks = {id(p) for p in model.backbone.blocks.parameters()}
    assert groups[1]["lr_scale"] == 0.1 and {id(p) for p in groups[1]["params"]} == blocks
    assert not blocks & {id(p) for p in groups[0]["params"]}
    assert not any(p is model.t_embedder.mlp[0].weight for g in groups for p in g["params"])  # frozen: left out
    with pytest.raises(ConfigError, match="block_lr_scale"):
        Upcycling(source="unused", block_lr_scale=0.0)


def test_official_dcdit_checkpoints_still_load_key_for_key_without_the_adaptor():
    model = DiffusionTransformer(**KW, hidden_size=32, tokenizer="dynamic_chunking",
                                 tokenizer_kwargs={"enc_dec_factor": 4})
    assert model.tokenizer.cond_norm is None and not any("cond_norm" in k for k in model.state_dict())


def test_wrong_width_or_not_a_dcdit_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"dit.pt has hidden_size = 64 but the DC-DiT config has hidden_size = 32"):
        check_upcyclable(dcdit(), dit(hidden=64), "dit.pt")
    with pytest.raises(ConfigError, match="not 'dynamic_chunking'"):
        check_upcyclable(dit(), dit(), "dit.pt")
    with pytest.raises(ConfigError, match=r"ckpt does not fit the model .*\(64, 256\) vs \(32, 256\)"):
        load_shared(dit(hidden=32), dit(hidden=64).state_dict(), "ckpt")


def _scatter(outs, tokens, grid=8):
    """Packed outputs at the tokens' positions of a full (B * grid², D) teacher layout."""
    full = []
    for o in outs:
        f = torch.zeros(tokens.num_samples * grid * grid, o.shape[-1])
        f[tokens.batch * grid * grid + tokens.pos[:, 0] * grid + tokens.pos[:, 1]] = o.reshape(-1, o.shape[-1])
        full.append(f)
    return full


def test_distillation_is_zero_when_student_and_teacher_see_the_same_backbone_input():
    teacher = dit(patch=1)  # one teacher token per pixel: every student token has its own
    student = upcycled(teacher)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 4])
    seen = {}
    student.backbone.register_forward_pre_hook(lambda m, a: seen.update(tokens=a[0], c=a[1]))
    student.eval()(x, t, y)
    tokens, c = seen["tokens"], seen["c"]
    student_outs = block_outputs(student.backbone, tokens, c)
    same = block_outputs(teacher.backbone, tokens, c)  # the teacher's blocks on the student's input
    assert distillation_loss(tokens, student_outs, _scatter(same, tokens), grid=8, patch=1).item() == 0.0
    other = block_outputs(teacher.backbone, tokens.with_x(tokens.x + 0.1), c)
    assert distillation_loss(tokens, student_outs, _scatter(other, tokens), grid=8, patch=1).item() > 0


def test_distillation_term_in_the_train_step_matches_patches_and_stops_after_its_steps():
    teacher = dit(patch=2)
    student = upcycled(teacher)
    term = BlockDistillation(teacher, weight=1.0, steps=1)
    term.watch(student)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    step = TrainStep(student, make_objective("gaussian"), opt, 1.0, torch.device("cpu"), loss_terms=(term,))
    engine = Engine(step)
    engine.state.budget = {}
    batch = {"x": torch.randn(2, 3, 8, 8), "y": torch.tensor([0, 3])}
    engine.state.iteration = 1
    assert step(engine, batch)["aux_distill"] > 0
    engine.state.iteration = 2
    assert "aux_distill" not in step(engine, batch)


def test_upcycling_reads_an_original_dit_file(tmp_path):
    teacher = dit()
    path = tmp_path / "DiT-tiny.pt"
    torch.save(to_official_dit(teacher), path)
    model = dcdit()
    extension = Upcycling(source=str(path), distill_steps=1)
    extension.setup(model)
    assert torch.equal(model.backbone.blocks[1].mlp.fc2.weight, teacher.backbone.blocks[1].mlp.fc2.weight)
    assert not model.t_embedder.mlp[0].weight.requires_grad and len(extension.loss_terms(model)) == 1
    with pytest.raises(ConfigError, match="DiT-tiny.pt has depth = 2 but the DC-DiT config has depth = 3"):
        Upcycling(source=str(path)).setup(dcdit(depth=3))


def test_upcycle_command_names_bad_input_and_exits_2(tmp_path, capsys):
    from dyncompute.cli import main

    assert main(["upcycle", str(tmp_path / "missing"), "experiments/upcycling/upcycle.gin"]) == 2
    assert "DiT to upcycle not found" in capsys.readouterr().err
    wide = tmp_path / "DiT-wide.pt"
    torch.save(to_official_dit(dit(hidden=32)), wide)  # the config's DC-DiT has width 64
    assert main(["upcycle", str(wide), "experiments/upcycling/upcycle.gin", "--run-dir", str(tmp_path / "r"),
                 "-b", "train.progress = False"]) == 2
    assert "hidden_size = 32 but the DC-DiT config has hidden_size = 64" in capsys.readouterr().err


def test_pos_scale_gives_each_pixel_the_code_its_dit_patch_had():
    """pos_scale = 1/P: the token at pixel (P i, P j) carries the DiT/P's position code of patch (i, j)."""
    teacher = dit(patch=2)
    student = DiffusionTransformer(**KW, hidden_size=32, tokenizer="dynamic_chunking",
                                   tokenizer_kwargs={"enc_dec_factor": 4, "pos_scale": 0.5})
    grid = KW["input_size"]
    pixel = student.tokenizer.pos_embed.view(grid, grid, -1)[::2, ::2].reshape(-1, 32)
    torch.testing.assert_close(pixel, teacher.tokenizer.pos_embed[0])
    assert not torch.allclose(dcdit().tokenizer.pos_embed.view(grid, grid, -1)[::2, ::2].reshape(-1, 32), pixel)
    with pytest.raises(ConfigError, match="pos_scale"):
        DiffusionTransformer(**KW, hidden_size=32, tokenizer="dynamic_chunking", tokenizer_kwargs={"pos_scale": 0})


def test_bridged_upcycle_computes_the_dit_when_every_pixel_is_kept():
    """dit_bridge: the DiT's patch embedding and final layer beside the scaffold. With every pixel kept,
    each patch's token appears once per pixel; attention over identical copies of every key equals attention
    over the patches, so the upcycled DC-DiT's prediction is the DiT's, exactly (up to float rounding)."""
    teacher = dit(hidden=32, patch=2)
    torch.manual_seed(1)
    model = DiffusionTransformer(**KW, hidden_size=32, tokenizer="dynamic_chunking",
                                 tokenizer_kwargs={"enc_dec_factor": 4, "cond_adaptor": True, "dit_bridge": 2})
    check_upcyclable(model, teacher, "dit.pt")
    upcycle(model, teacher)
    torch.testing.assert_close(model.tokenizer.bridge.x_embedder.weight, teacher.tokenizer.x_embedder.proj.weight)
    with torch.no_grad():
        model.tokenizer.router.residual_scorer[-1].bias.fill_(50.0)  # every pixel a boundary
    model.eval()
    g = torch.Generator().manual_seed(4)
    x, t, y = torch.randn(3, 3, 8, 8, generator=g), torch.tensor([10, 500, 900]), torch.tensor([0, 2, 4])
    with torch.no_grad():
        out, info = model(x, t, y, return_info=True)
        expected = teacher(x, t, y)
    assert bool(info.state.mask.all())
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="dit_bridge = 4"):
        upcycle(model, dit(hidden=32, patch=4))


def test_bridge_prior_starts_the_router_on_the_dit_patch_grid():
    model = DiffusionTransformer(**KW, hidden_size=32, tokenizer="dynamic_chunking",
                                 tokenizer_kwargs={"enc_dec_factor": 4, "dit_bridge": 2})
    model.eval()
    with torch.no_grad():
        _, info = model(torch.randn(2, 3, 8, 8), torch.tensor([5, 600]), torch.tensor([1, 3]), return_info=True)
    first_pixels = torch.zeros(8, 8, dtype=torch.bool)
    first_pixels[::2, ::2] = True
    first_pixels[-1, -1] = True  # DC-DiT's rule: the last token is always a boundary
    assert torch.equal(info.state.mask, first_pixels.flatten().expand(2, -1))


def test_prior_anneals_linearly_from_the_iteration_on_model_and_ema():
    model = DiffusionTransformer(**KW, hidden_size=32, tokenizer="dynamic_chunking",
                                 tokenizer_kwargs={"enc_dec_factor": 4, "dit_bridge": 2})
    ema = DiffusionTransformer(**KW, hidden_size=32, tokenizer="dynamic_chunking",
                               tokenizer_kwargs={"enc_dec_factor": 4, "dit_bridge": 2})
    extension = Upcycling(source="unused", prior_steps=10)
    trainer = Engine(lambda engine, batch: None)
    extension.attach(trainer, model, ema, None)
    trainer.run([0] * 6, max_epochs=1)  # the handler ran at the start of iteration 6: 1 - 5/10
    for m in (model, ema):
        assert float(m.tokenizer.bridge.prior_scale) == pytest.approx(0.5)
    assert "tokenizer.bridge.prior_scale" in model.state_dict()  # a resumed or loaded run keeps its scale
    trainer.run([0] * 20, max_epochs=2)
    assert float(model.tokenizer.bridge.prior_scale) == 0.0
    with pytest.raises(ConfigError, match="prior_steps"):
        Upcycling(source="unused", prior_steps=-1)


def test_bridge_start_all_keeps_every_pixel_and_bad_starts_are_named():
    model = DiffusionTransformer(**KW, hidden_size=32, tokenizer="dynamic_chunking",
                                 tokenizer_kwargs={"enc_dec_factor": 4, "dit_bridge": 2, "bridge_start": "all"})
    model.eval()
    with torch.no_grad():
        _, info = model(torch.randn(2, 3, 8, 8), torch.tensor([5, 600]), torch.tensor([1, 3]), return_info=True)
    assert bool(info.state.mask.all())
    with pytest.raises(ConfigError, match="bridge_start"):
        DiffusionTransformer(**KW, hidden_size=32, tokenizer="dynamic_chunking",
                             tokenizer_kwargs={"dit_bridge": 2, "bridge_start": "corners"})


def test_bridge_places_grid_only_thins_patch_tokens():
    """With the prior faded, the router keeps or drops each patch's first pixel and nothing else; its
    ratio loss balances its own decisions there (N per patch = target_ratio / P^2)."""
    model = DiffusionTransformer(**KW, hidden_size=32, tokenizer="dynamic_chunking",
                                 tokenizer_kwargs={"enc_dec_factor": 4, "dit_bridge": 2, "bridge_places": "grid",
                                                   "target_ratio": 5.0})
    bridge = model.tokenizer.bridge
    bridge.prior_scale.fill_(0.0)
    p = torch.full((2, 64), 0.9)  # the router would keep every pixel
    q = bridge.route(p)
    assert torch.equal(q > 0.5, (bridge.place == 0).expand(2, -1))
    p[:, bridge.place == 0] = torch.linspace(0.1, 0.9, 16)
    view, decisions, N = bridge.ratio_view(p, 5.0)
    assert view.shape == (2, 16) and N == 5.0 / 4 and int(decisions.sum()) == 2 * 8
    model.eval()
    with torch.no_grad():
        _, info = model(torch.randn(2, 3, 8, 8), torch.tensor([5, 600]), torch.tensor([1, 3]), return_info=True)
    off_grid = info.state.mask & (bridge.place != 0)
    assert not off_grid[:, :-1].any()  # only the last pixel (always a boundary) may sit off the grid
    with pytest.raises(ConfigError, match="target_ratio must exceed 4"):
        DiffusionTransformer(**KW, hidden_size=32, tokenizer="dynamic_chunking",
                             tokenizer_kwargs={"dit_bridge": 2, "bridge_places": "grid"})
    with pytest.raises(ConfigError, match="bridge_places"):
        DiffusionTransformer(**KW, hidden_size=32, tokenizer="dynamic_chunking",
                             tokenizer_kwargs={"dit_bridge": 2, "bridge_places": "edges", "target_ratio": 5.0})


def test_bridge_fade_count_drops_a_growing_share_of_the_wanted_patches():
    """``bridge_fade = 'count'``: at prior scale s, (1 - s) of the patches the router would drop are
    dropped, those with the lowest probability first; nothing off the patches' first pixels is kept."""
    model = DiffusionTransformer(**KW, hidden_size=32, tokenizer="dynamic_chunking",
                                 tokenizer_kwargs={"enc_dec_factor": 4, "dit_bridge": 2, "bridge_places": "grid",
                                                   "target_ratio": 5.0, "bridge_fade": "count"})
    bridge = model.tokenizer.bridge
    first = bridge.place == 0
    p = torch.full((1, 64), 0.9)
    p[0, first] = torch.linspace(0.05, 0.95, 16)  # the router would drop the 8 lowest
    for scale, dropped in ((1.0, 0), (0.5, 4), (0.25, 6), (0.0, 8)):
        bridge.prior_scale.fill_(scale)
        keep = bridge.route(p) > 0.5
        assert int((~keep[0, first]).sum()) == dropped and not keep[0, ~first].any()
        assert (~keep[0, first]).nonzero().flatten().tolist() == list(range(dropped))  # lowest p first
    with pytest.raises(ConfigError, match="bridge_fade"):
        DiffusionTransformer(**KW, hidden_size=32, tokenizer="dynamic_chunking",
                             tokenizer_kwargs={"dit_bridge": 2, "bridge_fade": "count"})


def test_bridge_dropped_scaffold_zeroes_the_dit_prediction_of_dropped_patches():
    """``bridge_dropped = 'scaffold'``: pixels whose patch kept no token get no DiT prediction (a
    neighbour's), kept patches keep theirs."""
    model = DiffusionTransformer(**KW, hidden_size=32, tokenizer="dynamic_chunking",
                                 tokenizer_kwargs={"enc_dec_factor": 4, "dit_bridge": 2, "bridge_places": "grid",
                                                   "target_ratio": 5.0, "bridge_dropped": "scaffold"})
    bridge = model.tokenizer.bridge
    nn.init.normal_(bridge.final_layer.linear.weight)
    z, c = torch.randn(1, 64, 32), torch.randn(1, 32)
    mask = (bridge.place == 0)[None].clone()
    mask[0, 0] = False  # patch (0, 0) dropped
    out = bridge.head(z, c, mask)
    full = bridge.head(z, c)
    in_first_patch = bridge.patch_first == 0
    assert not out[0, in_first_patch].any()
    assert torch.equal(out[0, ~in_first_patch], full[0, ~in_first_patch])
    with pytest.raises(ConfigError, match="bridge_dropped"):
        DiffusionTransformer(**KW, hidden_size=32, tokenizer="dynamic_chunking",
                             tokenizer_kwargs={"dit_bridge": 2, "bridge_dropped": "nowhere"})


def test_bridge_keep_above_keeps_every_patch_at_high_noise():
    """``bridge_keep_above = T``: samples at t >= T keep every patch's first pixel whatever the router wants;
    below T the router thins as before. The model hands the tokenizer t (its ``timestep_aware``)."""
    kw = {"enc_dec_factor": 4, "dit_bridge": 2, "bridge_places": "grid", "target_ratio": 5.0,
          "bridge_fade": "count", "bridge_keep_above": 500}
    model = DiffusionTransformer(**KW, hidden_size=32, tokenizer="dynamic_chunking", tokenizer_kwargs=kw)
    tok = model.tokenizer
    assert tok.timestep_aware
    tok.bridge.prior_scale.fill_(0.0)  # the prior has faded: the router decides
    first = tok.bridge.place == 0
    p = torch.full((2, 64), 0.9)
    p[:, first] = torch.linspace(0.05, 0.95, 16)  # the router would drop 8 patches
    keep = tok.bridge.route(p, torch.tensor([499, 500])) > 0.5
    assert int(keep[0, first].sum()) == 8 and bool(keep[1, first].all()) and not keep[:, ~first].any()
    x = torch.randn(2, KW["in_channels"], KW["input_size"], KW["input_size"])
    with torch.no_grad():
        info = model(x, torch.tensor([999, 999]), torch.tensor([0, 1]), return_info=True)[1]
    assert bool(info.state.mask[:, first].all())  # every patch, at high noise (and the always-kept last pixel)
    for bad, match in (({"bridge_keep_above": -1}, "bridge_keep_above"),
                       ({"bridge_keep_above": 500, "dit_bridge": 0, "bridge_places": "any",
                         "bridge_fade": "logit"}, "needs a DiT bridge")):
        with pytest.raises(ConfigError, match=match):
            DiffusionTransformer(**KW, hidden_size=32, tokenizer="dynamic_chunking", tokenizer_kwargs={**kw, **bad})
