"""Dense layers through oneDNN on the CPU: the model's matmuls at the machine's matmul rate.

PyTorch's CPU ``F.linear`` calls MKL's sgemm, which on AMD processors runs well below the rate of
oneDNN's matmul (measured on the project's 2-core EPYC machines: 210 vs 330-460 GFLOP/s fp32 on DiT-S
shapes; ``dyncompute bench dit_train_step`` prints both). `linear` sends fp32 CPU matmuls of a forward
and of its backward (dX = dY W, dW = dY^T X) through ``torch.ops.mkldnn._linear_pointwise`` and, without
gradients, fuses the MLP's tanh-GELU into the matmul's epilogue (one kernel instead of two passes).

It falls back to ``F.linear`` wherever that is the better or the only choice: other devices and dtypes,
autocast, TorchScript tracing (fvcore's FLOP count sees ``aten::linear``), a torch dispatch mode
(``FlopCounterMode``), ``torch.compile`` (inductor picks its own kernels), or ``DYNCOMPUTE_ONEDNN=0``.
Results match ``F.linear`` to float rounding (a different summation order), not bit for bit.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

ENABLED = os.environ.get("DYNCOMPUTE_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not ENABLED or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.dim() >= 2 and x.numel() > 0
            and not torch.is_autocast_enabled("cpu") and torch._C._len_torch_dispatch_stack() == 0)


def _mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str = "none",
        algorithm: str = "") -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, act, [], algorithm)


class _Linear(torch.autograd.Function):
    """x W^T + b with all three matmuls of forward and backward on oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _mm(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        dx = _mm(g, weight.t(), None).view(x.shape) if ctx.needs_input_grad[0] else None
        dw = _mm(g.t(), x.reshape(-1, x.shape[-1]).t(), None) if ctx.needs_input_grad[1] else None
        db = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           gelu_tanh: bool = False) -> torch.Tensor:
    """``F.linear`` (then tanh-GELU when ``gelu_tanh``), on oneDNN where it applies (module docstring)."""
    if not _onednn(x, weight):
        y = F.linear(x, weight, bias)
        return F.gelu(y, approximate="tanh") if gelu_tanh else y
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad
                                           or (bias is not None and bias.requires_grad)):
        return _mm(x, weight, bias, "gelu", "tanh") if gelu_tanh else _mm(x, weight, bias)
    y = _Linear.apply(x, weight, bias)
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
        return self.fc2(linear(x, self.fc1.weight, self.fc1.bias, gelu_tanh=True))


def adopt(model: nn.Module) -> nn.Module:
    """Every plain ``nn.Linear`` inside ``model`` (its own, timm's and its plugins') becomes a `Linear`:
    the same module and parameters, the forward through `linear`."""
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
    return model
