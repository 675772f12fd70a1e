"""`Tokens`: the one token-sequence representation inside the backbone.

Tokens are *packed*: every sample's tokens lie back to back in ``x`` (T, D), with ``cu_seqlens``
(B+1,) offsets, ``pos`` (T, 2) each token's original grid (row, col) and ``batch`` (T,) its sample
index. Per-token layers (linear, MLP, norms) run on ``x`` directly, so no FLOP is spent on padding.
The equal-length case (static patchify) keeps a fast path: ``batched`` views ``x`` as (B, L, D).

Per-sample vectors (adaLN's shift, scale, gate) reach packed tokens through `per_token`: one
``index_select`` by ``batch`` per call, so a block costs the same number of kernels whatever the
batch size (no loop over samples; the loop it replaced launched 2 kernels per sample and use).
`modulate` and `gated_add` take the per-sample (B, D) vectors and gather each one just before its
use: a contiguous (T, D) copy, still in cache when the fused multiply-add reads it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .layers import muladd


@dataclass(frozen=True)
class Tokens:
    x: torch.Tensor  # (T, D)
    cu_seqlens: torch.Tensor  # (B+1,) int64, cu_seqlens[0] == 0
    pos: torch.Tensor  # (T, 2) int64 (row, col) on the token grid
    batch: torch.Tensor  # (T,) int64 sample index
    lengths: tuple[int, ...]  # python ints: host-side copy of the per-sample lengths
    # Derived, so that compiled code reads a flag and tensors, never the python lengths (which would make
    # torch.compile specialise on every new set of lengths).
    uniform: bool = field(init=False)  # every sample has the same length: the (B, L, D) fast path
    max_len: int = field(init=False)  # the longest sample (the varlen kernels' max_seqlen; symbolic when compiled)
    host_lengths: torch.Tensor = field(init=False, repr=False)  # (B,) int64 on the CPU

    def __post_init__(self):
        object.__setattr__(self, "uniform", len(set(self.lengths)) <= 1)
        object.__setattr__(self, "max_len", max(self.lengths, default=0))
        object.__setattr__(self, "host_lengths", torch.tensor(self.lengths, dtype=torch.long))

    @classmethod
    def from_lengths(cls, x: torch.Tensor, lengths, pos: torch.Tensor, counts: torch.Tensor | None = None) -> Tokens:
        """``counts``: the lengths already on x's device, if at hand (saves a copy that waits for the GPU)."""
        lengths = tuple(int(n) for n in lengths)
        if x.dim() != 2 or pos.shape != (x.shape[0], 2) or sum(lengths) != x.shape[0]:
            raise ValueError(f"packed tokens need x (T, D), pos (T, 2) and sum(lengths) == T; got "
                             f"x {tuple(x.shape)}, pos {tuple(pos.shape)}, sum(lengths) {sum(lengths)}")
        n = torch.tensor(lengths, device=x.device, dtype=torch.long) if counts is None else counts.long()
        cu = F.pad(n.cumsum(0), (1, 0))
        batch = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), n, output_size=x.shape[0])
        return cls(x, cu, pos, batch, lengths)

    @classmethod
    def from_batched(cls, x: torch.Tensor, pos: torch.Tensor) -> Tokens:
        """Equal-length tokens from x (B, L, D) sharing one (L, 2) position table."""
        B, L, D = (int(n) for n in x.shape)  # ints also under TorchScript tracing (fvcore's count)
        # built on x's device: a host-to-device copy of the lengths (as in from_lengths) would make the host
        # wait for the GPU's queue once per forward, and a launch-bound step would lose its overlap
        cu = torch.arange(0, (B + 1) * L, L, device=x.device)
        batch = torch.arange(B, device=x.device).view(B, 1).expand(B, L).reshape(-1)
        return cls(x.reshape(B * L, D), cu, pos.repeat(B, 1), batch, (L,) * B)

    @property
    def num_samples(self) -> int:
        return len(self.lengths)

    def with_x(self, x: torch.Tensor) -> Tokens:
        return replace(self, x=x)

    def batched(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, D) view when uniform, else the packed (T, D) tensor unchanged."""
        x = self.x if x is None else x
        return x.view(self.num_samples, -1, x.shape[-1]) if self.uniform else x

    def per_token(self, v: torch.Tensor) -> torch.Tensor:
        """Per-sample vectors (B, K) made to broadcast against ``batched()`` tokens: (B, 1, K) when
        uniform, else each token's own row (T, K), gathered once by ``batch``."""
        if self.uniform:
            return v.unsqueeze(1)
        if torch.compiler.is_compiling() and v.requires_grad:
            return _PerToken.apply(v, self.batch)
        return v.index_select(0, self.batch)

    def modulate(self, x: torch.Tensor, shift: torch.Tensor, one_plus_scale: torch.Tensor) -> torch.Tensor:
        """adaLN's x * (1 + scale) + shift (`muladd`) for per-sample vectors (B, D), the scale with its 1
        already added (once per sample, not once per token)."""
        return muladd(self.per_token(shift), x, self.per_token(one_plus_scale))

    def gated_add(self, h: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """adaLN-Zero's gated residual h + gate * y (`muladd`) for a per-sample gate (B, D)."""
        return muladd(h, self.per_token(gate), y)

    def select(self, keep: torch.Tensor, drop_empty: bool = False) -> tuple[Tokens, torch.Tensor]:
        """The tokens where ``keep`` (T,) is True, packed, and their rows in ``x``: an op that skips tokens
        (DyDiT's per-token MLP gate) or samples (a per-sample width) runs on the selection and scatters
        back. Every sample stays (possibly with no token) unless ``drop_empty``."""
        rows = keep.nonzero().squeeze(1)
        counts = torch.bincount(self.batch[rows], minlength=self.num_samples).tolist()
        if drop_empty:
            counts = [n for n in counts if n]
        return Tokens.from_lengths(self.x[rows], counts, self.pos[rows]), rows

    def unpack(self, x: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-sample views of ``x`` (T, ...)."""
        x = self.x if x is None else x
        return list(torch.split(x, list(self.lengths)))


class _PerToken(torch.autograd.Function):
    """`Tokens.per_token`'s gather in compiled graphs, whose backward (a sum over each sample's tokens) is one
    opaque operator: inductor's own scatter-add, fused into the layer norm's backward, ran the DC-DiT-S
    training step's modulation backward ~1.7x slower than eager on the CPU."""

    @staticmethod
    def forward(ctx, v, batch):
        ctx.save_for_backward(batch)
        ctx.num_samples = v.shape[0]
        return v.index_select(0, batch)

    @staticmethod
    def backward(ctx, grad):
        (batch,) = ctx.saved_tensors
        return sum_by_sample(grad, batch, ctx.num_samples), None


@torch.library.custom_op("dyncompute::sum_by_sample", mutates_args=())
def sum_by_sample(x: torch.Tensor, batch: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Rows of packed ``x`` (T, K) summed per sample: (num_samples, K)."""
    return x.new_zeros(num_samples, x.shape[1]).index_add_(0, batch, x)


@sum_by_sample.register_fake
def _(x, batch, num_samples):
    return x.new_empty(num_samples, x.shape[1])
