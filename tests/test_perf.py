"""The fast paths are exact: packed adaLN and grouped attention against per-sample loops, a constant
kernel count per block, and the compiled path against eager."""
import os
from collections import Counter
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dyncompute import TOKENIZERS, DiffusionTransformer, Tokens
from dyncompute.attention import grouped_sdpa, nested_sdpa, sdpa_plan
from dyncompute.backbone import DiTBlock

LENGTHS = [5, 9, 2, 9, 9, 4]


def packed(lengths, dim=16, requires_grad=False):
    x = torch.randn(sum(lengths), dim, requires_grad=requires_grad)
    return Tokens.from_lengths(x, lengths, torch.zeros(sum(lengths), 2, dtype=torch.long))


def test_packed_modulate_and_gated_add_equal_per_sample_loops():
    tokens = packed(LENGTHS)
    y, h = torch.randn_like(tokens.x), torch.randn_like(tokens.x)
    shift, scale, gate = torch.randn(3, len(LENGTHS), 16).unbind(0)
    mod = tokens.modulate(tokens.x, shift, 1 + scale)
    out = tokens.gated_add(h, gate, y)
    for b, (xs, ys, hs, ms, os_) in enumerate(zip(*(tokens.unpack(v) for v in (tokens.x, y, h, mod, out)))):
        assert torch.allclose(ms, xs * (1 + scale[b]) + shift[b], atol=1e-6)
        assert torch.allclose(os_, hs + gate[b] * ys, atol=1e-6)


def test_compiled_gather_sums_its_gradient_per_sample():
    """Compiled graphs gather per-sample vectors through `_PerToken`, whose backward is one opaque per-sample
    sum (`sum_by_sample`): the same gradient as index_select's, and a well-formed operator."""
    from dyncompute.tokens import _PerToken, sum_by_sample

    tokens = packed(LENGTHS)
    v = torch.randn(len(LENGTHS), 16, requires_grad=True)
    grad = torch.randn(sum(LENGTHS), 16)
    torch.library.opcheck(sum_by_sample, (grad, tokens.batch, len(LENGTHS)))
    ours = torch.autograd.grad(_PerToken.apply(v, tokens.batch), v, grad)[0]
    assert torch.allclose(ours, torch.autograd.grad(v.index_select(0, tokens.batch), v, grad)[0], atol=1e-6)
    assert torch.allclose(ours, torch.stack([g.sum(0) for g in tokens.unpack(grad)]), atol=1e-5)


def test_uniform_tokens_broadcast_per_sample_vectors():
    tokens = Tokens.from_batched(torch.randn(3, 4, 8), torch.zeros(4, 2, dtype=torch.long))
    v = torch.randn(3, 8)
    assert tokens.per_token(v).shape == (3, 1, 8)
    assert torch.equal(tokens.per_token(v)[1, 0], v[1])


class KernelCount(TorchDispatchMode):
    """Counts the aten operators that produce data (views and shape ops excluded)."""

    VIEWS: ClassVar[set[str]] = {"view", "_unsafe_view", "t", "transpose", "unsqueeze", "split", "split_with_sizes",
                                 "unbind", "expand", "slice", "select", "alias", "detach", "as_strided", "reshape",
                                 "chunk", "unflatten"}

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def block_kernels(block, lengths):
    tokens = packed(lengths, 32)
    with KernelCount() as counter, torch.no_grad():
        block(tokens.x, torch.randn(len(lengths), 32), tokens)
    return counter.ops


def test_block_kernels_do_not_grow_with_batch_size():
    """adaLN on packed tokens: per use, one gather and one fused kernel (the loop it replaced launched
    two per sample and use)."""
    block = DiTBlock(32, 4).eval()
    few = block_kernels(block, [3, 5])
    many = block_kernels(block, [3, 5, 7, 2, 6, 4, 8, 9])
    adaln = ("index_select", "addcmul", "add", "add_")
    assert {k: few[k] for k in adaln} == {k: many[k] for k in adaln} == {"index_select": 6, "addcmul": 4, "add": 1,
                                                                           "add_": 0}  # add: the 1 of 1 + scale
    # what still grows is attention: one SDPA call per distinct length (as the official varlen stand-in)
    grows = {k for k in many if many[k] != few[k]}
    assert grows <= {"_scaled_dot_product_flash_attention_for_cpu", "scaled_dot_product_attention"}, grows


def per_sample_attention(q, k, v, lengths):
    outs = [F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in qkv)).transpose(0, 1)
            for qkv in zip(*(t.split(lengths) for t in (q, k, v)))]
    return torch.cat(outs)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # torch's CPU fallback of nested SDPA
@pytest.mark.parametrize("lengths", [[3, 7, 5], [4, 4, 4, 2, 2, 5], [3, 5] * 6, [2, 9] * 5 + [1]])
def test_grouped_attention_equals_per_sample(lengths):
    q, k, v = (torch.randn(sum(lengths), 2, 8, requires_grad=True) for _ in range(3))
    grad = torch.randn(sum(lengths), 2, 8)
    ref = per_sample_attention(q, k, v, lengths)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    tokens = Tokens.from_lengths(q.detach().flatten(1), lengths, torch.zeros(sum(lengths), 2, dtype=torch.long))
    torch.library.opcheck(torch.ops.dyncompute.grouped_sdpa.default, (q, k, v, tokens.host_lengths))
    for out in (grouped_sdpa(q, k, v, lengths), torch.ops.dyncompute.grouped_sdpa(q, k, v, tokens.host_lengths)[0],
                nested_sdpa(q, k, v, tokens)):  # nested: CUDA's one-call path, checked here on its CPU fallback
        assert torch.allclose(out, ref, atol=1e-6)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), ref_grads):
            assert torch.allclose(a, b, atol=1e-5)


def test_written_out_attention_backward_equals_autograd():
    """The compiled grouped operator's backward off the CPU (no flash log-sum-exp there)."""
    from dyncompute.attention import _sdpa_backward

    q, k, v = (torch.randn(2, 3, 7, 8, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 3, 7, 8)
    ref = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), grad)
    for a, b in zip(_sdpa_backward(grad, q.detach(), k.detach(), v.detach()), ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_sdpa_plan_groups_runs_and_permutes_only_when_it_pays():
    assert sdpa_plan([3, 7, 5]) == (None, [(1, 3), (1, 7), (1, 5)])
    assert sdpa_plan([4, 4, 4, 2, 2]) == (None, [(3, 4), (2, 2)])  # consecutive runs: views, no copy
    perm, calls = sdpa_plan([3, 5] * 6)  # 12 calls become 2 for 4 copies
    assert perm.tolist() == [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11] and calls == [(6, 3), (6, 5)]
    assert sdpa_plan([3, 5, 3, 5])[0] is None  # 4 calls -> 2 would cost 4 copies


# --------------------------------------------------------------------------- the compiled path


def toolchain_missing() -> bool:
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except (RuntimeError, OSError):  # inductor found no C++ compiler
        return True
    return False


needs_compiler = pytest.mark.skipif(toolchain_missing(), reason="torch.compile needs a C++ compiler (none found)")
SMALL = {"input_size": 8, "in_channels": 4, "num_classes": 10, "hidden_size": 32, "depth": 1, "num_heads": 4,
         "class_dropout_prob": 0.0}


def pair(**kw):
    """(compiled, eager) models with the same weights; the zero-initialised layers get small values."""
    torch.manual_seed(0)
    eager = DiffusionTransformer(**SMALL, **kw)
    with torch.no_grad():
        for p in eager.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(std=0.02)
    compiled = DiffusionTransformer(**SMALL, **kw, compile=True)
    compiled.load_state_dict(eager.state_dict())
    return compiled, eager


def assert_same_step(compiled, eager, x, t, y):
    """Same prediction and same gradients, in training mode."""
    outs, grads = [], []
    for m in (compiled, eager):
        m.train()
        out = m(x, t, y)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().mean(), list(m.parameters()), allow_unused=True))
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    top = max(g.abs().max() for g in grads[1] if g is not None)
    for a, b in zip(*grads):
        assert (a is None) == (b is None) and (a is None or (a - b).abs().max() <= 1e-4 * top)


def batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 10, (n,), generator=g))


@needs_compiler
def test_compiled_dit_equals_eager():
    compiled, eager = pair()
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints are unchanged
    assert_same_step(compiled, eager, *batch(3, 0))
    assert_counted_alike(compiled, eager, *batch(3, 0))


def assert_counted_alike(compiled, eager, x, t, y):
    """A compiled model (after compiled calls) counts exactly like its eager twin: fvcore traces it as written."""
    from dyncompute.flops import count_forward

    a, b = count_forward(compiled, x, t, y), count_forward(eager, x, t, y)
    assert a.useful_macs == b.useful_macs > 0 and not a.unsupported_ops


@needs_compiler
def test_compiled_dcdit_equals_eager_without_recompiling_for_new_lengths():
    if "dynamic_chunking" not in TOKENIZERS.names():
        pytest.skip("the dynamic_chunking tokenizer is not registered")
    from dyncompute_plugins.tokenizers.dynamic_chunking.bench import calibrate_router

    def tok():
        tokenizer = TOKENIZERS.build("dynamic_chunking", hidden_size=32, in_channels=4, out_channels=8, input_size=8)
        tokenizer.static_parts = ()  # the convolutional ends compile like any static graph (the DiT test): time
        return tokenizer

    compiled, eager = pair(tokenizer=tok())
    calibrate_router(eager, *batch(8, 1), 0.3)
    compiled.load_state_dict(eager.state_dict())
    seen = []
    for i, seed in enumerate((2, 3, 4)):
        x, t, y = batch(4, seed)
        with torch.no_grad():
            seen.append(tuple(eager(x, t, y, return_info=True)[1].tokens_per_sample))
        assert len(set(seen[-1])) > 1, "the test needs mixed lengths"
        with torch._dynamo.config.patch(error_on_recompile=i > 0):  # new lengths, same batch size
            assert_same_step(compiled, eager, x, t, y)
    assert len(set(seen)) == len(seen)
    assert_counted_alike(compiled, eager, x, t, y)


@torch.library.custom_op("dyncompute_test::varlen", mutates_args=())
def _standin_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                    max_q: int, max_k: int) -> torch.Tensor:
    """A CPU stand-in with the signature of torch's varlen kernel: grouped SDPA by ``cu_q``; records max_q."""
    lengths = cu_q.diff().tolist()
    assert max_q == max_k == max(lengths)
    _standin_varlen.calls.append(max_q)
    return grouped_sdpa(q, k, v, lengths)


_standin_varlen.calls = []
_standin_varlen.register_fake(lambda q, k, v, cu_q, cu_k, max_q, max_k: torch.empty_like(q))


def _standin_backward(ctx, g):
    q, k, v, lengths = ctx.saved_tensors
    out, lse = torch.ops.dyncompute.grouped_sdpa(q, k, v, lengths)
    return *torch.ops.dyncompute.grouped_sdpa_backward(g.contiguous(), q, k, v, out, lse, lengths), *[None] * 4


_standin_varlen.register_autograd(
    _standin_backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs[:3],
                                                                                       inputs[3].diff().cpu()))


def test_compiled_blocks_call_the_varlen_kernel_with_a_symbolic_longest_length(monkeypatch):
    """On CUDA a compiled block calls the varlen kernel (not the grouped operator, 6x slower there), with the
    longest length as a symbolic int: new lengths run the same graph. Here a CPU stand-in with the kernel's
    signature takes the kernel's place; outputs and gradients equal the eager grouped block's."""
    from dyncompute import attention

    torch.manual_seed(0)
    block = DiTBlock(32, 4)
    compiled = torch.compile(block, dynamic=True, backend="aot_eager")
    for i, lengths in enumerate(([5, 9, 2], [7, 3, 11], [4, 4, 6, 1])):
        tokens = packed(lengths, dim=32)
        c = torch.randn(len(lengths), 32)
        out = block(tokens.x, c, tokens)  # eager, grouped SDPA on the CPU
        grad = torch.autograd.grad(out.square().sum(), list(block.parameters()))
        with monkeypatch.context() as m, torch._dynamo.config.patch(error_on_recompile=i > 0):
            m.setitem(attention.VARLEN, "compiled", torch.ops.dyncompute_test.varlen)
            m.setattr(attention, "flash_applies", lambda q: True)
            got = compiled(tokens.x, c, tokens)
            got_grad = torch.autograd.grad(got.square().sum(), list(block.parameters()))
        assert _standin_varlen.calls[-1] == max(lengths)
        assert torch.allclose(got, out, atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got_grad, grad))


def test_torch_varlen_kernel_traces_with_a_symbolic_longest_length(monkeypatch):
    """torch's own varlen kernel (the compiled path's on CUDA), traced on meta tensors: forward and backward
    graphs, one compilation for three sets of lengths."""
    from dyncompute import attention

    if attention.torch_varlen_attn is None:
        pytest.skip("torch < 2.10 has no varlen kernel")
    monkeypatch.setitem(attention.VARLEN, "compiled", attention.torch_varlen_attn)
    monkeypatch.setattr(attention, "flash_applies", lambda q: True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    run = torch.compile(attention.varlen_attention, dynamic=True, backend=backend, fullgraph=True)
    for i, lengths in enumerate(([20, 35], [41, 17, 30], [50, 3])):
        T = sum(lengths)
        tokens = Tokens.from_lengths(torch.empty(T, 4, device="meta"), lengths,
                                     torch.zeros(T, 2, dtype=torch.long, device="meta"))
        q, k, v = (torch.empty(T, 4, 16, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out = run(q, k, v, tokens)
            out.sum().backward()
        assert out.shape == q.grad.shape == (T, 4, 16)
    assert len(graphs) == 1 and "torch_attn._varlen_attn" in graphs[0] and "grouped_sdpa" not in graphs[0]


# --------------------------------------------------------------------------- bench instruments


def test_kernel_launches_counts_computing_operators_only():
    from dyncompute.bench import kernel_launches

    a, b, c = torch.randn(3, 64, 64).unbind(0)
    assert kernel_launches(lambda: a.view(-1).reshape(64, 64).t()) == 0
    assert kernel_launches(lambda: torch.addcmul(a, b, c)) == 1
    assert kernel_launches(lambda: (a @ b + c).sum()) == 3


def test_busy_processes_use_the_cpu_and_stop():
    import time
    from pathlib import Path

    from dyncompute.bench import busy

    cpu_ticks = lambda pid: sum(int(v) for v in Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[11:13])
    with busy(1) as workers:
        time.sleep(0.5)
        assert len(workers) == 1 and workers[0].is_alive() and cpu_ticks(workers[0].pid) > 0
    assert not workers[0].is_alive()


def test_bench_pairs_alternate_their_order_and_report_the_rounds_ratios(monkeypatch):
    """Each timed round runs the two sides in the other order; the time ratio is the median of the rounds'
    ratios, with their range beside it."""
    from dyncompute import bench

    durations = {"S": iter([2.0, 3.0, 4.0, 6.0]), "R": iter([1.0, 3.0, 2.0, 2.0])}  # rounds' ratios 2, 1, 2, 3
    order = []

    def timed(fn):
        order.append(fn())
        return next(durations[order[-1]])

    monkeypatch.setattr(bench, "_time_once", timed)
    row = bench.run_pair(bench.BenchPair("t", bench.Timed("s", lambda: "S"), bench.Timed("r", lambda: "R")),
                         warmup=0, repeats=4)
    assert order == ["S", "R", "R", "S", "S", "R", "R", "S"]
    assert (row["time_ratio"], row["time_ratio_min"], row["time_ratio_max"]) == (2.0, 1.0, 3.0)
    assert row["subject_ms"] == 3500 and row["reference_ms"] == 2000
    assert "time ratio 2.000 [1.000-3.000 over rounds]" in bench.format_row(row)


def test_bench_case_args_are_checked(capsys):
    from dyncompute.bench import parse_case_args
    from dyncompute.cli import main

    assert parse_case_args(["batch=64", "compile=True", "name=x"]) == {"batch": 64, "compile": True, "name": "x"}
    assert main(["bench", "dit_train_step", "--arg", "batch"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_dcdit_bench_cases_build_and_label_their_kept_fraction():
    """Building a case runs the models once (router calibration, kept fraction, MAC count): a stale field
    name there broke `dyncompute bench dcdit_vs_dit` unnoticed."""
    from dyncompute.bench import CASES
    from dyncompute.registry import load_plugins

    load_plugins()  # the DC-DiT plugin registers its cases on import
    for name in ("dcdit_vs_dit", "dcdit_vs_dit_train"):
        (pair,) = CASES[name](batch=1)
        assert "kept 0." in pair.subject.label and pair.subject.macs > pair.reference.macs > 0


def test_backbone_bench_case_times_each_models_own_tokens():
    """`dcdit_backbone_vs_dit` runs DC-DiT-S's backbone on the packed tokens its tokenizer keeps and DiT-S/2's
    on its patches: about a quarter of the pixels against 256 patches, counted MACs on both sides."""
    from dyncompute.bench import CASES
    from dyncompute.registry import load_plugins

    load_plugins()
    (pair,) = CASES["dcdit_backbone_vs_dit"](batch=1)
    assert "packed lengths" in pair.subject.label and pair.subject.macs > 0 and pair.reference.macs > 0
    assert 0.5 < pair.subject.macs / pair.reference.macs < 2
    assert pair.subject.fn().x.shape[1] == pair.reference.fn().x.shape[1] == 384


def test_allocator_tuning_applies_on_glibc_and_can_be_switched_off(monkeypatch):
    import platform

    from dyncompute.processes import tune_allocator

    monkeypatch.setenv("DYNCOMPUTE_MALLOC_TUNING", "0")
    assert tune_allocator() is False
    monkeypatch.delenv("DYNCOMPUTE_MALLOC_TUNING")
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's mallopt only")
    assert tune_allocator() is True  # glibc accepted every setting


def test_training_block_backward_has_no_full_size_copies_or_scalar_multiplies():
    """Under autograd the adaLN arithmetic is multiply + add (addcmul's backward multiplies by its scalar
    factor: an extra full-size pass per input) and the 1 of 1 + scale is added out of place (an in-place add
    on the strided scale rows made the backward copy the whole modulation tensor)."""

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    block = DiTBlock(32, 4)
    tokens = Tokens.from_batched(torch.randn(2, 6, 32, requires_grad=True), torch.zeros(6, 2, dtype=torch.long))
    with Count() as c:
        block(tokens.batched(), torch.randn(2, 32), tokens).square().sum().backward()
    assert c.ops["addcmul"] == 0 and c.ops["copy_"] == 0 and c.ops["new_zeros"] == 0, c.ops
    assert c.ops["mul"] <= 14, c.ops  # 4 forward, 2 per product backward, 2 in the loss and attention


def test_varlen_kernel_choice_and_override():
    """DYNCOMPUTE_VARLEN picks the CUDA kernel for packed tokens; `varlen_kernel` swaps it for a block and
    restores it; on the CPU every choice runs grouped SDPA (the same numbers)."""
    import subprocess
    import sys

    from dyncompute import attention

    code = "from dyncompute.attention import VARLEN; print(VARLEN['kernel'])"
    for choice in ("nested", "grouped"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "DYNCOMPUTE_VARLEN": choice}).stdout.strip()
        assert out == choice
    lengths = [3, 5, 2]
    q, k, v = (torch.randn(10, 2, 8) for _ in range(3))
    tokens = Tokens.from_lengths(q.flatten(1), lengths, torch.zeros(10, 2, dtype=torch.long))
    before = attention.VARLEN["kernel"]
    with attention.varlen_kernel("nested"):
        assert attention.VARLEN["kernel"] == "nested"
        assert torch.equal(attention.varlen_attention(q, k, v, tokens), grouped_sdpa(q, k, v, lengths))
    assert attention.VARLEN["kernel"] is before


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace, as fvcore uses it
def test_layer_norm_runs_the_affine_kernel_bit_identically():
    """DiT's affine-free LayerNorm takes the CPU kernel's vectorised affine path (constant ones and zeros):
    outputs and gradients equal torch's affine-free LayerNorm bit for bit, the state dict stays empty, and
    TorchScript tracing (the FLOP count) sees the plain op."""
    from dyncompute.layers import LayerNorm

    class Weights(TorchDispatchMode):
        seen: ClassVar[list] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "native_layer_norm":
                self.seen.append(args[2] is not None)
            return func(*args, **(kwargs or {}))

    ours, plain = LayerNorm(48), torch.nn.LayerNorm(48, elementwise_affine=False, eps=1e-6)
    x = (3 * torch.randn(5, 7, 48) + 2).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    with Weights():
        y = ours(x)
    y2, g = plain(x2), torch.randn(5, 7, 48)
    y.backward(g)
    y2.backward(g)
    assert Weights.seen == [True]
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
    assert not ours.state_dict() and not list(ours.parameters())
    graph = torch.jit.trace(ours, x.detach()).inlined_graph
    assert "aten::layer_norm" in str(graph) and "prim::Constant" in str(graph)
    node = next(n for n in graph.nodes() if n.kind() == "aten::layer_norm")
    assert node.inputsAt(2).type().kind() == "NoneType"  # no weight when traced


def test_rms_norm_equals_torch_with_and_without_gradients():
    """`layers.RMSNorm` (one fused reduction on the CPU) equals nn.RMSNorm to float32 rounding: outputs, and
    the gradients of the input and the weight; without gradients too (the weight then scales in place)."""
    from dyncompute.layers import RMSNorm

    ours, plain = RMSNorm(48, eps=1e-5), torch.nn.RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(48))
        plain.weight.copy_(ours.weight)
    x = (3 * torch.randn(5, 7, 48) + 2).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y2, g = ours(x), plain(x2), torch.randn(5, 7, 48)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), y2, rtol=1e-6, atol=1e-6)
    assert list(ours.state_dict()) == list(plain.state_dict()) == ["weight"]


@pytest.mark.parametrize("precision", ["highest", "high"])
def test_grid_distances_by_matmul_are_exact(precision):
    """The de-chunker's squared distances come from one batched matmul: on integer grid coordinates they equal
    the elementwise ones exactly, also where float32 matmuls may run in reduced precision (then float64)."""
    from dyncompute_plugins.tokenizers.dynamic_chunking.chunking import sq_distances

    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 128, (3, 50, 2), generator=g), torch.randint(0, 128, (3, 40, 2), generator=g)
    valid = torch.rand(3, 40, generator=g) < 0.7
    was = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        d2 = sq_distances(a, b, valid)
    finally:
        torch.set_float32_matmul_precision(was)
    expected = (a[:, :, None] - b[:, None]).square().sum(-1).float()
    assert torch.equal(d2[valid[:, None].expand_as(d2)], expected[valid[:, None].expand_as(d2)])
    assert (d2[~valid[:, None].expand_as(d2)] > 1e29).all()
