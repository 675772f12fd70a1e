"""Self-attention over packed `Tokens`.

Dispatch (DESIGN.md): equal-length tokens take one fused SDPA call on (B, H, L, d); variable-length
tokens use a FlashAttention varlen kernel on CUDA in half precision (flash-attn's when it is installed, else
torch's own ``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10); on CUDA otherwise, torch's
variable-length kernels through jagged nested tensors (one call); on the CPU, grouped SDPA:
one call per run of consecutive equal-length samples (a zero-copy view), and, where that saves more
calls than it costs copies, samples of equal length are first permuted next to each other. Distinct
lengths still cost one call each on the CPU: there, padded+masked SDPA cost ~2x and nested tensors
~10-25x the per-sample calls (measured).

Under ``torch.compile`` (blocks compiled with dynamic shapes) new lengths do not recompile:
- on CUDA in half precision, torch's varlen kernel (``VARLEN["compiled"]``): a custom operator whose
  longest-length argument is ``tokens.max_len``, which dynamo keeps a symbolic int. Compiled graphs used the
  grouped path on CUDA before, which made the compiled DC-DiT-S training step 6x slower than eager on an
  H200 (`benchmarks/results/h200-2026-11-28`). flash-attn's function is not called from compiled graphs;
- elsewhere, the grouped path as one custom operator (``dyncompute::grouped_sdpa``) that reads the
  per-sample lengths from a host tensor, so the graph sees neither a python loop nor the lengths.

``log_size`` (optional, one value per token) adds a bias to every key's logit: ToMe's proportional
attention, softmax(q k^T / sqrt(d) + log s), where s is how many tokens a merged key stands for.
The bias is elementwise (0 MACs); the biased path is grouped SDPA with the bias as a mask on every device
(flash-attn's varlen kernel and the nested-tensor kernels take no bias).
"""
from __future__ import annotations

import contextlib
import os
from collections import defaultdict

import torch
import torch.nn.functional as F
from timm.layers import Attention

from . import width
from .linear import linear
from .tokens import Tokens

try:  # optional CUDA kernels
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None
try:
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
except ImportError:  # pragma: no cover - torch < 2.10
    torch_varlen_attn = None

PERMUTE_COPIES = 4  # kernels a permutation costs: gather q, k, v, scatter the output
# The kernel for packed tokens on CUDA: a flash-attn style varlen function (half precision), "nested" (jagged
# nested-tensor SDPA) or "grouped" (grouped SDPA, as on the CPU). DYNCOMPUTE_VARLEN=nested|grouped|torch picks
# one (torch: torch's varlen kernel even when flash-attn is installed).
# "compiled": the kernel compiled graphs call (module docstring), None for the grouped operator.
_CHOICE = os.environ.get("DYNCOMPUTE_VARLEN", "")
VARLEN = {"kernel": {"nested": "nested", "grouped": "grouped", "torch": torch_varlen_attn}.get(
              _CHOICE, flash_attn_varlen_func or torch_varlen_attn or "nested"),
          "compiled": None if _CHOICE in ("nested", "grouped") else torch_varlen_attn}


@contextlib.contextmanager
def varlen_kernel(kernel):
    """Use ``kernel`` for packed tokens on CUDA inside the block (see VARLEN): the FLOP count traces
    the per-sample "grouped" path, and benches compare kernels."""
    was, VARLEN["kernel"] = VARLEN["kernel"], kernel
    try:
        yield
    finally:
        VARLEN["kernel"] = was


def flash_applies(q: torch.Tensor) -> bool:
    """Where the FlashAttention varlen kernels run: CUDA, half precision."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: Tokens,
                     key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention within each sample of packed q, k, v (T, H, d); ``key_bias`` (T,) is added to every
    key's logit; returns (T, H, d)."""
    if key_bias is not None:  # grouped on every device: the varlen and nested kernels take no bias
        return grouped_sdpa(q, k, v, tokens.lengths, key_bias)
    compiling = torch.compiler.is_compiling()
    kernel = VARLEN["compiled" if compiling else "kernel"]
    if callable(kernel) and flash_applies(q):
        cu = tokens.cu_seqlens.to(torch.int32)
        return kernel(q, k, v, cu, cu, tokens.max_len, tokens.max_len)  # max_len: symbolic when compiling
    if compiling:
        return torch.ops.dyncompute.grouped_sdpa(q, k, v, tokens.host_lengths)[0]
    if q.is_cuda and VARLEN["kernel"] != "grouped":
        return nested_sdpa(q, k, v, tokens)
    return grouped_sdpa(q, k, v, tokens.lengths)


def nested_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: Tokens) -> torch.Tensor:
    """SDPA over jagged nested tensors: one call, torch's fused varlen kernels on CUDA (math on CPU)."""

    def jagged(x):
        return torch.nested.nested_tensor_from_jagged(x, offsets=tokens.cu_seqlens,
                                                      max_seqlen=tokens.max_len).transpose(1, 2)

    return F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v)).transpose(1, 2).values()


# --------------------------------------------------------------------------- grouping


def sdpa_plan(lengths) -> tuple[torch.Tensor | None, list[tuple[int, int]]]:
    """How to cover the samples with few SDPA calls.

    Returns (perm, calls): ``perm`` is None or the sample order that puts equal lengths next to each
    other; ``calls`` lists (number of samples, length) per SDPA call, in (permuted) order.
    """
    lengths = [int(n) for n in lengths]
    runs = _runs(lengths)
    groups = defaultdict(list)
    for b, n in enumerate(lengths):
        groups[n].append(b)
    if len(runs) - len(groups) <= PERMUTE_COPIES:
        return None, runs
    order = [b for members in groups.values() for b in members]
    return torch.tensor(order), [(len(m), n) for n, m in groups.items()]


def _runs(lengths: list[int]) -> list[tuple[int, int]]:
    runs: list[list[int]] = []
    for n in lengths:
        if runs and runs[-1][1] == n:
            runs[-1][0] += 1
        else:
            runs.append([1, n])
    return [(c, n) for c, n in runs]


def _token_order(lengths: list[int], perm: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices of the samples taken in ``perm`` order, and the inverse permutation."""
    n = torch.tensor(lengths)
    starts = F.pad(n.cumsum(0), (1, 0))[:-1]
    index = torch.cat([torch.arange(starts[b], starts[b] + n[b]) for b in perm.tolist()])
    return index.to(device), index.argsort().to(device)


def _calls(x: torch.Tensor, calls) -> list[torch.Tensor]:
    """Views of packed (T, H, d) as (n, H, L, d) per call; of a (T, H) log-sum-exp as (n, H, L); of a
    per-token (T,) bias as (n, 1, 1, L)."""
    out, s = [], 0
    for count, n in calls:
        part = x[s:s + count * n].unflatten(0, (count, n))
        out.append(part.transpose(1, 2) if x.dim() > 1 else part[:, None, None, :])
        s += count * n
    return out


def _pack(outs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([o.transpose(1, 2).flatten(0, 1) for o in outs])


def _permuted(lengths, device, *tensors):
    """The plan for ``lengths``, the inverse permutation (None when unpermuted) and ``tensors`` (packed) in
    the plan's sample order."""
    perm, calls = sdpa_plan(lengths)
    if perm is None:
        return calls, None, tensors
    index, inverse = _token_order(lengths, perm, device)
    return calls, inverse, tuple(t.index_select(0, index) for t in tensors)


def _unpermuted(inverse, *tensors):
    return tensors if inverse is None else tuple(t.index_select(0, inverse) for t in tensors)


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths,
                 key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA within each sample of packed q, k, v (T, H, d), one call per group of equal lengths;
    ``key_bias`` (T,) is added to every key's logit."""
    bias = () if key_bias is None else (key_bias,)
    calls, inverse, (q, k, v, *bias) = _permuted([int(n) for n in lengths], q.device, q, k, v, *bias)
    masks = _calls(bias[0].to(q.dtype), calls) if bias else [None] * len(calls)
    outs = [F.scaled_dot_product_attention(a, b, c, attn_mask=m)
            for a, b, c, m in zip(_calls(q, calls), _calls(k, calls), _calls(v, calls), masks)]
    return _unpermuted(inverse, _pack(outs))[0]


# --------------------------------------------------------------------------- the compiled path


@torch.library.custom_op("dyncompute::grouped_sdpa", mutates_args=())
def _grouped_sdpa_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     host_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`grouped_sdpa`, and on the CPU the flash kernel's log-sum-exp per token and head (T, H) for the
    backward (empty elsewhere)."""
    if q.device.type != "cpu":
        return grouped_sdpa(q, k, v, host_lengths.tolist()), q.new_empty(0, dtype=torch.float32)
    calls, inverse, (q, k, v) = _permuted(host_lengths.tolist(), q.device, q, k, v)
    outs = [torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*a)
            for a in zip(_calls(q, calls), _calls(k, calls), _calls(v, calls))]
    return _unpermuted(inverse, _pack([o for o, _ in outs]), _pack([lse for _, lse in outs]))


@_grouped_sdpa_op.register_fake
def _(q, k, v, host_lengths):
    lse = q.new_empty(q.shape[:2] if q.device.type == "cpu" else 0, dtype=torch.float32)
    return torch.empty_like(q), lse


@torch.library.custom_op("dyncompute::grouped_sdpa_backward", mutates_args=())
def _grouped_sdpa_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor,
                              host_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `grouped_sdpa` (autograd is off inside a custom operator), per call: the CPU flash
    kernel's backward from the saved output and log-sum-exp (the eager path's kernel); elsewhere the
    softmax-attention backward written out, recomputing the probabilities."""
    cpu = q.device.type == "cpu"
    calls, inverse, packed = _permuted(host_lengths.tolist(), q.device, grad, q, k, v, *((out, lse) if cpu else ()))
    views = zip(*(_calls(t, calls) for t in packed))
    if cpu:
        grads = [torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(g, a, b, c, o, m, 0.0, False)
                 for g, a, b, c, o, m in views]
    else:
        grads = [_sdpa_backward(*a) for a in views]
    return _unpermuted(inverse, *(_pack(list(g)) for g in zip(*grads)))


def _sdpa_backward(grad, q, k, v):
    """dq, dk, dv of softmax(q kᵀ / sqrt(d)) v for (n, H, L, d) inputs."""
    scale = q.shape[-1] ** -0.5
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    dv = p.transpose(-1, -2) @ grad
    dp = grad @ v.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
    return ds @ k, ds.transpose(-1, -2) @ q, dv


@_grouped_sdpa_backward_op.register_fake
def _(grad, q, k, v, out, lse, host_lengths):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, grad, _grad_lse):
    q, k, v, host_lengths, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.dyncompute.grouped_sdpa_backward(grad.contiguous(), q, k, v, out, lse, host_lengths)
    return dq, dk, dv, None


_grouped_sdpa_op.register_autograd(_backward, setup_context=_setup_context)


class PackedAttention(Attention):
    """timm's multi-head self-attention (same parameters, same key names) run on `Tokens`; ``active``
    (B, H), optional: the heads each sample runs (`dyncompute.width`)."""

    def forward(self, h: torch.Tensor, tokens: Tokens, log_size: torch.Tensor | None = None,  # type: ignore[override]
                active: torch.Tensor | None = None) -> torch.Tensor:
        if active is not None:
            if log_size is not None:
                raise ValueError("per-sample heads and proportional attention (log_size) do not compose")
            if width.is_masked(active):
                return self._heads(h, tokens, None, active)
            if not width.all_on(active):
                return width.by_width(h, tokens, active, self._heads)
        if tokens.uniform:  # h: (B, L, D) -> timm's fused path
            if log_size is None:
                return super().forward(h)
            return super().forward(h, attn_mask=log_size.to(h.dtype).view(h.shape[0], 1, 1, h.shape[1]))
        T = h.shape[0]
        q, k, v = self.qkv(h).view(T, 3, self.num_heads, self.head_dim).unbind(1)
        o = varlen_attention(self.q_norm(q), self.k_norm(k), v, tokens, log_size)
        return self.proj_drop(self.proj(self.norm(o.reshape(T, self.attn_dim))))

    def _heads(self, h: torch.Tensor, tokens: Tokens, pattern: torch.Tensor | None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the heads where ``pattern`` (H,) is True (all when None), their outputs times
        ``mask`` (B, H): only the active heads' Q, K, V rows and output-projection columns are used."""
        H, d = self.num_heads, self.head_dim
        w_qkv, b_qkv, w_proj = self.qkv.weight, self.qkv.bias, self.proj.weight
        n = H
        if pattern is not None:
            heads = pattern.nonzero().squeeze(1)
            n = len(heads)
            w_qkv = w_qkv.view(3, H, d, -1)[:, heads].reshape(-1, w_qkv.shape[1])
            b_qkv = None if b_qkv is None else b_qkv.view(3, H, d)[:, heads].reshape(-1)
            w_proj = w_proj.view(w_proj.shape[0], H, d)[:, heads].flatten(1)
        qkv = linear(h, w_qkv, b_qkv)
        if tokens.uniform:
            B, L = h.shape[:2]
            q, k, v = qkv.view(B, L, 3, n, d).permute(2, 0, 3, 1, 4).unbind(0)
            o = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v).transpose(1, 2)  # (B, L, n, d)
            if mask is not None:
                o = o * mask[:, None, :, None]
        else:
            q, k, v = qkv.view(h.shape[0], 3, n, d).unbind(1)
            o = varlen_attention(self.q_norm(q), self.k_norm(k), v, tokens)  # (T, n, d)
            if mask is not None:
                o = o * mask[tokens.batch][:, :, None]
        return self.proj_drop(linear(self.norm(o.flatten(-2)), w_proj, self.proj.bias))
