"""DyDiT on the reducer seam: width-masked ops, gates, FLOPs loss, accounting, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from ignite.engine import Engine

from dyncompute.diffusion import make_objective
from dyncompute.engine import TrainStep
from dyncompute.errors import ConfigError
from dyncompute.flops import trace_forward
from dyncompute.model import DiffusionTransformer
from dyncompute.observe import Observed
from dyncompute.tokens import Tokens
from dyncompute.trajectory import TrajectoryRecorder
from dyncompute_plugins.reducers.dydit import DyDiT

KW = dict(input_size=8, in_channels=3, num_classes=5, hidden_size=32, depth=2, num_heads=4)


def model(reducers=(), tokenizer="patchify", **kw):
    torch.manual_seed(0)
    m = DiffusionTransformer(**KW, tokenizer=tokenizer, reducers=reducers, **kw)
    for name, p in m.named_parameters():  # leave DiT's zero init so that every block contributes
        if not name.startswith("reducers.") and "norm" not in name:
            nn.init.normal_(p, std=0.05)
    if tokenizer == "dynamic_chunking":  # a router that keeps some of the tokens, differently per sample
        nn.init.constant_(m.tokenizer.router.residual_scorer[-1].bias, 0.0)
    return m


def inputs(n=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g), torch.tensor([10, 500, 900][:n]), torch.arange(n) % 5


def with_dydit(plain, **settings):
    dy = DyDiT(**settings)
    m = model([dy], tokenizer=plain.config.tokenizer, tokenizer_kwargs=plain.config.tokenizer_kwargs)
    m.load_state_dict(plain.state_dict(), strict=False)
    return m, dy


def scramble(dy: DyDiT, seed: int = 0) -> None:
    """Routers and gates that switch some heads, channel groups and tokens off."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in [*dy.head_routers, *dy.channel_routers]:
            r.linear.weight.copy_(torch.randn(r.linear.weight.shape, generator=g))
            r.linear.bias.zero_()
        for gate in dy.token_gates:
            gate.mlp[0].weight.copy_(torch.randn(gate.mlp[0].weight.shape, generator=g))
            gate.mlp[-1].bias.fill_(0.0)


def test_every_gate_on_equals_the_plain_model_exactly():
    plain = model()
    dy_model, _ = with_dydit(plain, width_bias_init=60.0, token_bias_init=60.0, noise_anneal_steps=10)
    x, t, y = inputs()
    assert torch.equal(dy_model.eval()(x, t, y), plain.eval()(x, t, y))
    plain.train(), dy_model.train()
    torch.manual_seed(3)
    a = plain(x, t, y)
    torch.manual_seed(3)
    b, info = dy_model(x, t, y, return_info=True)
    assert torch.equal(a, b)  # straight-through gates are exactly 1 in the forward, noise or not
    assert set(info.aux_losses) == {"dydit.flops"}


@pytest.mark.parametrize("packed", [False, True])
def test_skipped_heads_and_channels_equal_the_masked_computation(packed):
    """Inference skips what is off; training multiplies by the mask: both give the same output."""
    block = model().backbone.blocks[0].eval()
    g = torch.Generator().manual_seed(2)
    lengths = [5, 3, 4] if packed else [4, 4, 4]
    x = torch.randn(sum(lengths), 32, generator=g)
    tokens = Tokens.from_lengths(x, lengths, torch.zeros(sum(lengths), 2, dtype=torch.long))
    h = tokens.batched()
    active = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32)
    for op in (block.attn, block.run_mlp):
        skipped = op(h, tokens, active=active)
        masked = op(h, tokens, active=active.clone().requires_grad_(True))
        torch.testing.assert_close(skipped, masked, rtol=1e-5, atol=1e-6)
        assert torch.equal(op(h, tokens, active=torch.ones(3, 4)), op(h, tokens))


def test_noise_free_training_takes_the_inference_decisions():
    """Once the noise is annealed away, training runs exactly what inference runs (masked vs skipped)."""
    m, dy = with_dydit(model(), noise_anneal_steps=4)
    m.y_embedder.dropout_prob = 0.0  # no label dropout in training either
    scramble(dy)
    x, t, y = inputs()
    dy.schedule(4)
    assert dy.noise == 0.0
    ran_in_training = m.train()(x, t, y)
    torch.testing.assert_close(ran_in_training, m.eval()(x, t, y), rtol=1e-5, atol=1e-6)
    dy.schedule(0)
    assert dy.noise == 1.0


def test_flops_loss_is_on_the_hard_decisions_and_pushes_gates_off():
    m, dy = with_dydit(model(), target=0.5, width_bias_init=0.5, token_bias_init=0.5)
    for gate in dy.token_gates:
        nn.init.zeros_(gate.mlp[-1].weight)  # every logit is the bias
    x, t, y = inputs()
    m.train()
    _, info = m(x, t, y, return_info=True)
    loss = info.aux_losses["dydit.flops"]
    assert loss.item() == pytest.approx(2.0 * 0.5**2)  # every gate on (logit 0.5 > 0): ratio 1
    loss.backward()
    assert dy.head_routers[0].linear.bias.grad.gt(0).all()  # above the target: pushed off
    assert dy.token_gates[0].mlp[-1].bias.grad.item() > 0
    assert m.tokenizer.final_layer.linear.weight.grad is None  # nothing after the last gate


def test_schedule_and_bad_targets():
    dy = DyDiT(target=0.5, target_warmup_steps=10)
    dy.schedule(0)
    assert dy.current_target == 1.0
    dy.schedule(5)
    assert dy.current_target == pytest.approx(0.75)
    dy.schedule(50)
    assert dy.current_target == 0.5
    for bad in (0.0, -0.1, 1.5, "0.5"):
        with pytest.raises(ConfigError, match=r"reducers.dydit.target .* \(0, 1\]"):
            DyDiT(target=bad)


def test_dydit_needs_the_seam():
    with pytest.raises(ConfigError, match="reducer seam"):
        DyDiT().check_model(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="channel_groups"):
        model([DyDiT(channel_groups=5)])


def test_accounting_counts_what_ran():
    """Per-row costs composed from what each block reported equal fvcore's count of the whole forward."""
    m, dy = with_dydit(model())
    scramble(dy)
    m.eval()
    x, t, y = inputs()
    rec = TrajectoryRecorder(m)
    _, info = m(x, t, y, return_info=True)
    assert any(g < (4, 4) for b in info.blocks for g in b.attention_groups)
    assert any(n < 16 for b in info.blocks for n in b.mlp)
    Observed(m, [rec])(x, t, y=y)
    count = rec.count(3)
    assert sum(count.per_image_useful_macs) == trace_forward(m, x, t, y).macs
    plain = TrajectoryRecorder(m.__class__(**KW, tokenizer="patchify"))
    Observed(plain.model, [plain])(x, t, y=y)
    assert count.useful_macs_per_image < plain.count(3).useful_macs_per_image


def test_composes_with_packed_dynamic_chunking_tokens():
    plain = model(tokenizer="dynamic_chunking", tokenizer_kwargs=dict(enc_dec_factor=4))
    m, dy = with_dydit(plain, target=0.5, width_bias_init=0.5, token_bias_init=0.5)
    x, t, y = inputs()
    m.train()
    out, info = m(x, t, y, return_info=True)
    assert len(set(info.tokens_per_sample)) > 1  # variable lengths reached the gates
    (out.square().mean() + sum(info.aux_losses.values())).backward()
    assert dy.token_gates[1].mlp[-1].bias.grad is not None
    scramble(dy)
    m.eval()
    _, info = m(x, t, y, return_info=True)
    assert any(mlp < att for b in info.blocks for mlp, att in zip(b.mlp, b.attention))


def test_the_trainer_adds_the_reducers_aux_losses():
    m, _ = with_dydit(model(), target=0.5, width_bias_init=0.5, token_bias_init=0.5)
    step = TrainStep(m, make_objective("gaussian"), torch.optim.AdamW(m.parameters()), 1.0, torch.device("cpu"))
    engine = Engine(step)
    engine.state.budget = {}
    out = step(engine, {"x": torch.randn(2, 3, 8, 8), "y": torch.tensor([0, 3])})
    assert out["aux_dydit.flops"] > 0
    assert out["loss"] == pytest.approx(out["mse"] + out["vb"] + out["aux_dydit.flops"], rel=1e-5)


def test_cli_bad_target_wrong_width_exit_2(tmp_path, capsys):
    from dyncompute.cli import main

    cfg = tmp_path / "tiny.gin"
    cfg.write_text("include 'experiments/quickstart/dit.gin'\nDiffusionTransformer.reducers = ['dydit']\n"
                   "train.steps = 1\ntrain.progress = False\n")
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "a"), "-b", "reducers.dydit.target = 1.5"]) == 2
    assert "reducers.dydit.target" in capsys.readouterr().err
    source = tmp_path / "wide.pt"
    torch.save({"ema": model().state_dict()}, source)  # width 32, the config's is 64
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "b"), "-b", "train.extension = @fine_tune()",
                 "-b", f"fine_tune.source = '{source}'"]) == 2
    assert "does not fit the model" in capsys.readouterr().err


def test_sweeps_treat_dydit_settings_as_training_settings():
    from dyncompute.sweeps.spec import is_sampling_binding

    assert not is_sampling_binding("reducers.dydit.target = 0.5")
    assert not is_sampling_binding("DiffusionTransformer.reducers = ['dydit']")
    assert is_sampling_binding("reducers.fora.interval = 2")
    assert is_sampling_binding("DiffusionTransformer.reducers = ['fora']")
