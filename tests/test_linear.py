"""Dense layers on oneDNN (dyncompute.linear): same values and gradients as F.linear, the fallbacks
where the oneDNN kernel must not run, and every dense layer of a model converted."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dyncompute import linear as dl
from dyncompute.model import DiffusionTransformer

pytestmark = pytest.mark.skipif(not dl.ENABLED, reason="oneDNN not available")


def _ops(fn) -> set[str]:
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_forward_and_fused_gelu_match_f_linear_on_onednn():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 37, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" in _ops(lambda: dl.linear(x, w, b))
        torch.testing.assert_close(dl.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dl.linear(x, w, b, gelu_tanh=True),
                                   F.gelu(F.linear(x, w, b), approximate="tanh"), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dl.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_gradients_match_f_linear():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(3, 11, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    upstream = torch.randn(3, 11, 8, generator=g)
    grads, ops = [], []
    for fn in (dl.linear, F.linear):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        ops.append(_ops(fn(*leaves).mul(upstream).sum().backward))
        grads.append([t.grad for t in leaves])
    assert "aten::mkldnn_linear_backward_weights" in ops[0]  # dW and db from oneDNN's kernel
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    wi = w.clone().requires_grad_()  # a trained weight beside a frozen bias
    dl.linear(x, wi, b).mul(upstream).sum().backward()
    torch.testing.assert_close(wi.grad, grads[1][1], rtol=1e-5, atol=1e-5)
    frozen_w = w.clone()  # only the input needs a gradient (a frozen layer): no weight gradient is made
    xi = x.clone().requires_grad_()
    dl.linear(xi, frozen_w, b).sum().backward()
    torch.testing.assert_close(xi.grad, torch.ones(3, 11, 8) @ w, rtol=1e-5, atol=1e-5)


def test_falls_back_to_f_linear_where_onednn_must_not_run(monkeypatch):
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    assert dl._onednn(x, w)
    assert not dl._onednn(x.double(), w.double())
    assert not dl._onednn(x[0], w)  # 1-D input
    with FlopCounterMode(display=False) as counter:  # a dispatch mode sees aten's matmul and counts it
        dl.linear(x, w)
    assert counter.get_total_flops() == 2 * 4 * 8 * 5
    traced = torch.jit.trace(dl.Linear(8, 5), x)  # TorchScript (fvcore) sees aten::linear
    assert "aten::linear" in str(traced.graph)
    monkeypatch.setattr(dl, "ENABLED", False)
    assert not dl._onednn(x, w)


def test_models_convert_every_dense_layer_and_keep_their_state_dict():
    model = DiffusionTransformer(input_size=8, in_channels=3, num_classes=4, hidden_size=32, depth=2, num_heads=2)
    assert not [n for n, m in model.named_modules() if type(m) is nn.Linear]
    block = model.backbone.blocks[0]
    assert isinstance(block.attn.qkv, dl.Linear) and isinstance(block.mlp.fc1, dl.Linear)
    assert "backbone.blocks.0.mlp.fc1.weight" in model.state_dict()
    torch.manual_seed(0)
    with torch.no_grad():  # off DiT's zero init, so that every layer shapes the output
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 1])
    model.eval()
    with torch.no_grad():
        out = model(x, t, y)
        assert "mkldnn::_linear_pointwise" in _ops(lambda: model(x, t, y))
        dl.ENABLED, enabled = False, dl.ENABLED
        try:
            plain = model(x, t, y)
        finally:
            dl.ENABLED = enabled
    assert out.abs().max() > 0.1
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-5)


def test_compiled_graph_operator_passes_opcheck_and_matches_eager_gradients():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    w = torch.randn(6, 8, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True)
    torch.library.opcheck(dl.onednn_linear, (x, w, b, False))  # fake (meta) shapes and autograd registration
    out = dl.onednn_linear(x, w, b, False)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.sum(), (x, w, b))
    ref = torch.autograd.grad(F.linear(x, w, b).sum(), (x, w, b))
    for ours, expected in zip(grads, ref):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_padded_rows_give_the_same_values_gradients_and_a_writable_output():
    """Row counts that are not a multiple of 16 (DC-DiT's packed tokens) go through zero-padded rows."""
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(301, 16, generator=g), torch.randn(48, 16, generator=g), torch.randn(48, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(dl.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        mlp = dl.Mlp(16, 48)
        torch.testing.assert_close(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh")), rtol=1e-5, atol=1e-5)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = dl.linear(*leaves)
    out[:, ::3] += 1  # adaLN adds its 1 in place: the output must be an ordinary autograd view
    out.square().sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = F.linear(*ref_leaves)
    ref[:, ::3] += 1
    ref.square().sum().backward()
    for ours, expected in zip(leaves, ref_leaves):
        torch.testing.assert_close(ours.grad, expected.grad, rtol=1e-4, atol=1e-4)
