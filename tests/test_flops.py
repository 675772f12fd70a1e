"""Compute accounting: handles, useful vs executed MACs, components, trajectories, CLI (tiny models)."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dyncompute import flops, trajectory
from dyncompute.model import DiffusionTransformer
from dyncompute.observe import Observed
from dyncompute.registry import TOKENIZERS


def tiny_dit(hidden=128, depth=2, heads=4, size=16, patch=2, channels=4):
    torch.manual_seed(0)
    tok = TOKENIZERS.build("patchify", hidden_size=hidden, in_channels=channels, out_channels=2 * channels,
                           input_size=size, cond_dim=hidden, patch_size=patch)
    return DiffusionTransformer(input_size=size, in_channels=channels, num_classes=10, hidden_size=hidden,
                                depth=depth, num_heads=heads, tokenizer=tok)


def tiny_dcdit(hidden=64, depth=2, heads=4, size=16, router="cosine"):
    if "dynamic_chunking" not in TOKENIZERS.names():
        pytest.skip("the dynamic_chunking tokenizer is not registered")
    torch.manual_seed(0)
    tok = TOKENIZERS.build("dynamic_chunking", hidden_size=hidden, in_channels=3, out_channels=6, input_size=size,
                           cond_dim=hidden, router=router)
    return DiffusionTransformer(input_size=size, in_channels=3, num_classes=10, hidden_size=hidden, depth=depth,
                                num_heads=heads, tokenizer=tok)


def inputs(model, n, seed=0):
    return flops.measurement_inputs(model, n, seed)


def backbone_formula(model, length):
    """DiT block MACs for one sample of L tokens: qkv, proj, MLP, adaLN, 2 layer norms, QKᵀ and AV."""
    D = model.backbone.blocks[0].norm1.normalized_shape[0]
    per_block = length * (3 * D * D + D * D + 8 * D * D) + 6 * D * D + 2 * 4 * length * D + 2 * length ** 2 * D
    return len(model.backbone.blocks) * per_block


# --------------------------------------------------------------------------- handles and cross-check


@contextlib.contextmanager
def torch_counter():
    """torch's FlopCounterMode under the math SDPA backend: torch has no formula for some fused CPU
    attention kernels (2.14 counts ``_scaled_dot_product_flash_attention_for_cpu`` as 0), but counts
    the math backend's matmuls on every version."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        yield counter


def test_fused_attention_is_counted_and_matches_torch_counter():
    model = tiny_dit().eval()
    x, t, y = inputs(model, 2)
    count = flops.count_forward(model, x, t, y)
    assert count.unsupported_ops == {}
    L = (16 // 2) ** 2
    assert count.by_component["backbone"] == 2 * backbone_formula(model, L)  # batch of 2
    with torch_counter() as counter:
        model(x, t, y)
    torch_macs = counter.get_total_flops() / 2
    assert abs(count.executed_macs / torch_macs - 1) < 0.01


def test_dcdit_matches_torch_counter_on_multiply_accumulate_ops():
    model = tiny_dcdit().eval()
    x, t, y = inputs(model, 3)
    trace = flops.trace_forward(model, x, t, y)
    with torch_counter() as counter:
        _, info = model(x, t, y, return_info=True)
    assert info.tokens_per_sample == trace.lengths
    fa = flops._analysis(flops._Call(model, {}), (x, t, y), model)
    with flops.counting(model):
        by_op = fa.by_operator()
    norms = sum(v for k, v in by_op.items() if k.endswith("norm"))
    assert abs((trace.macs - norms) / (counter.get_total_flops() / 2) - 1) < 0.01
    assert abs(trace.macs / (counter.get_total_flops() / 2) - 1) < 0.05


def test_packed_attention_counts_real_lengths():
    model = tiny_dcdit()
    x, t, y = inputs(model, 4)
    trace = flops.trace_forward(model, x, t, y)
    assert len(set(trace.lengths)) > 1, "the test needs a batch of mixed lengths"
    assert trace.components["backbone"] == sum(backbone_formula(model, n) for n in trace.lengths)
    for n in (1, 7, 33):
        assert flops.backbone_macs(model, n) == backbone_formula(model, n)


def test_unsupported_operators_are_reported_unless_declared():
    class ErfEmbedder(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return torch.erf(self.inner(t))

    model = tiny_dit(hidden=32, depth=1)
    model.t_embedder = ErfEmbedder(model.t_embedder)
    x, t, y = inputs(model, 1)
    assert flops.count_forward(model, x, t, y).unsupported_ops == {"aten::erf": 1}
    model.t_embedder.flop_ignored_ops = ("aten::erf",)
    assert flops.count_forward(model, x, t, y).unsupported_ops == {}


def test_declared_python_op_is_not_unsupported():
    """fvcore names an autograd.Function ``prim::PythonOp.<name>``; DC-DiT declares its STE ignored."""
    model = tiny_dcdit(depth=1)
    x, t, y = inputs(model, 2)
    count = flops.count_forward(model, x, t, y)
    assert count.unsupported_ops == {}
    model.tokenizer.flop_ignored_ops = ()
    assert set(flops.count_forward(model, x, t, y).unsupported_ops) == {"prim::PythonOp.STE"}


# --------------------------------------------------------------------------- useful vs executed, components


def test_mixed_dcdit_batch_useful_is_sum_of_samples_alone():
    model = tiny_dcdit()
    x, t, y = inputs(model, 4)
    batch = flops.count_forward(model, x, t, y)
    assert len(set(batch.tokens_per_sample)) > 1
    alone = [flops.count_forward(model, x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(4)]
    assert [a.tokens_per_sample[0] for a in alone] == batch.tokens_per_sample
    total_alone = sum(a.useful_macs for a in alone)
    assert abs(batch.useful_macs / total_alone - 1) < 0.005
    assert all(a.useful_macs == a.executed_macs for a in alone)  # one sample: nothing padded
    assert batch.executed_macs >= batch.useful_macs
    assert batch.by_component_executed["backbone"] == batch.by_component["backbone"]  # packed: no padding
    assert sum(batch.by_component.values()) == batch.useful_macs
    assert batch.flops == 2 * batch.useful_macs


def test_components_sum_and_tokenizer_declared_map():
    model = tiny_dit(hidden=32, depth=1)
    x, t, y = inputs(model, 1)
    count = flops.count_forward(model, x, t, y)
    assert sum(count.by_component.values()) == count.useful_macs
    assert count.by_component["embeddings"] > 0 and count.by_component["final layer"] > 0
    assert sum(count.params_by_component.values()) == count.params == flops.count_parameters(model)
    model.tokenizer.flop_components = {"x_embedder": "patch embedding", "": "embeddings"}
    count = flops.count_forward(model, x, t, y)
    assert count.by_component["patch embedding"] > 0
    assert count.by_component["final layer"] == 0  # now mapped to the tokenizer's "" entry
    assert sum(count.by_component.values()) == count.useful_macs


# --------------------------------------------------------------------------- trajectories


def test_dit_trajectory_is_steps_times_forward_and_doubles_under_cfg():
    model = tiny_dit(hidden=32, depth=1, size=8)
    x, t, y = inputs(model, 1)
    per_forward = flops.count_forward(model, x, t, y).useful_macs
    plain, result = trajectory.count_trajectory(model, num_samples=2, num_steps=250, device="cpu")
    assert plain.nfe == result.nfe == 250
    assert plain.useful_macs_per_image == 250 * per_forward
    assert plain.executed_macs_per_image == plain.useful_macs_per_image
    guided, _ = trajectory.count_trajectory(model, num_samples=2, num_steps=250, cfg_scale=4.0, device="cpu")
    assert guided.nfe == 250
    assert guided.useful_macs_per_image == 2 * plain.useful_macs_per_image


def test_dcdit_trajectory_matches_exact_recount_per_evaluation():
    model = tiny_dcdit(router="predictability")
    calls = []
    original = model.forward

    def keep(x, t, y, return_info=False, **budget):
        calls.append((x.clone(), t.clone(), y.clone(), dict(budget)))
        return original(x, t, y, return_info=return_info, **budget)

    model.forward = keep
    from dyncompute.sampling import generate

    rec = trajectory.TrajectoryRecorder(model)
    generate(model, num_samples=3, num_steps=6, cfg_scale=3.0, device="cpu", batch_size=3, observers=[rec])
    del model.forward
    count = rec.count(3)
    assert count.nfe == 6 and len(calls) == 6
    assert all(ev.cfg and len(ev.lengths) == 6 for ev in rec.evaluations)
    for i in (0, 3, 5):
        exact = flops.count_forward(model, *calls[i][:3], **calls[i][3])
        assert count.steps.useful_GMACs_per_image[i] * 3e9 == pytest.approx(exact.useful_macs, rel=1e-9)
        assert count.steps.executed_GMACs_per_image[i] * 3e9 == pytest.approx(exact.executed_macs, rel=1e-9)
    assert count.steps.useful_GMACs_per_image.nunique() > 1  # the cost changes with the timestep


def test_recorder_sees_lite_cfg_budgets_and_restores_the_model():
    model = tiny_dcdit(router="predictability")
    x, t, y = inputs(model, 2)
    null = torch.full_like(y, model.num_classes)
    rec = trajectory.TrajectoryRecorder(model)
    Observed(model.forward_with_cfg, [rec], cfg=True)(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]),
                                                      cfg_scale=2.0, uncond_budget={"tail_drop": 0.5})
    assert "forward" not in model.__dict__ and "forward_with_cfg" not in model.__dict__
    ev = rec.evaluations[0]
    assert ev.cfg and [b["tail_drop"] for b in ev.budget] == [0.0, 0.0, 0.5, 0.5]
    assert all(u <= c for c, u in zip(ev.lengths[:2], ev.lengths[2:]))


# --------------------------------------------------------------------------- CLI


def test_flops_cli_json(tmp_path, capsys):
    from dyncompute.cli import main

    gin_file = tmp_path / "tiny.gin"
    gin_file.write_text("\n".join([
        "DiffusionTransformer.input_size = 8", "DiffusionTransformer.in_channels = 4",
        "DiffusionTransformer.num_classes = 10", "DiffusionTransformer.hidden_size = 32",
        "DiffusionTransformer.depth = 1", "DiffusionTransformer.num_heads = 2",
        "DiffusionTransformer.tokenizer = 'patchify'", "tokenizers.patchify.patch_size = 2"]))
    assert main(["flops", str(gin_file), "--json", "--repeats", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("useful_macs", "executed_macs", "flops", "params", "by_component"):
        assert key in out
    assert out["flops"] == 2 * out["useful_macs"]
    assert out["useful_macs"] == sum(out["by_component"].values())
    assert main(["flops", str(gin_file), "tokenizers.patchify.patch_size = 4", "--repeats", "0"]) == 0
    assert "total" in capsys.readouterr().out
