"""Dense layers through oneDNN on the CPU: the model's matmuls at the machine's matmul rate.

PyTorch's CPU ``F.linear`` calls MKL's sgemm, which on AMD processors runs well below the rate of
oneDNN's matmul (measured on the project's 2-core EPYC machines: 210 vs 330-460 GFLOP/s fp32 on DiT-S
shapes; ``dyncompute bench dit_train_step`` prints both). `linear` sends fp32 CPU matmuls of a forward
and dX = dY W through ``torch.ops.mkldnn._linear_pointwise``, dW = dY^T X and db through oneDNN's
inner-product weight-gradient kernel (`_weight_grads`), and, without gradients, fuses the MLP's tanh-GELU
into the matmul's epilogue (one kernel instead of two passes).

Compiled graphs call the same kernel as one opaque operator (`onednn_linear`). It falls back to
``F.linear`` wherever that is the better or the only choice: other devices and dtypes, autocast,
TorchScript tracing (fvcore's FLOP count sees ``aten::linear``), a torch dispatch mode
(``FlopCounterMode``), or ``DYNCOMPUTE_ONEDNN=0``.
Results match ``F.linear`` to float rounding (a different summation order), not bit for bit.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

ENABLED = os.environ.get("DYNCOMPUTE_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not ENABLED or torch.jit.is_tracing() or x.device.type != "cpu" or x.dim() < 2:
        return False
    if not x.dtype == weight.dtype == torch.float32:
        return False
    if torch.compiler.is_compiling():  # compiled graphs call `onednn_linear` (below)
        return True
    return x.numel() > 0 and not torch.is_autocast_enabled("cpu") and torch._C._len_torch_dispatch_stack() == 0


def _raw(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu_tanh: bool = False) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu_tanh else "none", [],
                                              "tanh" if gelu_tanh else "")


ROW_MULTIPLE = 16  # oneDNN runs 2059 rows ~25% slower than 2064 (measured on DiT-S shapes): pad to a multiple


def _padded(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (n, K) with zero rows appended up to a multiple of `ROW_MULTIPLE` when there are many."""
    extra = -rows.shape[0] % ROW_MULTIPLE
    if not extra or rows.shape[0] < 16 * ROW_MULTIPLE:
        return rows
    return torch.cat([rows, rows.new_zeros(extra, rows.shape[1])])


def _rows(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x's rows (leading dimensions flattened), zero-padded (DC-DiT's packed token counts are arbitrary)
    when the copy is no larger than the output (x's width at most the layer's), and their number."""
    rows = x.reshape(-1, x.shape[-1])
    pad = x.shape[-1] <= weight.shape[0] and not torch.compiler.is_compiling()  # compiled: no guard on lengths
    return (_padded(rows) if pad else rows), rows.shape[0]


def _unrows(y: torch.Tensor, n: int, x: torch.Tensor) -> torch.Tensor:
    return (y if y.shape[0] == n else y[:n]).view(*x.shape[:-1], y.shape[-1])


def _mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu_tanh: bool = False,
        second: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """The forward matmul without gradients, then optionally a ``second`` (weight, bias) layer on its
    output (the padded rows carried through both)."""
    rows, n = _rows(x, weight)
    y = _raw(rows, weight, bias, gelu_tanh)
    return _unrows(y if second is None else _raw(y, *second), n, x)


def _grads(grad, x, weight, needs: tuple[bool, bool, bool], mm=_raw, weight_kernel: bool = True):
    """dX = dY W (``mm``), dW = dY^T X and db = sum dY (the rows of every leading dimension together), the
    last two from `_weight_grads` when ``weight_kernel``, else as ``mm``."""
    g, rows = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    dx = mm(g, weight.t(), None).view(x.shape) if needs[0] else None
    if needs[1] and weight_kernel:
        return dx, *_weight_grads(g, rows, weight, needs[2])
    dw = mm(g.t(), rows.t(), None) if needs[1] else None
    return dx, dw, g.sum(0) if needs[2] else None


def _weight_grads(g, x, weight, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dW = dY^T X and db = sum dY of rows g (n, N), x (n, K) from oneDNN's inner-product weight-gradient
    kernel, which reads them as they lie: as a matmul, dY^T is a full-size transposed copy. On DiT-S's fc1
    (2048 rows, 384 -> 1536): 6.1 vs 7.5 ms; equal on the narrowing layers."""
    dw, db = torch.ops.aten.mkldnn_linear_backward_weights(g.to_mkldnn(), x.to_mkldnn(), weight, bias)
    return dw, db if bias else None


class _Linear(torch.autograd.Function):
    """x W^T + b with all three matmuls of forward and backward on oneDNN, in eager mode. `onednn_linear`
    does the same for compiled graphs; in eager its dispatch costs ~30 us more per forward + backward
    (measured: 140 vs 106 us on a 64-wide layer), a few percent of a small model's training step."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _raw(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        return _grads(grad, x, weight, needs)


@torch.library.custom_op("dyncompute::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu_tanh: bool) -> torch.Tensor:
    """The same oneDNN matmul as one opaque operator, for compiled graphs (inductor's own lowering of the
    oneDNN kernel needs frozen weights); inductor fuses the elementwise work around it."""
    return _raw(x, weight, bias, gelu_tanh)


@onednn_linear.register_fake
def _(x, weight, bias, gelu_tanh):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _save(ctx, inputs, output):
    x, weight, bias, gelu_tanh = inputs
    if gelu_tanh:
        raise ValueError("the fused GELU has no backward: `linear` fuses it only without gradients")
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _compiled_mm(a, w, b):
    return onednn_linear(a, w, b, False)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
    # the matmul form: the weight-gradient kernel as an operator gained nothing in compiled training steps
    # (DiT-S/2 0.998 x, DC-DiT-S 1.003 x; interleaved, compile caches off)
    return *_grads(grad, x, weight, needs, _compiled_mm, weight_kernel=False), None


onednn_linear.register_autograd(_backward, setup_context=_save)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           gelu_tanh: bool = False) -> torch.Tensor:
    """``F.linear`` (then tanh-GELU when ``gelu_tanh``), on oneDNN where it applies (module docstring)."""
    if not _onednn(x, weight):
        y = F.linear(x, weight, bias)
    else:
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
        compiling = torch.compiler.is_compiling()
        if not grad and not compiling:
            return _mm(x, weight, bias, gelu_tanh)
        rows, n = _rows(x, weight)  # the autograd-visible slice of the padded rows happens outside the kernel
        if not grad:  # compiled, no gradient: the GELU fused as in eager
            return _unrows(onednn_linear(rows, weight, bias, gelu_tanh), n, x)
        y = onednn_linear(rows, weight, bias, False) if compiling else _Linear.apply(rows, weight, bias)
        y = _unrows(y, n, x)
    return F.gelu(y, approximate="tanh") if gelu_tanh else y


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Mlp(nn.Module):
    """timm's ``Mlp`` (fc1, act, fc2: the names DiT checkpoints use) with tanh-GELU, fused into fc1's
    matmul when no gradient is needed."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.drop1, self.norm, self.drop2 = nn.Identity(), nn.Identity(), nn.Identity()  # timm's slots (width.py)
        self.fc2 = Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.fc1, self.fc2
        if _onednn(x, fc1.weight) and not torch.compiler.is_compiling() and not torch.is_grad_enabled():
            return _mm(x, fc1.weight, fc1.bias, gelu_tanh=True, second=(fc2.weight, fc2.bias))  # rows padded once
        return fc2(linear(x, fc1.weight, fc1.bias, gelu_tanh=True))


def adopt(model: nn.Module) -> nn.Module:
    """Every plain ``nn.Linear`` inside ``model`` (its own, timm's and its plugins') becomes a `Linear`:
    the same module and parameters, the forward through `linear`."""
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
    return model
